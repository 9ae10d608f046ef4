"""The fine-tuning service's parts that need no cluster: the job template's checks, how a request's
hyperparameters become the job file, the row checks of an uploaded file (file:line), which models may be
finetuned, and the example in docs/fine-tuning-api.md being the example the demo runs. The jobs themselves
run in test_serving_finetune.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import ROOT, chat, write_jsonl


def service(tmp_path: Path, **finetune):
    from rayft.serving.config import FinetuneConfig
    from rayft.serving.files import FileStore
    from rayft.serving.finetune import FinetuneService, ServedBase

    cfg = FinetuneConfig(storage_path=str(tmp_path / "store"), **finetune)
    base = ServedBase("tiny", str(tmp_path / "model"), None, ("tiny",))
    return FinetuneService(cfg, FileStore(cfg), base, lambda *a: None)


def request(**fields):
    from rayft.serving.openai_api import FineTuningJobCreate

    return FineTuningJobCreate.model_validate({"model": "tiny", "training_file": "file-x"} | fields)


def test_the_job_template_lists_every_setting_it_may_not_hold_at_once():
    from pydantic import ValidationError

    from rayft.serving.config import FinetuneConfig

    with pytest.raises(ValidationError) as e:
        FinetuneConfig(
            job={
                "data": {"train": "mine.jsonl", "packing": True},
                "run": {"storage_path": "/elsewhere"},
                "training": {"method": "full"},
                "serve": {},
            }
        )
    text = str(e.value)
    for part in (
        "serve.finetune.job.data.train: the service sets this itself",
        "serve.finetune.job.run.storage_path: the service sets this itself",
        "serve.finetune.job.training.method is 'full'",
        "serve.finetune.job.serve: not a section",
    ):
        assert part in text
    with pytest.raises(ValidationError, match=r"serve.finetune.job.training.lr: Input should be greater than 0"):
        FinetuneConfig(job={"training": {"lr": 0}})
    with pytest.raises(ValidationError, match="global_batch_size"):
        FinetuneConfig(job={"training": {"global_batch_size": 6}})  # not a multiple of 4 rows x 2 workers


def test_hyperparameters_become_the_job_file_and_auto_takes_the_template(tmp_path):
    from rayft.serving.openai_api import ApiError

    svc = service(tmp_path, job={"training": {"lr": 1e-3, "epochs": 2, "max_steps": 7}, "scaling": {"num_workers": 2}})
    hp, job = svc.resolve(request())
    assert hp == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1.0}
    t = job["training"]
    assert (t["lr"], t["epochs"], t["max_steps"], t["global_batch_size"]) == (1e-3, 2, 7, 8)
    assert job["model"] == {"name": str(tmp_path / "model")} and "data" not in job
    assert job["export"] == {"merge": False}  # final/ is the adapter the endpoint serves

    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 6}}}
    hp, job = svc.resolve(request(method=method, seed=5, hyperparameters={"n_epochs": 9}))  # method wins
    t = job["training"]
    assert hp == {"n_epochs": 3, "batch_size": 6, "learning_rate_multiplier": 1.0}
    assert (t["epochs"], t["global_batch_size"], t["micro_batch_size"], t["seed"]) == (3, 6, 3, 5)
    assert "max_steps" not in t and job["data"]["seed"] == 5  # asked for epochs: the template's steps no longer hold

    hp, job = svc.resolve(request(hyperparameters={"learning_rate_multiplier": 2.5}))
    assert job["training"]["lr"] == pytest.approx(2.5e-3) and hp["learning_rate_multiplier"] == 2.5

    with pytest.raises(ApiError) as e:
        svc.resolve(request(hyperparameters={"batch_size": 5}))
    assert e.value.status == 400 and e.value.param == "hyperparameters.batch_size"
    assert "2 training workers" in e.value.message
    with pytest.raises(ApiError) as e:
        svc.resolve(request(method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 21}}}))
    assert e.value.param == "method.supervised.hyperparameters.n_epochs" and "max_epochs" in e.value.message


def test_an_uploaded_file_is_checked_row_by_row_and_copied_byte_for_byte(tmp_path):
    from rayft.serving.files import LOCAL_OWNER
    from rayft.serving.finetune import copy_checked_rows

    svc = service(tmp_path)
    good = chat("Hi?", "Hello.")
    rows = [good, "", '{"messages": [', {"prompt": "a"}, good, {"messages": [{"role": "user", "content": "x"}]}]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    data = src.read_bytes() + b"\xff\xfe not text\n" + b'{"text": "last line, no newline"}'
    upload = svc.files.begin(LOCAL_OWNER)
    upload.write(data)
    f = upload.commit("mixed.jsonl", "fine-tune")
    rows_seen, bad = copy_checked_rows(svc.files, f, str(tmp_path / "copy.jsonl"))
    assert (tmp_path / "copy.jsonl").read_bytes() == data
    assert rows_seen == 7  # the blank line is no row
    assert [b.split(": ", 1)[0] for b in bad] == ["mixed.jsonl:3", "mixed.jsonl:4", "mixed.jsonl:6", "mixed.jsonl:7"]
    assert "invalid JSON" in bad[0] and "completion" in bad[1] and "not UTF-8" in bad[3]


def test_only_the_served_model_can_be_named_for_fine_tuning(smol_tokenizer, tmp_path):
    from helpers import tiny_llama
    from rayft.serving.config import ServeConfig
    from rayft.serving.spec import ServeError, build_spec

    model = tiny_llama(tmp_path / "m", smol_tokenizer, sharp=True)
    spec = build_spec(str(model), ServeConfig(model_name="tiny", finetune={"models": ["tiny", str(model)]}))
    assert spec.serve.finetune.models == ["tiny", str(model)]
    with pytest.raises(ServeError, match=r"serve.finetune.models: gpt-4o-mini is not the served model \(tiny"):
        build_spec(str(model), ServeConfig(model_name="tiny", finetune={"models": ["tiny", "gpt-4o-mini"]}))


def test_the_documented_example_is_the_one_make_demo_api_runs():
    example = (ROOT / "examples" / "finetune_over_http" / "finetune.py").read_text()
    body = example[example.index("import os") :]
    page = (ROOT / "docs" / "fine-tuning-api.md").read_text()
    assert f"```python\n{body}```" in page
    assert "examples/finetune_over_http/demo.sh" in (ROOT / "Makefile").read_text()


def test_a_job_record_an_earlier_endpoint_stored_loads_as_it_was(tmp_path):
    """job.json as endpoints before the typed records wrote it (no attempt, validation_tries or model_deleted;
    events without their object; an SFT job's hyperparameters without beta) is read, listed and rewritten as it
    was, and a cancel marker beside a record still wins over it."""
    import json

    svc = service(tmp_path)
    owner, job_id, queued_id = "a" * 64, "ftjob-" + "1" * 32, "ftjob-" + "2" * 32
    hp = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
    event = {"id": "ftevent-" + "0" * 32, "created_at": 5, "level": "info", "message": "Created", "data": {},
             "type": "message"}  # fmt: skip
    job = {
        "object": "fine_tuning.job", "id": job_id, "model": "tiny", "created_at": 5, "finished_at": 9,
        "fine_tuned_model": f"ft:tiny::{job_id}", "organization_id": f"key-{owner[:12]}", "result_files": [],
        "status": "succeeded", "validation_file": None, "training_file": "file-x", "hyperparameters": hp,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}, "trained_tokens": 1234,
        "error": None, "seed": 42, "estimated_finish": None, "integrations": [], "metadata": {"team": "a"},
        "user_provided_suffix": None,
    }  # fmt: skip
    rec = {
        "owner": owner, "job": job, "job_file": {"training": {"seed": 42}},
        "files": {"train": {"id": "file-x", "filename": "x.jsonl"}, "eval": None}, "ray_job_id": "rayft-finetune-x",
        "run_dir": str(tmp_path / "store" / "runs" / job_id), "cancel_requested": False, "events": [event],
    }  # fmt: skip
    queued = rec | {"job": job | {"id": queued_id, "status": "queued", "fine_tuned_model": None, "finished_at": None}}
    for r in (rec, queued):
        folder = tmp_path / "store" / "jobs" / owner / r["job"]["id"]
        folder.mkdir(parents=True)
        (folder / "job.json").write_text(json.dumps(r))
    (tmp_path / "store" / "jobs" / owner / queued_id / "cancel").write_text("7")

    shown = svc.get(owner, job_id)
    assert shown == job | {"hyperparameters": hp | {"beta": None}}  # as the API always answered: FineTuningJob's fields
    loaded = svc.store._read(owner, job_id)
    assert loaded is not None and (loaded.attempt, loaded.validation_tries, loaded.model_deleted) == (1, 0, False)
    assert loaded.files.train.filename == "x.jsonl" and loaded.ray_job_id == "rayft-finetune-x"
    assert svc.events(owner, job_id, None, 10)["data"] == [event | {"object": "fine_tuning.job.event"}]
    assert svc.models(owner) == [(f"ft:tiny::{job_id}", owner)]
    assert [j["id"] for j in svc.list(owner, None, 10)["data"]] == [queued_id, job_id]
    cancelled = svc.store._read(owner, queued_id)
    assert cancelled is not None and cancelled.job.status == "cancelled" and cancelled.cancel_requested
    svc.store.save(loaded)  # rewritten by this endpoint: the same fields, read back the same
    again = json.loads((tmp_path / "store" / "jobs" / owner / job_id / "job.json").read_text())
    assert set(rec) <= set(again) and again["job"] == shown and again["events"][0]["id"] == event["id"]
    assert svc.store._read(owner, job_id) == loaded


def test_tool_rows_upload_as_training_reads_them_and_bad_calls_are_named_by_line(tmp_path):
    import json

    from rayft.serving.files import LOCAL_OWNER
    from rayft.serving.finetune import copy_checked_rows

    svc = service(tmp_path)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]

    def row(args: str, name: str = "get_weather") -> dict:
        call = {"id": "c1", "type": "function", "function": {"name": name, "arguments": args}}
        msgs = [{"role": "user", "content": "Paris?"}, {"role": "assistant", "tool_calls": [call]}]
        return {"tools": tools, "messages": msgs}

    answered = row('{"city": "Paris"}')
    answered["messages"] += [
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "assistant", "content": "18C."},
    ]
    rows = [
        row('{"city": "Paris"}'),
        answered,
        row("{city}"),
        row("{}", "get_news"),
        {"messages": answered["messages"]},
    ]
    upload = svc.files.begin(LOCAL_OWNER)
    upload.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    f = upload.commit("tools.jsonl", "fine-tune")
    rows_seen, bad = copy_checked_rows(svc.files, f, str(tmp_path / "copy.jsonl"))
    assert rows_seen == 5
    assert [b.split(": ", 1)[0] for b in bad] == ["tools.jsonl:3", "tools.jsonl:4", "tools.jsonl:5"]
    assert "arguments are not JSON" in bad[0] and "'get_news', which is not among the tools" in bad[1]
    assert "no tools to call" in bad[2]
