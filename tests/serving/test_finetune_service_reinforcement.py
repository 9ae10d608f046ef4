"""Reinforcement jobs on the fine-tuning API, without a cluster: how OpenAI's `method: {type: reinforcement,
reinforcement: {grader, hyperparameters}}` becomes a GRPO job file (objective grpo, training.rl.grader, "auto" from
the template), every request this server cannot honour as a 400 naming its field, the template's training.rl, the
rows of a reinforcement job's file (prompt rows, file:line) and its step events carrying the reward. The same
requests over HTTP with the openai client are in test_serving_files.py (its endpoint hosts them)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers import chat, write_jsonl

OWNER = "b" * 64
TEMPLATE = {
    "training": {"lr": 1e-3, "epochs": 2, "global_batch_size": 8, "micro_batch_size": 4, "eval_every_steps": 5,
                 "rl": {"samples_per_prompt": 4, "max_new_tokens": 16, "eval_samples": 3}},
    "scaling": {"num_workers": 2},
}  # fmt: skip
STRING_CHECK = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}", "operation": "eq"}  # fmt: skip
SIMILAR = {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
           "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}  # fmt: skip
MULTI = {"type": "multi", "name": "both", "calculate_output": "0.5 * exact + 0.5 * close",
         "graders": {"exact": STRING_CHECK, "close": SIMILAR}}  # fmt: skip
PYTHON = {"type": "python", "name": "py", "source": "def grade(sample, item):\n    return 1.0\n"}
SCORE_MODEL = {"type": "score_model", "name": "judge", "model": "gpt-4o-mini",
               "input": [{"role": "user", "content": "Score {{sample.output_text}}"}]}  # fmt: skip


def service(tmp_path: Path, **finetune):
    from rayft.serving.config import FinetuneConfig
    from rayft.serving.files import FileStore
    from rayft.serving.finetune import FinetuneService, ServedBase

    cfg = FinetuneConfig(storage_path=str(tmp_path / "store"), **({"job": TEMPLATE} | finetune))
    return FinetuneService(cfg, FileStore(cfg), ServedBase("tiny", str(tmp_path / "model"), None, ("tiny",)),
                           lambda *a: None)  # fmt: skip


def reinforcement(grader: dict | None = None, **hp) -> dict:
    return {"type": "reinforcement", "reinforcement": {"grader": grader or STRING_CHECK, "hyperparameters": hp}}


def body(**fields):
    """A create request as the HTTP layer parses it: a bad field is the 400 the client gets (validation_error)."""
    from pydantic import ValidationError

    from rayft.serving.openai_api import FineTuningJobCreate, validation_error

    try:
        return FineTuningJobCreate.model_validate({"model": "tiny", "training_file": "file-x"} | fields)
    except ValidationError as e:
        raise validation_error(e) from None


def refused(svc, **fields):
    """The 400 a create request gets (before any file is looked at): (param, message)."""
    from rayft.serving.openai_api import ApiError

    with pytest.raises(ApiError) as e:
        svc.resolve(body(**fields))
    assert e.value.status == 400, e.value.message
    return e.value.param, e.value.message


def upload(svc, name: str, rows: list, owner: str = OWNER) -> str:
    up = svc.files.begin(owner)
    up.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode())
    return up.commit(name, "fine-tune").id


def prompt(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}], "answer": answer}


def test_a_reinforcement_request_becomes_a_grpo_job_file_with_its_grader_and_auto_takes_the_template(tmp_path):
    svc = service(tmp_path)
    hp, job = svc.resolve(body(method=reinforcement()))
    assert hp == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1.0, "eval_interval": 5,
                  "eval_samples": 3}  # fmt: skip
    t = job["training"]
    assert (t["objective"], t["method"], t["epochs"], t["global_batch_size"], t["lr"]) == ("grpo", "lora", 2, 8, 1e-3)
    assert t["rl"] == {"samples_per_prompt": 4, "max_new_tokens": 16, "eval_samples": 3, "grader": STRING_CHECK}
    assert job["data"] == {"packing": False, "format": "prompt"}  # prompt rows, each sampled on its own

    given = reinforcement(MULTI, n_epochs=3, batch_size=6, learning_rate_multiplier=2, eval_interval=2,
                          eval_samples=4, compute_multiplier="auto", reasoning_effort="default")  # fmt: skip
    hp, job = svc.resolve(body(method=given, validation_file="file-v", seed=9))
    t = job["training"]
    assert hp == {"n_epochs": 3, "batch_size": 6, "learning_rate_multiplier": 2.0, "eval_interval": 2,
                  "eval_samples": 4}  # fmt: skip
    assert (t["epochs"], t["global_batch_size"], t["micro_batch_size"], t["eval_every_steps"]) == (3, 6, 3, 2)
    assert t["lr"] == pytest.approx(2e-3) and t["seed"] == 9 and job["data"]["seed"] == 9
    assert t["rl"]["eval_samples"] == 4 and t["rl"]["grader"] == MULTI and t["rl"]["samples_per_prompt"] == 4

    from rayft.serving.config import template_job

    assert template_job(job).training.rl is not None  # the job file `rayft train` runs is valid as it stands
    # the template's training.rl is for reinforcement jobs only: a supervised job's file has none
    _, sft = svc.resolve(body())
    assert sft["training"]["objective"] == "sft" and "rl" not in sft["training"]


def test_the_job_object_echoes_the_method_with_its_grader_and_resolved_hyperparameters(tmp_path):
    svc = service(tmp_path)
    train = upload(svc, "prompts.jsonl", [prompt("2+2?", "4")] * 8)
    shown = svc.create(OWNER, body(training_file=train, method=reinforcement(STRING_CHECK, n_epochs=4)))
    resolved = {"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 1.0, "eval_interval": 5, "eval_samples": 3}
    method = {"type": "reinforcement", "reinforcement": {"grader": STRING_CHECK, "hyperparameters": resolved}}
    assert shown["method"] == method and shown["status"] == "validating_files"
    assert shown["hyperparameters"] == {"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 1.0, "beta": None}
    assert svc.get(OWNER, shown["id"])["method"] == method
    assert svc.list(OWNER, None, 10)["data"][0]["method"] == method
    rec = svc.store._read(OWNER, shown["id"])
    assert rec is not None and rec.job_file["training"]["rl"]["grader"] == STRING_CHECK

    from openai.types.fine_tuning import FineTuningJob  # the official client reads it

    job = FineTuningJob.model_validate(shown)
    assert job.method is not None and job.method.reinforcement is not None
    assert job.method.type == "reinforcement" and job.method.reinforcement.grader.type == "string_check"
    assert job.method.reinforcement.hyperparameters and job.method.reinforcement.hyperparameters.eval_samples == 3


def test_hyperparameters_this_server_cannot_honour_are_400s_naming_the_field(tmp_path):
    svc = service(tmp_path, max_epochs=10)
    where = "method.reinforcement.hyperparameters"
    cases = [
        (dict(compute_multiplier=2), f"{where}.compute_multiplier", "has no compute multiplier"),
        (dict(reasoning_effort="high"), f"{where}.reasoning_effort", "no reasoning effort to set"),
        (dict(eval_interval=3), f"{where}.eval_interval", "this job has none; give a validation_file"),
        (dict(eval_samples=2), f"{where}.eval_samples", "this job has none; give a validation_file"),
        (dict(batch_size=5), f"{where}.batch_size", "cannot be split evenly over this server's 2 training workers"),
        (dict(n_epochs=11), f"{where}.n_epochs", "serve.finetune.max_epochs"),
        (dict(n_epochs=0), f"{where}.n_epochs", "greater than or equal to 1"),
        (dict(learning_rate_multiplier=-1), f"{where}.learning_rate_multiplier", "greater than 0"),
        (dict(eval_interval="sometimes"), f"{where}.eval_interval", "Input should be 'auto'"),
    ]
    for hp, param, words in cases:
        got, message = refused(svc, method=reinforcement(**hp))
        assert got.startswith(param) and words in message, (hp, got, message)  # a union's member may follow
    assert refused(svc, method={"type": "reinforcement"})[0] == "method"  # no grader at all
    got, message = refused(svc, method={"type": "reinforcement", "reinforcement": {"grader": "exact"}})
    assert got == "method.reinforcement.grader" and "valid dictionary" in message


def test_graders_are_checked_at_create_time_and_each_refusal_names_its_field(tmp_path):
    svc = service(tmp_path)
    at = "method.reinforcement.grader"
    param, message = refused(svc, method=reinforcement(PYTHON))
    assert param == f"{at}.type" and "serve.finetune.python_graders is false" in message
    inner = MULTI | {"graders": {"exact": STRING_CHECK, "x": PYTHON}, "calculate_output": "exact + x"}
    param, message = refused(svc, method=reinforcement(inner))
    assert param == f"{at}.graders.x.type" and "python graders are not enabled" in message
    judged = MULTI | {"graders": {"judge": SCORE_MODEL}, "calculate_output": "judge"}
    param, message = refused(svc, method=reinforcement(judged))
    assert param == f"{at}.graders.judge.type" and "score_model graders are not supported here" in message
    param, message = refused(svc, method=reinforcement({"type": "label_model", "name": "l"}))
    assert param == f"{at}.type" and "label_model" in message
    # every problem at once, each with its path
    a = {"type": "string_check", "name": "a", "input": "{{sample.output_text}}", "operation": "equals"}
    broken = {"type": "multi", "name": "m", "calculate_output": "a + nope", "graders": {"a": a}}
    param, message = refused(svc, method=reinforcement(broken))
    assert message.startswith("invalid grader: ") and param.startswith(f"{at}.")
    for part in (f"{at}.graders.a.reference: is required", f"{at}.graders.a.operation: 'equals' is not one of",
                 f"{at}.calculate_output"):  # fmt: skip
        assert part in message, message


def test_python_graders_are_taken_where_the_operator_allows_them(tmp_path):
    svc = service(tmp_path, python_graders=True)
    hp, job = svc.resolve(body(method=reinforcement(PYTHON)))
    assert job["training"]["rl"]["grader"] == PYTHON
    grader = svc.check_grader(PYTHON)
    assert grader.grade("anything").score == 1.0  # in the sandbox (rayft.training.grader_sandbox)
    # score_model stays refused: nothing here reaches a grading model
    from rayft.serving.openai_api import ApiError

    with pytest.raises(ApiError, match=r"grader.type: score_model graders are not supported here.* or python"):
        svc.check_grader(SCORE_MODEL)


def test_the_templates_training_rl_is_checked_and_may_not_hold_the_reward(tmp_path):
    from pydantic import ValidationError

    from rayft.serving.config import FinetuneConfig

    with pytest.raises(ValidationError) as e:
        FinetuneConfig(job={"training": {"rl": {"samples_per_prompt": 1, "grader": STRING_CHECK}}})
    assert "serve.finetune.job.training.rl.grader: each reinforcement job's reward is the grader its request" in str(
        e.value
    )
    with pytest.raises(ValidationError, match=r"serve.finetune.job.training.rl.samples_per_prompt: Input should be"):
        FinetuneConfig(job={"training": {"rl": {"samples_per_prompt": 1}}})
    with pytest.raises(ValidationError, match=r"serve.finetune.job.training.objective is 'grpo': each job's objective"):
        FinetuneConfig(job={"training": {"objective": "grpo"}})
    ok = FinetuneConfig(job={"training": {"rl": {"samples_per_prompt": 2, "temperature": 0.7}}})
    assert ok.python_graders is False  # off unless the operator turns them on


def test_a_reinforcement_jobs_file_takes_prompt_rows_and_names_each_other_row_by_line(tmp_path):
    from rayft.serving.finetune import copy_checked_rows

    svc = service(tmp_path)
    pair = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    rows = [
        prompt("2+2?", "4"),
        {"prompt": "3+3?", "answer": "6"},
        chat("2+2?", "4"),  # a supervised conversation
        pair,
        {"text": "four"},
        '{"messages": [',
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]},
    ]
    f = svc.files.get(OWNER, upload(svc, "rl.jsonl", rows))
    n, bad = copy_checked_rows(svc.files, f, str(tmp_path / "copy.jsonl"), method="reinforcement")
    assert n == 7 and [b.split(": ", 1)[0] for b in bad] == ["rl.jsonl:3", "rl.jsonl:4", "rl.jsonl:5", "rl.jsonl:6"]
    assert "a supervised conversation (it ends with the assistant's answer), not a prompt row" in bad[0]
    assert "method {type: supervised}" in bad[0]
    assert "a preference pair, not a prompt row" in bad[1] and "method {type: dpo}" in bad[1]
    assert "a prompt row needs 'messages'" in bad[2] and "invalid JSON" in bad[3]

    # and the other way round: prompt rows in a supervised or a dpo job
    f = svc.files.get(OWNER, upload(svc, "prompts.jsonl", [prompt("2+2?", "4"), chat("2+2?", "4"), pair]))
    _, bad = copy_checked_rows(svc.files, f, str(tmp_path / "sft.jsonl"), method="supervised")
    assert [b.split(": ", 1)[0] for b in bad] == ["prompts.jsonl:1", "prompts.jsonl:3"]
    assert "a prompt row with no answer to learn: train on prompts with method {type: reinforcement}" in bad[0]
    _, bad = copy_checked_rows(svc.files, f, str(tmp_path / "dpo.jsonl"), method="dpo")
    assert [b.split(": ", 1)[0] for b in bad] == ["prompts.jsonl:1", "prompts.jsonl:2"]
    assert all("not a preference pair" in b for b in bad)


def test_a_reinforcement_job_with_a_bad_row_fails_validation_with_its_line_and_submits_nothing(tmp_path):
    svc = service(tmp_path)
    train = upload(svc, "mixed.jsonl", [prompt("2+2?", "4")] * 8 + [chat("2+2?", "4")])
    job = svc.create(OWNER, body(training_file=train, method=reinforcement()))
    svc._advance(OWNER, job["id"])  # the poller's validation; a good file would go on to the cluster here
    failed = svc.get(OWNER, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_file"
    assert failed["error"]["param"] == "training_file"
    assert "1 of 9 rows are bad" in failed["error"]["message"]
    assert "mixed.jsonl:9: a supervised conversation" in failed["error"]["message"]


def test_step_events_of_a_reinforcement_job_carry_its_reward_and_held_out_reward(tmp_path):
    svc = service(tmp_path)
    train = upload(svc, "prompts.jsonl", [prompt("2+2?", "4")] * 8)
    job = svc.create(OWNER, body(training_file=train, validation_file=train, method=reinforcement(eval_interval=2)))
    rec = svc.store._read(OWNER, job["id"])
    assert rec is not None
    rec.ray_job_id = "rayft-finetune-x"  # as if it went to the cluster and its run logged two steps
    svc.store.save(rec)
    now = time.time()
    Path(rec.run_dir).mkdir(parents=True)
    write_jsonl(Path(rec.run_dir) / "metrics.jsonl", [
        {"event": "start", "step": 0, "total_steps": 2, "time": now},
        {"step": 1, "loss": 0.01, "reward": 0.25, "reward_std": 0.5, "kl": 0.0, "time": now + 1},
        {"step": 2, "loss": 0.02, "reward": 0.75, "reward_std": 0.25, "eval_reward": 0.5, "time": now + 2},
        {"step": 2, "final": True, "eval_reward": 1.0, "eval_completions": 8, "time": now + 3},
    ])  # fmt: skip
    steps = [e for e in svc.events(OWNER, job["id"], None, 100)["data"] if e["type"] == "metrics"]
    assert [e["message"] for e in steps] == [
        "Step 2/2: validation reward=1.0000",
        "Step 2/2: training loss=0.0200, reward=0.7500, validation reward=0.5000",
        "Step 1/2: training loss=0.0100, reward=0.2500",
    ]
    assert steps[0]["data"] == {"step": 2, "eval_reward": 1.0, "total_steps": 2}
    assert steps[1]["data"] == {"step": 2, "train_loss": 0.02, "total_steps": 2, "reward": 0.75, "reward_std": 0.25,
                                "eval_reward": 0.5}  # fmt: skip
    assert steps[2]["data"] == {"step": 1, "train_loss": 0.01, "total_steps": 2, "reward": 0.25, "reward_std": 0.5}
