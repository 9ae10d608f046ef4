"""OpenAI's grader objects (rayft.training.graders): scores against hand-computed values and the guide's examples,
validation that reports every problem with its field path, the python sandbox holding against graders that
misbehave, and score_model graders against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rayft.training import grader_sandbox
from rayft.training.graders import (
    GraderError,
    count_errors,
    grade_batch,
    make_sample,
    openai_compatible_client,
    parse_grader,
    parse_model_score,
    run_grader,
)


def string_check(input: str, reference: str, operation: str = "eq", name: str = "check") -> dict:
    return {"type": "string_check", "name": name, "input": input, "reference": reference, "operation": operation}


def similarity(metric: str, input: str, reference: str, name: str = "sim") -> dict:
    return {
        "type": "text_similarity",
        "name": name,
        "input": input,
        "reference": reference,
        "evaluation_metric": metric,
    }


def python(source: str, name: str = "py") -> dict:
    return {"type": "python", "name": name, "source": source}


def score(spec: dict, output_text: str = "", item: dict | None = None) -> float:
    result = parse_grader(spec).grade(make_sample(output_text), item or {})
    assert result.ok, result.messages
    return result.score


def validates_as_openai_response(body: dict) -> None:
    from openai.types.fine_tuning.alpha import GraderRunResponse

    parsed = GraderRunResponse.model_validate(body)
    assert parsed.reward == body["reward"]
    assert (
        parsed.metadata.errors.python_grader_runtime_error == body["metadata"]["errors"]["python_grader_runtime_error"]
    )


# ---------------------------------------------------------------------------------------------------------------
# string_check: the guide's table (eq, ne: case-sensitive equality; like: input contains reference; ilike: the
# same, ignoring case).


@pytest.mark.parametrize(
    ("operation", "input", "reference", "expected"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "paris", "Paris", 0.0),
        ("ne", "paris", "Paris", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "The capital is Paris.", "Paris", 1.0),
        ("like", "The capital is paris.", "Paris", 0.0),
        ("like", "Paris", "The capital is Paris.", 0.0),  # input contains reference, not the other way round
        ("ilike", "THE CAPITAL IS PARIS.", "paris", 1.0),
        ("ilike", "The capital is Lyon.", "paris", 0.0),
    ],
)
def test_string_check_operations(operation, input, reference, expected):
    assert score(string_check("{{ sample.output_text }}", reference, operation), input) == expected


def test_templates_reach_nested_item_fields_output_json_and_tools_and_render_non_strings_as_json():
    item = {"expected": {"city": {"name": "Paris"}, "population": 2102650, "tags": ["capital", "seine"]}}
    output = json.dumps({"answer": {"city": "Paris"}, "facts": [1, 2]})
    assert score(string_check("{{sample.output_json.answer.city}}", "{{ item.expected.city.name }}"), output, item) == 1
    assert score(string_check("{{ item.expected.population }}", "2102650"), output, item) == 1  # a number, as JSON
    assert score(string_check("{{ item.expected.tags[1] }}", "seine"), output, item) == 1
    assert score(string_check("{{ sample.output_json.facts }}", "[1, 2]"), output, item) == 1  # a list, as JSON
    # The guide's tool-call grader: a multi grader over sample.output_tools[0].function.name and .arguments.
    tool_grader = {
        "type": "multi",
        "name": "tool_call",
        "graders": {
            "function_name": string_check("get_acceptors", "{{sample.output_tools[0].function.name}}"),
            "arguments": string_check('{"smiles": "{{item.smiles}}"}', "{{sample.output_tools[0].function.arguments}}"),
        },
        "calculate_output": "0.5 * function_name + 0.5 * arguments",
    }
    call = {"type": "function", "function": {"name": "get_acceptors", "arguments": '{"smiles": "CCO"}'}}
    sample = make_sample("", output_tools=[call])
    assert parse_grader(tool_grader).grade(sample, {"smiles": "CCO"}).score == 1.0
    assert parse_grader(tool_grader).grade(sample, {"smiles": "CCN"}).score == 0.5


def test_a_missing_variable_scores_zero_with_invalid_variable_error_and_says_which_keys_exist():
    grader = parse_grader(string_check("{{ sample.output_text }}", "{{ item.answer }}"))
    result = grader.grade(make_sample("Paris"), {"question": "capital?", "reference": "Paris"})
    assert result.score == 0.0
    assert result.errors == {"invalid_variable_error": True}
    assert "item has no key 'answer'" in result.messages[0] and "question, reference" in result.messages[0]


def test_output_json_of_an_output_that_is_not_json_is_a_sample_parse_error():
    grader = parse_grader(string_check("{{ sample.output_json.city }}", "Paris"))
    result = grader.grade(make_sample("Paris, I think"), {})
    assert (result.score, result.errors) == (0.0, {"sample_parse_error": True})
    assert make_sample("Paris, I think")["output_json"] is None
    assert make_sample('{"city": "Paris"}')["output_json"] == {"city": "Paris"}


# ---------------------------------------------------------------------------------------------------------------
# text_similarity, each metric against a value computed by hand from its definition.


def test_fuzzy_match_is_rapidfuzz_ratio_the_normalized_indel_similarity():
    # kitten / sitting: the longest common subsequence is "ittn" (4), so insertions + deletions = 6 + 7 - 2*4 = 5,
    # over 13 characters: 1 - 5/13 = 8/13.
    assert score(similarity("fuzzy_match", "kitten", "sitting")) == pytest.approx(8 / 13)
    assert score(similarity("fuzzy_match", "{{ sample.output_text }}", "Paris"), "Paris") == 1.0


def test_rouge_scores_are_f_measures_of_ngram_and_lcs_overlap():
    # reference "the cat sat on the mat", candidate "the cat lay on a mat": 6 tokens each.
    # unigrams in common: the (once), cat, on, mat = 4 -> P = R = 4/6 -> F1 = 2/3.
    # bigrams: only "the cat" of 5 each -> F1 = 1/5. Longest common subsequence: the cat on mat (4) -> 2/3.
    pair = ("the cat lay on a mat", "the cat sat on the mat")
    assert score(similarity("rouge_1", *pair)) == pytest.approx(2 / 3)
    assert score(similarity("rouge_2", *pair)) == pytest.approx(1 / 5)
    assert score(similarity("rouge_l", *pair)) == pytest.approx(2 / 3)
    assert score(similarity("rouge_5", *pair)) == 0.0
    # rouge-score's own tokenizer deletes non-ASCII letters (this pair would score 0); rayft's keeps them.
    assert score(similarity("rouge_1", "Привет, мир", "привет мир")) == 1.0


def test_bleu_of_identical_text_is_one_and_a_partial_match_is_the_geometric_mean_of_ngram_precisions():
    assert score(similarity("bleu", "the cat sat on the mat", "the cat sat on the mat")) == 1.0
    # candidate "the cat sat on a mat" against "the cat sat on the mat": n-gram precisions 5/6, 3/5, 2/4, 1/3,
    # same length so no brevity penalty: BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4).
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert score(similarity("bleu", "the cat sat on a mat", "the cat sat on the mat")) == pytest.approx(expected)


def test_gleu_is_the_lesser_of_ngram_precision_and_recall():
    # 1- to 4-grams: 5 + 3 + 2 + 1 = 11 matches of 6 + 5 + 4 + 3 = 18 on each side -> 11/18.
    assert score(similarity("gleu", "the cat sat on a mat", "the cat sat on the mat")) == pytest.approx(11 / 18)


def test_cosine_is_refused_since_it_needs_an_embedding_model():
    with pytest.raises(GraderError, match=r"grader\.evaluation_metric: 'cosine' needs an embedding model"):
        parse_grader(similarity("cosine", "a", "b"))


def test_meteor_without_nltk_wordnet_data_is_refused_at_validation(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # a data directory without WordNet
    with pytest.raises(GraderError) as raised:
        parse_grader(similarity("meteor", "the cat", "the cat"))
    message = str(raised.value)
    assert message.startswith("grader.evaluation_metric: 'meteor' needs NLTK's WordNet data")
    assert "nltk.downloader wordnet" in message


def test_meteor_scores_when_wordnet_is_installed():
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        pytest.skip("NLTK's WordNet data is not installed here (rayft refuses meteor then: tested above)")
    # Identical 6-token texts: one chunk, so METEOR = Fmean * (1 - 0.5 * (1/6) ** 3).
    got = score(similarity("meteor", "the cat sat on the mat", "the cat sat on the mat"))
    assert got == pytest.approx(1 - 0.5 * (1 / 6) ** 3, abs=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# multi graders and calculate_output.


def multi(formula: str, graders: dict | None = None) -> dict:
    graders = graders or {
        "a": string_check("{{ sample.output_text }}", "{{ item.answer }}"),  # 1.0 below
        "b": similarity("fuzzy_match", "kitten", "sitting"),  # 8/13
    }
    return {"type": "multi", "name": "combined", "graders": graders, "calculate_output": formula}


@pytest.mark.parametrize(
    ("formula", "expected"),
    [
        ("0.5 * a + 0.5 * b", 0.5 + 0.5 * 8 / 13),
        ("min(a, b) ^ 2", (8 / 13) ** 2),
        ("a * 2 ^ 3 ^ 2", 512.0),  # ^ is power, right-associative
        ("-a ^ 2", -1.0),  # as in mathematics: -(a^2)
        ("(a + b) / 2", (1 + 8 / 13) / 2),
        ("floor(b * 10) / 10 + ceil(b) + abs(-a) + sqrt(4 * a) + log(exp(2)) + max(a, b, 3)", 0.6 + 1 + 1 + 2 + 2 + 3),
    ],
)
def test_multi_formula(formula, expected):
    result = parse_grader(multi(formula)).grade(make_sample("Paris"), {"answer": "Paris"})
    assert result.ok, result.messages
    assert result.score == pytest.approx(expected)
    assert result.sub_scores == {"a": 1.0, "b": pytest.approx(8 / 13)}


def test_guide_example_exact_email_and_fuzzy_name_averaged():
    spec = multi(
        "(name + email) / 2",
        {
            "name": similarity("fuzzy_match", "{{ sample.output_json.name }}", "{{ item.name }}"),
            "email": string_check("{{ sample.output_json.email }}", "{{ item.email }}"),
        },
    )
    item = {"name": "John Doe", "email": "john.doe@gmail.com"}
    right_email = json.dumps({"name": "Jon Doe", "email": "john.doe@gmail.com"})
    wrong_email = json.dumps({"name": "John Doe", "email": "john@gmail.com"})
    grader = parse_grader(spec)
    # "Jon Doe" vs "John Doe": one deletion over 15 characters -> 14/15.
    assert grader.grade(make_sample(right_email), item).score == pytest.approx((14 / 15 + 1) / 2)
    assert grader.grade(make_sample(wrong_email), item).score == 0.5


def test_a_multi_grader_given_one_grader_object_names_it_by_its_name():
    spec = {
        "type": "multi",
        "name": "m",
        "graders": string_check("Paris", "Paris", name="city"),
        "calculate_output": "city * 2",
    }
    grader = parse_grader(spec)
    assert grader.grade(make_sample(""), {}).score == 2.0
    assert grader.spec["graders"] == {"city": string_check("Paris", "Paris", name="city")}  # normalised


def test_a_formula_that_fails_when_evaluated_is_other_error_and_scores_zero():
    result = parse_grader(multi("a / (b - b)")).grade(make_sample("Paris"), {"answer": "Paris"})
    assert (result.score, result.errors) == (0.0, {"other_error": True})
    assert "division by zero" in result.messages[0]


def test_formulas_that_do_not_parse_or_name_unknown_graders_are_refused_with_the_field_path():
    with pytest.raises(GraderError, match=r"grader\.calculate_output: 'a \+\+ \* b' does not parse"):
        parse_grader(multi("a ++ * b"))
    with pytest.raises(GraderError, match=r"grader\.calculate_output: 'a \+ c' names 'c', which is not one of"):
        parse_grader(multi("a + c"))
    for formula in ("__import__('os')", "a.__class__", "a if b else 0", "[a][0]", "a < b", "a % 2", "pow(a, 2)"):
        with pytest.raises(GraderError, match=r"grader\.calculate_output"):
            parse_grader(multi(formula))


# ---------------------------------------------------------------------------------------------------------------
# Validation: every problem at once, each with its field path.


def test_an_invalid_spec_reports_every_problem_with_its_field_path():
    spec = {
        "type": "multi",
        "name": "combined",
        "graders": {
            "answer": {"type": "string_check", "name": "answer", "input": "{{ output }}", "operation": "equals"},
            "judge": {
                "type": "score_model",
                "name": "judge",
                "model": "m",
                "input": [{"role": "critic"}],
                "range": [1, 0],
            },
            "nested": {"type": "multi", "name": "n", "graders": {}, "calculate_output": "1"},
        },
        "calculate_output": "answer + judge + missing",
        "pass_threshold": 0.5,
    }
    with pytest.raises(GraderError) as raised:
        parse_grader(spec)
    problems = raised.value.problems
    expected = [
        "grader.pass_threshold: is not a field of a multi grader",
        "grader.graders.answer.input: {{ output }}: the namespace must be item or sample, not 'output'",
        "grader.graders.answer.reference: is required",
        "grader.graders.answer.operation: 'equals' is not one of eq, ne, like, ilike",
        "grader.graders.judge.input[0].role: 'critic' is not one of user, assistant, system, developer",
        "grader.graders.judge.input[0].content: is required",
        "grader.graders.judge.range: the low end must be below the high end",
        "grader.graders.nested: a multi grader cannot contain another multi grader",
        "grader.calculate_output: 'answer + judge + missing' names 'missing'",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in problems), (line, problems)
    assert len(problems) == len(expected)
    assert str(raised.value).startswith(f"{len(expected)} problems with the grader:\n- grader.pass_threshold")


def test_label_model_graders_and_unknown_types_are_refused():
    with pytest.raises(GraderError, match=r"grader\.type: label_model graders are for evals"):
        parse_grader(
            {"type": "label_model", "name": "l", "input": [], "labels": [], "passing_labels": [], "model": "m"}
        )
    with pytest.raises(GraderError, match=r"grader\.type: 'regex' is not one of string_check, text_similarity"):
        parse_grader({"type": "regex", "name": "r"})
    with pytest.raises(GraderError, match=r"rewards\.type: missing is not one of"):
        parse_grader({"name": "r"}, where="rewards")


def test_python_graders_can_be_refused_anywhere_in_the_tree():
    spec = multi("a + p", {"a": string_check("x", "x"), "p": python("def grade(s, i):\n    return 1.0\n")})
    with pytest.raises(GraderError, match=r"^grader\.graders\.p\.type: python graders are not enabled on this server"):
        parse_grader(spec, allow_python=False)
    assert parse_grader(spec, allow_python=True).type == "multi"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def grade(sample, item)\n    return 1.0\n", r"grader\.source: does not compile: .* \(line 1"),
        ("def score(sample, item):\n    return 1.0\n", r"grader\.source: defines no top-level `def grade"),
        ("def grade(sample):\n    return 1.0\n", r"grader\.source: line 1: grade must take exactly two arguments"),
        (
            "x = 1\n" + "#" * (256 * 1024) + "\ndef grade(s, i): return 1\n",
            r"grader\.source: is 256 KB; .* at most 256 KB",
        ),
    ],
)
def test_python_source_is_checked_at_validation(source, message):
    with pytest.raises(GraderError, match=message):
        parse_grader(python(source))


# ---------------------------------------------------------------------------------------------------------------
# python graders in their sandbox.

GRADER = """
import os, time

def grade(sample, item):
    kind = item.get("kind", "ok")
    if kind == "ok":
        return 1.0 if sample["output_text"] == item["answer"] else 0.0
    if kind == "raise":
        raise ValueError("the answer key is broken")
    if kind == "spin":
        while True:
            pass
    if kind == "sleep":
        time.sleep(60)
    if kind == "nan":
        return float("nan")
    if kind == "write_outside":
        with open(item["path"], "w") as f:
            f.write("escaped")
        return 1.0
    if kind == "write_inside":
        with open("scratch.txt", "w") as f:
            f.write(os.getcwd())
        with open("scratch.txt") as f:
            return 0.5 if f.read() == os.getcwd() else 0.0
    if kind == "connect":
        import socket
        socket.create_connection(("127.0.0.1", item["port"]), timeout=2)
        return 1.0
    if kind == "memory":
        data = bytearray(item["bytes"])
        return 1.0
"""


def sandbox_leftovers() -> tuple[set[str], list]:
    """The sandbox temp dirs there are, and this process's sandbox workers still running (other children, such as
    the test session's Ray, are not the sandbox's)."""
    import psutil

    dirs = set(glob.glob(os.path.join(tempfile.gettempdir(), "rayft-grader-*")))
    workers = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any(arg.endswith("grader_sandbox.py") for arg in child.cmdline()):
                workers.append(child)
        except psutil.NoSuchProcess:
            pass
    return dirs, workers


def test_python_grader_scores_and_its_run_response_validates():
    body = run_grader(python(GRADER), "Paris", {"answer": "Paris"})
    assert body["reward"] == 1.0
    assert body["metadata"]["type"] == "python" and body["metadata"]["errors"]["python_grader_runtime_error"] is False
    validates_as_openai_response(body)
    assert run_grader(python(GRADER), "Lyon", {"answer": "Paris"})["reward"] == 0.0


def test_a_batch_survives_graders_that_raise_spin_sleep_or_return_nan():
    dirs_before, _ = sandbox_leftovers()
    kinds = ["ok", "raise", "ok", "spin", "ok", "sleep", "nan", "ok"]
    items = [{"kind": k, "answer": "Paris"} for k in kinds]
    results = grade_batch(
        parse_grader(python(GRADER)), ["Paris"] * len(kinds), items, timeout_s=1.0, failure_score=-1.0
    )
    assert [r.score for r in results] == [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0]
    raised, spun, slept, nan = results[1], results[3], results[5], results[6]
    assert raised.errors["python_grader_runtime_error"] is True
    assert "ValueError: the answer key is broken" in str(raised.errors["python_grader_runtime_error_details"])
    for stopped in (spun, slept):
        assert stopped.errors["unresponsive_reward_error"] is True
        assert "did not return within 1 s" in str(stopped.errors["python_grader_runtime_error_details"])
        assert stopped.execution_time < 5
    assert "must return a finite number" in str(nan.errors["python_grader_runtime_error_details"])
    assert count_errors(results) == {
        "python_grader_runtime_error": 4,
        "unresponsive_reward_error": 2,
        "samples_with_errors": 4,
    }
    dirs_after, children = sandbox_leftovers()
    assert dirs_after <= dirs_before, "the sandbox temp dirs are deleted"
    assert children == [], "every grader process was stopped"


def test_a_grader_cannot_write_outside_its_temp_dir_but_can_inside():
    outside = os.path.join(tempfile.gettempdir(), f"rayft-escape-{uuid.uuid4().hex}.txt")
    items = [{"kind": "write_outside", "path": outside}, {"kind": "write_inside"}]
    results = grade_batch(parse_grader(python(GRADER)), ["", ""], items, timeout_s=10, failure_score=0.0)
    assert not os.path.exists(outside)
    assert results[0].errors["python_grader_runtime_error"] is True
    assert "outside the grader's temp dir" in str(results[0].errors["python_grader_runtime_error_details"])
    assert (results[1].score, results[1].ok) == (0.5, True)


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    yield server
    server.close()


def test_a_grader_cannot_open_a_connection(listener):
    port = listener.getsockname()[1]
    result = parse_grader(python(GRADER)).grade(make_sample(""), {"kind": "connect", "port": port}, timeout_s=10)
    assert result.errors["python_grader_runtime_error"] is True
    assert "the network is not allowed" in str(result.errors["python_grader_runtime_error_details"])
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing connected


def test_a_grader_over_its_memory_limit_fails_alone():
    grader = parse_grader(python(GRADER), sandbox_limits=grader_sandbox.SandboxLimits(memory_mb=300))
    items = [{"kind": "memory", "bytes": 1 << 30}, {"kind": "ok", "answer": "x"}]
    results = grade_batch(grader, ["x", "x"], items, timeout_s=10, failure_score=0.0)
    assert "MemoryError" in str(results[0].errors["python_grader_runtime_error_details"])
    assert "300 MiB" in str(results[0].errors["python_grader_runtime_error_details"])
    assert (results[1].score, results[1].ok) == (1.0, True)


def test_the_kernel_enforced_layers_hold_without_the_audit_hook(listener):
    """Landlock and the network namespace stop what the audit hook would (code using ctypes gets past a hook)."""
    probe = grader_sandbox.probe_sandbox()
    if not any(layer.startswith("landlock") for layer in probe["isolation"]):
        pytest.skip(f"this kernel gives the sandbox no Landlock: {probe['isolation']}")
    outside = os.path.join(tempfile.gettempdir(), f"rayft-escape-{uuid.uuid4().hex}.txt")
    payloads = [
        ({}, {"kind": "write_outside", "path": outside}),
        ({}, {"kind": "connect", "port": listener.getsockname()[1]}),
    ]
    outcomes, _ = grader_sandbox.run_in_sandbox(GRADER, payloads, audit_hook=False)
    assert [o.error for o in outcomes] == ["runtime", "runtime"]
    assert not os.path.exists(outside)
    assert "Permission denied" in str(outcomes[0].details)
    with pytest.raises(TimeoutError):
        listener.accept()


def test_a_worker_started_by_root_runs_as_nobody_when_the_python_install_allows(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("not root: the worker already runs as this user")
    readable = [p for p in (sys.executable, shutil.which("python3"), "/usr/bin/python3") if p and os.path.exists(p)]
    source = "import os\n\ndef grade(sample, item):\n    return float(os.getuid())\n"
    for interpreter in readable:
        monkeypatch.setattr(sys, "executable", interpreter)
        outcomes, isolation = grader_sandbox.run_in_sandbox(source, [({}, {})])
        if "uid nobody" in isolation:
            assert outcomes[0].score == 65534.0
            return
    pytest.skip(f"no Python install here is readable by other users ({readable}): the worker stays root")


def test_a_grader_whose_source_fails_to_load_fails_every_sample_with_the_reason():
    grader = parse_grader(python("import no_such_module_here\n\ndef grade(sample, item):\n    return 1.0\n"))
    results = grade_batch(grader, ["a", "b"], [{}, {}], timeout_s=5, failure_score=0.0)
    for r in results:
        assert r.errors["python_grader_runtime_error"] is True
        assert "No module named 'no_such_module_here'" in str(r.errors["python_grader_runtime_error_details"])


# ---------------------------------------------------------------------------------------------------------------
# score_model graders against a real OpenAI-compatible server on 127.0.0.1.


class _ChatServer(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions with the mark its prompt carries ("mark: 0.7"), or with no number."""

    requests: list[dict] = []
    keys: list[str | None] = []  # each request's Authorization header

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        type(self).keys.append(self.headers.get("Authorization"))
        prompt = body["messages"][-1]["content"]
        if "mark:" in prompt:
            mark = prompt.split("mark:")[1].split()[0]
            content = json.dumps({"steps": [{"description": "read", "conclusion": "ok"}], "result": float(mark)})
        else:
            content = "I would rather not say."
        reply = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _ChatServer.requests, _ChatServer.keys = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _ChatServer.requests
    server.shutdown()
    server.server_close()


def judge(score_range: list | None = None) -> dict:
    spec = {
        "type": "score_model",
        "name": "judge",
        "model": "judge-model",
        "input": [
            {"role": "developer", "content": "Grade the answer from 0 to 1."},
            {
                "role": "user",
                "content": "Answer: {{ sample.output_text }} (expected {{ item.answer }}) mark: {{ item.mark }}",
            },
        ],
        "sampling_params": {"temperature": 0, "seed": 7, "max_completions_tokens": 64},
    }
    if score_range is not None:
        spec["range"] = score_range
    return spec


def test_score_model_renders_its_messages_calls_the_model_and_reads_its_score(chat_server):
    base_url, requests = chat_server
    client = openai_compatible_client(base_url, timeout_s=10, max_retries=0)
    body = run_grader(judge(), "Paris", {"answer": "Paris", "mark": 0.7}, score_model_client=client)
    assert body["reward"] == pytest.approx(0.7)
    validates_as_openai_response(body)
    assert body["metadata"]["token_usage"] == 42
    assert body["model_grader_token_usage_per_model"] == {
        "judge-model": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42, "cached_tokens": 0}
    }
    sent = requests[-1]
    assert sent["model"] == "judge-model"
    assert sent["messages"] == [
        {"role": "system", "content": "Grade the answer from 0 to 1."},
        {"role": "user", "content": "Answer: Paris (expected Paris) mark: 0.7"},
    ]
    assert (sent["temperature"], sent["seed"], sent["max_completion_tokens"]) == (0, 7, 64)
    assert sent["response_format"]["json_schema"]["schema"]["required"] == ["steps", "result"]


def test_score_model_clamps_to_its_range_and_flags_a_reply_without_a_number(chat_server):
    base_url, _ = chat_server
    grader = parse_grader(judge([1, 7]), score_model_client=openai_compatible_client(base_url, max_retries=0))
    items = [{"answer": "Paris", "mark": 9}, {"answer": "Paris", "mark": 4.5}, {"answer": "Paris"}]
    results = grade_batch(grader, ["Paris"] * 3, items, timeout_s=10, failure_score=-1.0)
    assert results[0].score == 7.0  # truncated to the range
    assert results[1].score == 4.5
    # {{ item.mark }} is missing from the third item: no request, an invalid variable.
    assert results[2].errors == {"invalid_variable_error": True} and results[2].score == -1.0
    no_mark = {**judge(), "input": [{"role": "user", "content": "Answer: {{ sample.output_text }}"}]}
    body = run_grader(no_mark, "Paris", {}, score_model_client=openai_compatible_client(base_url, max_retries=0))
    assert body["reward"] == 0.0 and body["metadata"]["errors"]["model_grader_parse_error"] is True
    validates_as_openai_response(body)


def test_score_model_without_a_reachable_model_is_a_server_error_not_a_crash():
    body = run_grader(judge(), "Paris", {"answer": "Paris", "mark": 1})
    assert body["metadata"]["errors"]["model_grader_server_error"] is True
    assert (
        "no client reaches the model 'judge-model'" in body["metadata"]["errors"]["model_grader_server_error_details"]
    )
    dead = openai_compatible_client("http://127.0.0.1:9/v1", timeout_s=2, max_retries=0)
    body = run_grader(judge(), "Paris", {"answer": "Paris", "mark": 1}, score_model_client=dead)
    assert body["reward"] == 0.0 and body["metadata"]["errors"]["model_grader_server_error"] is True
    validates_as_openai_response(body)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"steps": [{"description": "1 of 2", "conclusion": "3"}], "result": 0.25}', 0.25),
        ('```json\n{"result": 1}\n```', 1.0),
        ("0.8", 0.8),
        ("Score: 0.8.", 0.8),
        ("I give it 8/10", None),  # two numbers: ambiguous
        ("no idea", None),
        ('{"result": "high"}', None),
    ],
)
def test_parse_model_score(reply, expected):
    assert parse_model_score(reply) == expected


# ---------------------------------------------------------------------------------------------------------------
# grade_batch and the run response.


def test_grade_batch_gives_failure_score_to_failed_samples_only_and_never_raises_for_them():
    grader = parse_grader(multi("a + b"))
    results = grade_batch(grader, ["Paris", "Paris"], [{"answer": "Paris"}, {}], timeout_s=5, failure_score=-0.5)
    assert results[0].score == pytest.approx(1 + 8 / 13) and results[0].ok
    assert results[1].score == -0.5 and results[1].errors == {"invalid_variable_error": True}
    with pytest.raises(ValueError, match="2 samples but 1 items"):
        grade_batch(grader, ["a", "b"], [{}], timeout_s=5, failure_score=0.0)


def test_run_grader_body_has_every_openai_field_and_validates():
    body = run_grader(multi("0.5 * a + 0.5 * b"), "Paris", {"answer": "Paris"})
    validates_as_openai_response(body)
    assert set(body) == {"reward", "metadata", "sub_rewards", "model_grader_token_usage_per_model"}
    assert body["sub_rewards"] == {"a": 1.0, "b": pytest.approx(8 / 13)}
    assert set(body["metadata"]["errors"]) == {
        "formula_parse_error",
        "invalid_variable_error",
        "model_grader_parse_error",
        "model_grader_refusal_error",
        "model_grader_server_error",
        "model_grader_server_error_details",
        "other_error",
        "python_grader_runtime_error",
        "python_grader_runtime_error_details",
        "python_grader_server_error",
        "python_grader_server_error_type",
        "sample_parse_error",
        "truncated_observation_error",
        "unresponsive_reward_error",
    }
    assert math.isfinite(body["metadata"]["execution_time"]) and body["metadata"]["execution_time"] >= 0
    with pytest.raises(GraderError):
        run_grader({"type": "string_check", "name": "x"}, "Paris")


def test_a_job_files_score_model_grader_reaches_its_server_with_the_key_from_the_environment(chat_server, monkeypatch):
    from rayft.training.config import RlConfig
    from rayft.training.rewards import reward_sources, score_batch

    base_url, requests = chat_server
    rl = RlConfig.model_validate({"grader": judge(), "score_model": {"base_url": base_url, "api_key_env": "JUDGE_KEY"}})
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="names JUDGE_KEY, which is not set: export it"):
        reward_sources(rl)  # the driver refuses before any training
    monkeypatch.setenv("JUDGE_KEY", "sk-test-123")
    assert reward_sources(rl) == {}
    items = [{"answer": "Paris", "mark": 0.9}, {"answer": "Paris", "mark": 0.2}]
    scores = score_batch(rl.model_dump(), ["Paris", "Rome"], [[1], [2]], items, {})
    assert scores.rewards.tolist() == pytest.approx([0.9, 0.2]) and scores.failures == 0
    assert _ChatServer.keys == ["Bearer sk-test-123"] * 2 and {r["model"] for r in requests} == {"judge-model"}
    assert "sk-test-123" not in json.dumps(rl.model_dump())  # the key never enters the config (or the run's job.yaml)


@pytest.mark.parametrize(
    ("rl", "words"),
    [
        ({"grader": judge()}, "set training.rl.score_model.base_url"),
        (
            {"grader": {"type": "multi", "name": "m", "graders": {"j": judge()}, "calculate_output": "j"}},
            "score_model.base_url",
        ),
        ({"grader": judge(), "score_model": {"base_url": "127.0.0.1:8000"}}, "is not an http(s) URL"),
        (
            {"grader": judge(), "score_model": {"base_url": "http://x/v1", "api_key_env": "sk-live-abc"}},
            "not an environment variable's name",
        ),
        (
            {
                "grader": {"type": "string_check", "name": "s", "input": "a", "reference": "a", "operation": "eq"},
                "score_model": {"base_url": "http://x/v1"},
            },
            "applies to a grader with a score_model grader in it",
        ),
    ],
)
def test_score_model_settings_errors(rl, words):
    from rayft.training.config import RlConfig

    with pytest.raises(ValueError, match=re.escape(words)):
        RlConfig.model_validate(rl)
