"""The CLI as a user runs it: `rayft data inspect` and `rayft demo` in a fresh process."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT, chat, free_port, rayft_cli, write_jsonl

RAYFT = [sys.executable, "-m", "rayft"]


def rayft(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYFT, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_malformed_jsonl_is_reported_with_file_and_line(ray_local, tmp_path):
    write_jsonl(
        tmp_path / "tickets.jsonl",
        [
            chat("hi", "hello"),
            '{"messages": [',
            chat("a", "b"),
            {"messages": [{"role": "user", "content": "only a question"}]},
        ],
    )
    job = tmp_path / "job.yaml"
    job.write_text("# rayft data inspect job.yaml\ndata:\n  train: tickets.jsonl\n")
    r = rayft_cli("data", "inspect", str(job))  # on the suite's Ray
    assert r.returncode == 1
    assert "tickets.jsonl:2: invalid JSON" in r.stderr
    assert "tickets.jsonl:4: the conversation has no assistant message" in r.stderr
    assert "2 bad rows found" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.cluster  # the real quickstart data through the real tokenizer: a user's first command, end to end
@pytest.mark.slow
def test_data_inspect_json_on_the_quickstart():
    r = rayft("data", "inspect", "configs/quickstart.yaml", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    repeat = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())["data"]["repeat"][
        "knowledge_train.jsonl"
    ]
    assert report["splits"]["train"]["examples"] == 1200 + repeat * 200  # tickets + the facts, repeated
    assert report["splits"]["eval"]["examples"] == 170 + 50
    assert report["splits"]["train"]["packing_efficiency"] > 0.85


@pytest.mark.cluster  # the real tool data through the real tokenizer
@pytest.mark.slow
def test_data_inspect_marks_a_tool_rows_call_trained_and_its_schemas_and_results_masked():
    r = rayft("data", "inspect", "configs/quickstart-tools.yaml", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["splits"]["train"]["bad_rows"] == 0 and report["splits"]["train"]["examples"] == 400
    pieces = [p for example in report["splits"]["train"]["rendered_examples"] for p in example]
    trained = "".join(p["text"] for p in pieces if p["trained"])
    masked = "".join(p["text"] for p in pieces if not p["trained"])
    assert '<tool_call>\n{"name": "' in trained and "</tool_call><|im_end|>" in trained
    assert "<tools>" in masked and "<tools>" not in trained and "<tool_response>" not in trained


@pytest.mark.cluster  # the real SmolLM2 through the whole demo
@pytest.mark.slow
def test_demo_runs_inspect_base_eval_train_and_finetuned_eval(tmp_path):
    """The demo path on the real SmolLM2 with few steps and a sample of the eval rows: on the ticket task the
    finetuned model must already beat the base model (reference perplexity, token F1). The facts
    need many more steps (early on the model answers them in ticket JSON), so that split is only reported."""
    r = rayft(
        "demo",
        "configs/quickstart.yaml",
        "--set",
        "training.max_steps=3",  # 3 steps already lift ticket token F1 from ~0.1 to ~0.5 (2 cores, fp32)
        "--set",
        "eval.max_rows=16",
        "--set",
        "eval.batch_size=8",  # two batches, so both eval replicas generate
        "--set",
        f"run.storage_path={tmp_path}",
        "--set",
        f"serve.port={free_port()}",
        timeout=900,  # no terminal: the demo ends after its last stage
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "rows read" in out and "packing efficiency" in out
    for stage in ("data inspect", "base eval", "train", "finetuned eval", "serve", "total"):
        assert stage in out.split("stage times")[-1]
    report = json.loads((tmp_path / "quickstart" / "eval" / "report.json").read_text())
    assert report["rows"] == 16 and set(report["models"]) == {"base", "finetuned"}
    assert set(report["splits"]) == {"eval", "knowledge_eval"}
    tickets = report["splits"]["eval"]
    assert tickets["finetuned"]["perplexity"] < tickets["base"]["perplexity"]
    assert tickets["finetuned"]["token_f1"] > tickets["base"]["token_f1"]
    assert (tmp_path / "quickstart" / "final" / "config.json").is_file()
    # the loss curve at the end of training: first loss, one block per step, last loss, and the plot's path
    assert re.search(r"loss +\d+\.\d+ [▁▂▃▄▅▆▇█]{3} \d+\.\d+  \(plot: .*quickstart/loss\.png\)", out), out
    assert "report:" in out and "report.md" in out
    # stage 5: the finetuned model answered a real HTTP request, and the printed examples name the endpoint
    assert "asked over HTTP" in out and "reply:" in out
    assert "curl -s http://127.0.0.1:" in out and "client.chat.completions.create(model='quickstart'" in out
    assert "endpoint stopped" in out
