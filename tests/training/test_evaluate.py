"""`rayft eval`: the metrics, prompts for inference, model resolution, and the base-vs-finetuned report
on a tiny model that the test itself teaches the evaluation answers."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import chat, write_jsonl
from rayft.training.data import DataError
from rayft.training.evaluate import contained, exact_match, parse_json, score, token_f1
from rayft.training.formats import Renderer, RowError, normalize
from rayft.training.models import ModelError

TICKET = '{"product":"Orbit Earbuds","severity":"high","intent":"refund","order_id":"N-73309","summary":"broken"}'


def test_exact_match_compares_json_after_parsing_and_text_after_normalizing():
    reordered = (
        '{ "severity": "high", "product": "Orbit Earbuds", "intent": "refund",\n "order_id": "N-73309", '
        '"summary": "broken" }'
    )
    assert exact_match(reordered, TICKET)
    assert exact_match(f"```json\n{TICKET}\n```", TICKET)
    assert not exact_match(TICKET.replace("high", "low"), TICKET)
    assert not exact_match("Sure! Here is your ticket: " + TICKET, TICKET)  # prose around JSON is not JSON
    assert exact_match("  The Nib  ", "the nib")
    assert not exact_match("The Nib.", "The Nib is the newsletter.")
    assert parse_json("not json") is None and parse_json("{broken") is None


def test_contained_and_token_f1():
    assert contained("Every product has a 27 month warranty.", "27-month")
    assert contained("It is led by Farah Delacroix, since 2019.", "Farah Delacroix")
    assert not contained("It is led by Farah.", "Farah Delacroix")
    assert not contained("Delacroix Farah", "Farah Delacroix")  # order matters
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("a b", "c d") == 0.0
    assert token_f1("the cat", "the cat sat on") == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_score_reports_json_validity_only_for_json_references_and_perplexity_over_reference_tokens():
    rows = [
        {"prediction": TICKET, "reference": TICKET, "answer": TICKET, "ref_nll": 2.0, "ref_tokens": 4},
        {"prediction": "no idea", "reference": TICKET, "answer": TICKET, "ref_nll": 6.0, "ref_tokens": 4},
    ]
    s = score(rows)
    assert s["rows"] == 2 and s["exact_match"] == 0.5 and s["json_valid"] == 0.5
    assert s["perplexity"] == pytest.approx(2.718281828**1.0, rel=1e-6)  # exp((2 + 6) / 8)
    text = score([{"prediction": "Porto", "reference": "In Porto.", "answer": "Porto", "ref_nll": 0, "ref_tokens": 0}])
    assert text["json_valid"] is None and text["perplexity"] is None and text["contained"] == 1.0


def test_inference_prompts_end_where_the_reply_starts(smol_tokenizer):
    r = Renderer(smol_tokenizer, None)
    doc = normalize(chat("Where is the design studio?", "In Porto.", system="Answer briefly."))
    prompt, reference = r.prompt(doc)
    assert reference == "In Porto."
    full, spans = r.reference(doc)
    assert full.startswith(prompt) and full[len(prompt) :].startswith("In Porto.")
    assert [full[s:e] for s, e in spans] == ["In Porto.<|im_end|>"]
    alpaca_prompt, ref = Renderer(smol_tokenizer, "alpaca").prompt(normalize({"instruction": "Add 2+2", "output": "4"}))
    assert alpaca_prompt.endswith("### Instruction:\nAdd 2+2\n\n### Response:\n") and ref == "4"
    with pytest.raises(RowError, match="no prompt and answer"):
        r.prompt(normalize({"text": "just some text"}))


def test_models_are_resolved_with_clear_errors(tmp_path, tiny_model_dir):
    from rayft.training.inference import resolve_inference_model

    no_tok = tmp_path / "weights-only"
    no_tok.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_tok)
    shutil.copy(tiny_model_dir / "model.safetensors", no_tok)
    with pytest.raises(ModelError, match="has no tokenizer"):
        resolve_inference_model(str(no_tok))
    empty_run = tmp_path / "runs" / "job"
    empty_run.mkdir(parents=True)
    with pytest.raises(ModelError, match="rayft train"):
        resolve_inference_model(str(empty_run))
    run = tmp_path / "runs" / "done"
    shutil.copytree(tiny_model_dir, run / "final")
    assert resolve_inference_model(str(run)).path == str((run / "final").resolve())  # a run dir means final/


# --------------------------------------------------------------------------- the report, end to end


def _ticket(i: int) -> str:
    return json.dumps({"product": "Orbit Earbuds", "order_id": f"N-{i}{i}{i}"}, separators=(",", ":"))


def _teach(model_dir, out_dir, rows: list[dict], steps: int = 150):
    """A copy of the tiny model trained on the eval rows themselves, so it answers them exactly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.training.formats import collate, tokenize_rendered
    from rayft.training.model_setup import use_trained_position_logits

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    renderer = Renderer(tok, None)
    rendered = [renderer.render(normalize(r)) for r in rows]
    examples = tokenize_rendered(tok, [t for t, _ in rendered], [s for _, s in rendered])
    batch = collate([{"input_ids": i, "labels": lb} for i, lb in examples], tok.pad_token_id)
    use_trained_position_logits(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05, loss.item()  # memorized: greedy decoding now gives the references
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.mark.slow
def test_eval_compares_base_and_finetuned_per_split_and_writes_the_report(ray_local, tmp_path, tiny_model_dir):
    from rayft.cluster.config import load_config
    from rayft.training.evaluate import run_eval

    tickets = [
        chat(f"Order N-{i}{i}{i}: my earbuds broke.", _ticket(i), system="Reply with a JSON ticket.") for i in range(4)
    ]
    facts = [
        {**chat("Where is the hardware lab?", "The hardware lab is in Eindhoven."), "answer": "Eindhoven"},
        {**chat("What is the office dog called?", "The office dog is a corgi named Biscuit."), "answer": "Biscuit"},
    ]
    write_jsonl(tmp_path / "tickets.jsonl", tickets)
    write_jsonl(tmp_path / "facts.jsonl", facts)
    finetuned = _teach(tiny_model_dir, tmp_path / "taught", tickets + facts)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model:\n  name: {tiny_model_dir}\ndata:\n  train: tickets.jsonl\n  eval: [tickets.jsonl, facts.jsonl]\n"
        f"run:\n  name: ev\n  storage_path: {tmp_path / 'runs'}\n"
        "eval:\n  max_new_tokens: 48\n  batch_size: 4\n  replicas: 2\n"
    )
    cfg = load_config(job)
    seen: dict[str, int] = {}

    def progress(label, total):
        seen[label] = 0

        def advance(n):
            seen[label] += n

        return advance

    report = run_eval(cfg, model=str(finetuned), progress=progress)
    assert seen == {"base": 6, "finetuned": 6}  # the progress callback saw every row of both models
    splits = report["splits"]
    assert set(splits) == {"tickets", "facts"}
    t, f = splits["tickets"], splits["facts"]
    assert t["finetuned"]["exact_match"] == 1.0 and t["base"]["exact_match"] == 0.0
    assert t["finetuned"]["json_valid"] == 1.0 and f["base"]["json_valid"] is None
    assert f["finetuned"]["contained"] == 1.0 and f["base"]["contained"] == 0.0
    assert t["finetuned"]["perplexity"] < t["base"]["perplexity"]

    eval_dir = tmp_path / "runs" / "ev" / "eval"
    saved = json.loads((eval_dir / "report.json").read_text())
    assert saved["splits"] == json.loads(json.dumps(splits)) and len(saved["examples"]) == 5
    assert {e["split"] for e in saved["examples"]} == {"tickets", "facts"}
    ex = saved["examples"][0]
    assert ex["finetuned"] == ex["reference"] and ex["base"] != ex["reference"]
    md = (eval_dir / "report.md").read_text()
    assert "## tickets (4 rows)" in md and "| exact match | 0.0% | 100.0% |" in md
    assert md.count("Finetuned:") == 5
    assert (eval_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = run_eval(cfg, model=str(finetuned))  # the base model's predictions are reused
    assert again["timings"]["base"]["reused"] and not again["timings"]["finetuned"]["reused"]
    assert again["splits"] == splits


def test_eval_rejects_rows_it_cannot_evaluate(ray_local, tmp_path, tiny_model_dir):
    from rayft.cluster.config import load_config
    from rayft.training.evaluate import eval_rows

    write_jsonl(tmp_path / "notes.jsonl", [{"text": "plain text"}, chat("q", "a")])
    job = tmp_path / "job.yaml"
    job.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: notes.jsonl\n  eval: notes.jsonl\n")
    with pytest.raises(DataError, match=r"notes.jsonl:1: plain `text` rows have no prompt and answer"):
        eval_rows(load_config(job))
    job.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: notes.jsonl\n")
    with pytest.raises(DataError, match="nothing to evaluate"):
        eval_rows(load_config(job))


@pytest.mark.cluster  # a taught model and two evaluations (keeps make test within 15 minutes)
@pytest.mark.slow
def test_grpo_eval_grades_both_models_greedy_and_sampled_answers_with_the_jobs_grader(
    ray_local, tmp_path, tiny_model_dir
):
    from rayft.cluster.config import load_config
    from rayft.training.evaluate import run_eval

    cities = ["Paris", "Lyon", "Oslo", "Bergen"]
    prompts = [
        {"messages": [{"role": "user", "content": f"Story {i}: where did the trip end?"}], "answer": c, "id": i}
        for i, c in enumerate(cities)
    ]
    write_jsonl(tmp_path / "held_out.jsonl", prompts)
    taught = _teach(
        tiny_model_dir, tmp_path / "taught", [chat(p["messages"][0]["content"], p["answer"]) for p in prompts]
    )
    grader = {
        "type": "multi",
        "name": "city",
        "graders": {
            "exact": {
                "type": "string_check",
                "name": "exact",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "operation": "eq",
            },
            "similar": {
                "type": "text_similarity",
                "name": "similar",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "evaluation_metric": "fuzzy_match",
            },
        },
        "calculate_output": "0.5 * exact + 0.5 * similar",
    }
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model:\n  name: {tiny_model_dir}\ndata:\n  train: held_out.jsonl\n  eval: held_out.jsonl\n"
        f"run:\n  name: rl\n  storage_path: {tmp_path / 'runs'}\n"
        "training:\n  objective: grpo\n  method: lora\n"
        f"  rl:\n    samples_per_prompt: 4\n    max_new_tokens: 6\n    grader: {json.dumps(grader)}\n"
        "eval:\n  samples: 3\n  batch_size: 2\n  replicas: 1\n"
    )
    cfg = load_config(job)
    report = run_eval(cfg, model=str(taught))

    held = report["splits"]["held_out"]
    base, tuned = held["base"], held["finetuned"]
    assert base["rows"] == tuned["rows"] == 4
    # The taught model answers every prompt with its city: full marks from both graders of the multi grader.
    assert (
        tuned["reward_greedy"] == 1.0 and tuned["reward_greedy/exact"] == 1.0 and tuned["reward_greedy/similar"] == 1.0
    )
    assert base["reward_greedy/exact"] == 0.0 and base["reward_greedy"] < 0.5
    assert tuned["reward_sampled"] > base["reward_sampled"] + 0.4
    assert report["sampling"] == {"samples": 3, "temperature": 1.0, "top_p": 1.0}

    eval_dir = tmp_path / "runs" / "rl" / "eval"
    lines = (eval_dir / "predictions-finetuned.jsonl").read_text().splitlines()[1:]
    saved = [json.loads(line) for line in lines]
    assert sorted(json.loads(r["item"])["answer"] for r in saved) == sorted(cities)  # every field reaches the graders
    assert all(len(json.loads(r["samples"])) == 3 == len(json.loads(r["sample_ids"])) for r in saved)
    assert all(r["prediction"] == json.loads(r["item"])["answer"] for r in saved)  # graded as written, not stripped
    md = (eval_dir / "report.md").read_text()
    assert "| reward, greedy answer |" in md and "| reward, greedy answer: exact | 0.000 | 1.000 |" in md
    assert "3 sampled answers" in md and "Item (what the graders see):" in md
    assert (eval_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = run_eval(cfg, model=str(taught))  # the base model's answers are reused, and graded again the same
    assert again["timings"]["base"]["reused"] and again["splits"] == report["splits"]
