"""The bundled quickstart dataset keeps the promises its README makes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest

from helpers import QUICKSTART

DATA = QUICKSTART
GENERATED = [
    "train.jsonl",
    "eval.jsonl",
    "knowledge_train.jsonl",
    "knowledge_eval.jsonl",
    "preference_train.jsonl",
    "preference_eval.jsonl",
    "stats.json",
]

PRODUCTS = {
    "Lumen Desk Lamp",
    "Orbit Earbuds",
    "Drift Smart Kettle",
    "Pebble Fitness Band",
    "Atlas Power Bank",
    "Nimbus Air Purifier",
    "Ember Space Heater",
    "Tidal Smart Bottle",
}
INTENTS = {
    "refund",
    "replacement",
    "technical_issue",
    "shipping_delay",
    "billing_question",
    "cancel_order",
    "how_to",
}
SEVERITIES = {"low", "medium", "high", "urgent"}
TICKET_KEYS = ["product", "severity", "intent", "order_id", "summary"]
ORDER_ID = re.compile(r"\b[A-Z]-\d{5}\b")
PAIR_KEYS = ["prompt", "chosen", "rejected", "product", "task", "rule"]


def _load(name: str) -> list[dict]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _tickets(rows: list[dict]) -> list[dict]:
    return [json.loads(row["messages"][2]["content"]) for row in rows]


def _combo(ticket: dict) -> tuple[str, str, str]:
    return ticket["product"], ticket["intent"], ticket["severity"]


def _question(pair: dict) -> str:
    return pair["prompt"][0]["content"]


def _answer(pair: dict, side: str) -> str:
    return pair[side][0]["content"]


def _passes(answer: str, rule: dict) -> bool:
    """The rule as the README states it: every listed string, any case, and at most max_words words."""
    text = answer.lower()
    return all(s.lower() in text for s in rule["contains"]) and len(answer.split()) <= rule["max_words"]


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return _load("train.jsonl")


@pytest.fixture(scope="module")
def evals() -> list[dict]:
    return _load("eval.jsonl")


@pytest.fixture(scope="module")
def k_train() -> list[dict]:
    return _load("knowledge_train.jsonl")


@pytest.fixture(scope="module")
def k_eval() -> list[dict]:
    return _load("knowledge_eval.jsonl")


@pytest.fixture(scope="module")
def p_train() -> list[dict]:
    return _load("preference_train.jsonl")


@pytest.fixture(scope="module")
def p_eval() -> list[dict]:
    return _load("preference_eval.jsonl")


def test_sizes(train, evals, k_train, k_eval, p_train, p_eval):
    assert len(train) >= 1000
    assert len(evals) >= 150
    assert 180 <= len(k_train) <= 220
    assert 45 <= len(k_eval) <= 55
    assert len(k_train) == 4 * len(k_eval)
    assert 240 <= len(p_train) <= 400
    assert 40 <= len(p_eval) <= 60


@pytest.mark.parametrize("name", ["train.jsonl", "eval.jsonl"])
def test_task_rows_have_system_user_assistant(name):
    rows = _load(name)
    system_prompts = {row["messages"][0]["content"] for row in rows}
    assert len(system_prompts) == 1, "every example shares one system prompt"
    for row in rows:
        assert list(row) == ["messages"]
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
        assert 20 <= len(row["messages"][1]["content"].split()) <= 70


@pytest.mark.parametrize("name", ["train.jsonl", "eval.jsonl"])
def test_tickets_are_strict_json_with_valid_values(name):
    for row in _load(name):
        message, content = row["messages"][1]["content"], row["messages"][2]["content"]
        ticket = json.loads(content)
        assert list(ticket) == TICKET_KEYS
        # One serialization everywhere, so an exact-match metric is meaningful.
        assert content == json.dumps(ticket, separators=(",", ":"))
        assert ticket["product"] in PRODUCTS
        assert ticket["intent"] in INTENTS
        assert ticket["severity"] in SEVERITIES
        found = ORDER_ID.findall(message)
        if ticket["order_id"] is None:
            assert found == []
        else:
            assert found == [ticket["order_id"]]
        assert ticket["summary"].startswith(ticket["product"] + ": ")
        assert ticket["summary"].endswith(".")


def test_messages_are_unique(train, evals):
    messages = [row["messages"][1]["content"] for row in train + evals]
    assert len(messages) == len(set(messages))


def test_eval_combinations_never_seen_in_train(train, evals):
    train_combos = {_combo(t) for t in _tickets(train)}
    eval_combos = {_combo(t) for t in _tickets(evals)}
    assert eval_combos, "eval must not be empty"
    assert not train_combos & eval_combos


def test_every_value_appears_in_train(train):
    tickets = _tickets(train)
    assert {t["product"] for t in tickets} == PRODUCTS
    assert {t["intent"] for t in tickets} == INTENTS
    assert {t["severity"] for t in tickets} == SEVERITIES
    with_order = sum(t["order_id"] is not None for t in tickets)
    assert 0 < with_order < len(tickets), "train has tickets with and without an order id"


def test_knowledge_rows_have_user_assistant(k_train, k_eval):
    for row in k_train + k_eval:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        question, answer = (m["content"] for m in row["messages"])
        assert question.endswith("?")
        assert answer.endswith((".", '."')) and "\n" not in answer


def test_knowledge_eval_questions_are_new_but_answers_are_trained(k_train, k_eval):
    train_questions = {row["messages"][0]["content"] for row in k_train}
    train_answers = Counter(row["messages"][1]["content"] for row in k_train)
    eval_answers = [row["messages"][1]["content"] for row in k_eval]
    assert len(set(eval_answers)) == len(eval_answers), "one eval question per fact"
    for row in k_eval:
        question, answer = (m["content"] for m in row["messages"])
        assert question not in train_questions
        assert train_answers[answer] == 4, answer
    assert set(train_answers) == set(eval_answers)


def test_stats_match_files(train, evals, k_train, k_eval, p_train, p_eval):
    stats = json.loads((DATA / "stats.json").read_text(encoding="utf-8"))
    assert stats["files"] == {
        "train.jsonl": len(train),
        "eval.jsonl": len(evals),
        "knowledge_train.jsonl": len(k_train),
        "knowledge_eval.jsonl": len(k_eval),
        "preference_train.jsonl": len(p_train),
        "preference_eval.jsonl": len(p_eval),
    }
    for split, rows in (("train", train), ("eval", evals)):
        tickets = _tickets(rows)
        assert stats[split]["examples"] == len(rows)
        for key in ("product", "intent", "severity"):
            assert stats[split][key] == dict(Counter(t[key] for t in tickets)), (split, key)
    held = {_combo(t) for t in _tickets(evals)}
    assert stats["combinations"]["held_out"] == len(held)
    assert stats["system_prompt"] == train[0]["messages"][0]["content"]


@pytest.mark.parametrize("name", ["preference_train.jsonl", "preference_eval.jsonl"])
def test_preference_rows_are_pairs_rayft_accepts(name):
    from rayft.training.formats import detect_format, normalize

    for row in _load(name):
        assert list(row) == PAIR_KEYS
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
        assert row["product"] in PRODUCTS
        assert detect_format(row) == "preference"
        doc = normalize(row)
        assert doc["kind"] == "pair"
        assert doc["chosen"]["messages"][-1]["content"] == _answer(row, "chosen")
        assert doc["rejected"]["messages"][-1]["content"] == _answer(row, "rejected")


@pytest.mark.parametrize("name", ["preference_train.jsonl", "preference_eval.jsonl"])
def test_chosen_passes_its_rule_and_rejected_fails_it(name):
    for row in _load(name):
        rule, chosen, rejected = row["rule"], _answer(row, "chosen"), _answer(row, "rejected")
        assert list(rule) == ["contains", "max_words"]
        assert rule["contains"] and all(isinstance(s, str) and s for s in rule["contains"])
        assert _passes(chosen, rule), chosen
        assert not _passes(rejected, rule), rejected
        assert len(chosen.split()) <= min(30, rule["max_words"]) < 60 <= len(rejected.split())
        assert row["product"] in chosen, "the short answer names the product"
        # Every listed string is in the question too, so even a held-out question says what a good answer needs.
        assert all(s.lower() in _question(row).lower() for s in rule["contains"]), _question(row)


def test_preference_rejected_answers_both_bury_and_omit_the_step(p_train):
    missing = [not all(s.lower() in _answer(r, "rejected").lower() for s in r["rule"]["contains"]) for r in p_train]
    assert 0 < sum(missing) < len(p_train)


def test_preference_questions_are_unique_and_pairs_vary(p_train, p_eval):
    questions = [_question(r) for r in p_train + p_eval]
    assert len(questions) == len(set(questions))
    rejected = [_answer(r, "rejected") for r in p_train + p_eval]
    assert len(rejected) == len(set(rejected))
    openers = Counter(a.split("!")[0].split(".")[0] for a in rejected)
    assert len(openers) >= 5, "the chatty openers vary"


def test_preference_eval_combinations_never_seen_in_train(p_train, p_eval):
    train_combos = {(r["product"], r["task"]) for r in p_train}
    eval_combos = {(r["product"], r["task"]) for r in p_eval}
    assert eval_combos and len({p for p, _ in eval_combos}) > 1
    assert not train_combos & eval_combos
    train_questions = {_question(r) for r in p_train}
    for row in p_eval:
        assert _question(row) not in train_questions
        # no paraphrase either: the task as worded in eval is never asked about for that product in train
        assert not any(row["task"] in q and row["product"].split()[0] in q for q in train_questions), _question(row)
    for row in p_train + p_eval:
        assert row["task"] in _question(row)


def test_every_product_appears_in_preference_train(p_train):
    assert {r["product"] for r in p_train} == PRODUCTS
    tasks = Counter(product for product, _ in {(r["product"], r["task"]) for r in p_train})
    assert min(tasks.values()) >= 2, "every product keeps most of its tasks in train"


def test_preference_stats_match_files(p_train, p_eval):
    stats = json.loads((DATA / "stats.json").read_text(encoding="utf-8"))["preference"]
    held = sorted({(r["product"], r["task"]) for r in p_eval})
    assert sorted(tuple(c) for c in stats["combinations"]["held_out_list"]) == held
    assert stats["combinations"]["held_out"] == len(held)
    assert stats["combinations"]["train"] == len({(r["product"], r["task"]) for r in p_train})
    assert stats["max_words"] == p_train[0]["rule"]["max_words"]
    for split, rows in (("train", p_train), ("eval", p_eval)):
        assert stats[split]["pairs"] == len(rows)
        assert stats[split]["product"] == dict(Counter(r["product"] for r in rows)), split
        for side in ("chosen", "rejected"):
            words = [len(_answer(r, side).split()) for r in rows]
            assert stats[split][f"{side}_words"]["min"] == min(words), (split, side)
            assert stats[split][f"{side}_words"]["max"] == max(words), (split, side)
        assert stats[split]["chosen_words"]["max"] < stats[split]["rejected_words"]["min"]


def test_readme_example_is_a_real_training_row(train):
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```json\n(.*?)\n```", readme, re.S)
    assert block, "README shows an example row"
    assert json.loads(block.group(1)) in train


def test_generator_reproduces_committed_files(tmp_path):
    subprocess.run(
        [sys.executable, str(DATA / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
