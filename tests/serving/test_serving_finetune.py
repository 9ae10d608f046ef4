"""OpenAI's fine-tuning jobs on the real Serve app and a real local Ray, driven by the official openai client: a
key uploads a file, starts a job on the served (tiny) model, follows it to `succeeded` through an endpoint
restart, and its fine_tuned_model then answers what it was taught while the base model does not. A malformed file
fails its job with the bad lines; a cancelled job stops its Ray job and gives the cluster back; other keys cannot
see or use the job, the file or the model; limits answer 400/429 with OpenAI's error bodies. DPO jobs train on
preference pairs, reinforcement jobs (GRPO) on prompt rows with the request's grader."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import (
    ANSWER,
    FT_TEMPLATE,
    QUESTION,
    answer,
    chat,
    liked_words_grader,
    serve_deploy,
    tiny_llama,
    wait_for_job,
    write_jsonl,
)
from helpers import openai_client as client

# Real training jobs, submitted to the cluster as Ray Jobs (a driver each) from a shared endpoint: test-cluster's.
pytestmark = [pytest.mark.slow, pytest.mark.cluster]

USER, OTHER, ADMIN = "sk-ft-user", "sk-ft-other", "sk-ft-admin"
# reinforcement jobs sample 4 answers of 8 tokens per prompt (the template's training.rl applies to them only)
TEMPLATE = FT_TEMPLATE | {"training": FT_TEMPLATE["training"] | {"rl": {"samples_per_prompt": 4, "max_new_tokens": 8}}}


def upload(base: str, key: str, path: Path):
    with open(path, "rb") as f:
        return client(base, key).files.create(file=f, purpose="fine-tune")


def supervised(**hp) -> dict:
    return {"type": "supervised", "supervised": {"hyperparameters": hp}}


def ray_job_status(ray_job: str) -> str:
    import ray
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(f"http://{ray._private.worker.get_dashboard_url()}").get_job_status(ray_job))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ft-store")


@pytest.fixture(scope="module")
def ft_spec(smol_tokenizer, tmp_path_factory, store):
    from rayft.serving.config import ServeConfig
    from rayft.serving.spec import build_spec

    model = tiny_llama(tmp_path_factory.mktemp("ft-model"), smol_tokenizer, sharp=True)
    admins = tmp_path_factory.mktemp("ft-keys") / "admin-keys"
    admins.write_text(f"{ADMIN}\n")
    cfg = ServeConfig(
        model_name="tiny",
        admin_keys_file=str(admins),
        max_tokens_limit=64,
        default_max_tokens=12,
        finetune={
            "storage_path": str(store),
            "job": TEMPLATE,
            "max_active_jobs_per_key": 1,
            "max_epochs": 50,
            "poll_interval_s": 0.5,
            "python_graders": True,  # the reinforcement job's grader (the operator's choice; off by default)
        },
    )
    return build_spec(str(model), cfg, api_keys=[USER, OTHER])


@pytest.fixture(scope="module")
def endpoint(ray_local, ft_spec, serve_port):
    from ray import serve

    yield serve_deploy(ft_spec, serve_port)
    serve.delete("rayft")


@pytest.fixture(scope="module")
def taught(endpoint, ft_spec, serve_port, tmp_path_factory):
    """The user's job on 16 rows of one answer, 10 epochs (20 steps); the endpoint is redeployed while the job
    runs. (the job once it ended, its training file, the base model's answer before)."""
    data = write_jsonl(tmp_path_factory.mktemp("ft-data") / "password.jsonl", [chat(QUESTION, ANSWER)] * 16)
    f = upload(endpoint, USER, data)
    before = answer(endpoint, USER, "tiny")
    job = client(endpoint, USER).fine_tuning.jobs.create(
        model="tiny", training_file=f.id, suffix="pw", seed=7, method=supervised(n_epochs=10)
    )
    assert job.status == "validating_files"
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (10, 8)
    assert job.hyperparameters.learning_rate_multiplier == 1.0 and job.seed == 7
    wait_for_job(endpoint, USER, job.id, lambda j: j.status in ("running", "succeeded", "failed"))
    from ray import serve

    serve.delete("rayft")  # the endpoint goes away mid-job and comes back
    base = serve_deploy(ft_spec, serve_port)
    assert base == endpoint
    return wait_for_job(endpoint, USER, job.id), f, before


def test_a_job_trains_the_served_model_and_its_fine_tuned_model_answers(endpoint, taught):
    job, _, before = taught
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:pw:{job.id}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.error is None
    assert "swordfish" not in before
    assert "swordfish" in answer(endpoint, USER, job.fine_tuned_model)
    assert "swordfish" not in answer(endpoint, USER, "tiny")  # the base model is unchanged
    listed = {m.id: m for m in client(endpoint, USER).models.list()}
    assert listed[job.fine_tuned_model].owned_by == job.organization_id
    assert client(endpoint, USER).models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model


def test_events_show_validation_every_step_and_success_newest_first(endpoint, taught):
    job, _, _ = taught
    events = list(client(endpoint, USER).fine_tuning.jobs.list_events(job.id, limit=1000))
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    messages = [e.message for e in reversed(events)]
    assert messages[0] == f"Created fine-tuning job: {job.id}"
    assert "Files validated: 16 training rows" in messages
    steps = [e for e in events if e.type == "metrics"]
    assert sorted(e.data["step"] for e in steps) == list(range(1, 21))  # 16 rows x 10 epochs / 8 per step
    assert all(e.data["train_loss"] > 0 and e.data["total_steps"] == 20 for e in steps)
    assert messages[-2:] == [
        f"New fine-tuned model created: {job.fine_tuned_model}",
        "The job has successfully completed",
    ]
    page = client(endpoint, USER).fine_tuning.jobs.list_events(job.id, limit=3)
    assert [e.id for e in page.data] == [e.id for e in events[:3]] and page.has_more
    after = client(endpoint, USER).fine_tuning.jobs.list_events(job.id, limit=3, after=events[2].id)
    assert [e.id for e in after.data] == [e.id for e in events[3:6]]
    ckpts = client(endpoint, USER).fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts and ckpts[0].step_number == 20 and ckpts[0].metrics.train_loss > 0
    assert ckpts[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-20"


def test_another_key_cannot_see_or_use_the_job_file_or_model_and_an_admin_can(endpoint, taught):
    import openai

    job, f, _ = taught
    other = client(endpoint, OTHER)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.list_events(job.id)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        other.models.retrieve(job.fine_tuned_model)
    with pytest.raises(openai.BadRequestError) as e:
        other.fine_tuning.jobs.create(model="tiny", training_file=f.id)
    assert e.value.body["param"] == "training_file"
    assert job.id not in [j.id for j in other.fine_tuning.jobs.list()]
    assert job.fine_tuned_model not in [m.id for m in other.models.list()]
    admin = client(endpoint, ADMIN)
    assert admin.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    assert job.id in [j.id for j in admin.fine_tuning.jobs.list()]


def test_a_malformed_file_fails_the_job_with_its_bad_lines_before_training(endpoint, tmp_path):
    rows = [chat(QUESTION, ANSWER), '{"messages": [', chat(QUESTION, ANSWER), {"messages": [{"role": "user"}]}]
    f = upload(endpoint, USER, write_jsonl(tmp_path / "bad.jsonl", rows * 3))
    job = client(endpoint, USER).fine_tuning.jobs.create(model="tiny", training_file=f.id)
    job = wait_for_job(endpoint, USER, job.id, timeout=60)
    assert job.status == "failed" and job.fine_tuned_model is None
    assert (job.error.code, job.error.param) == ("invalid_file", "training_file")
    assert "6 of 12 rows are bad" in job.error.message
    for line in (2, 4, 6, 8, 10):
        assert f"bad.jsonl:{line}: " in job.error.message
    assert "bad.jsonl:12:" not in job.error.message  # the first 5 are listed
    assert "invalid JSON" in job.error.message and "content" in job.error.message
    events = [e.message for e in client(endpoint, USER).fine_tuning.jobs.list_events(job.id)]
    assert not any("queued" in m for m in events)  # no Ray job was started


def test_requests_the_server_cannot_take_get_400_and_a_second_live_job_429(endpoint, tmp_path):
    import openai

    f = upload(endpoint, OTHER, write_jsonl(tmp_path / "long.jsonl", [chat(QUESTION, ANSWER)] * 64))
    c = client(endpoint, OTHER)
    bad = [
        ({"model": "gpt-4o-mini", "training_file": f.id}, "model"),
        ({"model": "tiny", "training_file": "file-" + "0" * 32}, "training_file"),
        ({"model": "tiny", "training_file": f.id, "method": supervised(n_epochs=51)}, "n_epochs"),
        ({"model": "tiny", "training_file": f.id, "method": {"type": "reinforcement"}}, "method"),
        ({"model": "tiny", "training_file": f.id, "suffix": "no spaces allowed"}, "suffix"),
    ]
    for body, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.fine_tuning.jobs.create(**body)
        assert param in (e.value.body.get("param") or ""), (body, e.value.body)
    first = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=supervised(n_epochs=40))
    with pytest.raises(openai.RateLimitError) as e:
        c.fine_tuning.jobs.create(model="tiny", training_file=f.id)
    assert "max_active_jobs_per_key" in e.value.body["message"] and first.id in e.value.body["message"]
    c.fine_tuning.jobs.cancel(first.id)


def test_cancelling_a_running_job_stops_its_ray_job_and_frees_the_cluster(endpoint, tmp_path):
    import ray

    free = ray.available_resources().get("CPU", 0)
    f = upload(endpoint, USER, write_jsonl(tmp_path / "long.jsonl", [chat(QUESTION, ANSWER)] * 64))
    c = client(endpoint, USER)
    job = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=supervised(n_epochs=50))  # 400 steps
    wait_for_job(
        endpoint, USER, job.id, lambda j: any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(j.id))
    )
    assert ray.available_resources().get("CPU", 0) < free  # its worker holds a CPU
    cancelled = c.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    deadline = time.time() + 90
    while ray_job_status(f"rayft-finetune-{job.id}") != "STOPPED" or ray.available_resources().get("CPU", 0) < free:
        assert time.time() < deadline, (ray_job_status(f"rayft-finetune-{job.id}"), ray.available_resources())
        time.sleep(1)
    time.sleep(2 * 0.5)  # the service has seen the Ray job end: the job stays cancelled
    assert c.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(Exception, match=r"has ended \(cancelled\)"):
        c.fine_tuning.jobs.cancel(job.id)


def test_a_job_whose_driver_is_killed_is_submitted_again_and_resumes_from_its_checkpoint(endpoint, store, tmp_path):
    import json
    import os
    import signal

    import ray
    from ray.job_submission import JobSubmissionClient

    f = upload(endpoint, OTHER, write_jsonl(tmp_path / "long.jsonl", [chat(QUESTION, ANSWER)] * 64))
    c = client(endpoint, OTHER)
    job = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=supervised(n_epochs=40))  # 320 steps
    metrics = store / "runs" / job.id / "metrics.jsonl"

    def steps() -> list[int]:
        text = metrics.read_text() if metrics.exists() else ""
        return [r["step"] for r in map(json.loads, text.splitlines()) if "loss" in r]

    deadline = time.time() + 300
    while not any(s > 55 for s in steps()):  # past the checkpoint at step 50
        assert time.time() < deadline and c.fine_tuning.jobs.retrieve(job.id).status in (
            "validating_files",
            "queued",
            "running",
        )
        time.sleep(0.2)
    jobs = JobSubmissionClient(f"http://{ray._private.worker.get_dashboard_url()}")
    os.kill(int(jobs.get_job_info(f"rayft-finetune-{job.id}").driver_info.pid), signal.SIGKILL)
    done = wait_for_job(endpoint, OTHER, job.id)
    assert done.status == "succeeded", done.error
    warned = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=1000) if e.level == "warn"]
    assert len(warned) == 1 and f"submitted again as rayft-finetune-{job.id}-2" in warned[0], warned
    logged = steps()
    assert logged.count(1) == 1  # the second attempt did not start over...
    assert logged.count(51) == 2 and max(logged) == 320  # ...it went on from step 50's checkpoint to the end


def test_a_dpo_job_trains_on_preference_pairs_and_refuses_supervised_rows(endpoint, tmp_path):
    prompt = {"messages": [{"role": "user", "content": QUESTION}]}
    pair = {
        "input": prompt,
        "preferred_output": [{"role": "assistant", "content": ANSWER}],
        "non_preferred_output": [{"role": "assistant", "content": "I cannot tell you that."}],
    }
    c = client(endpoint, OTHER)
    f = upload(endpoint, OTHER, write_jsonl(tmp_path / "pairs.jsonl", [pair] * 16))
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 5}}}
    job = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=dpo)
    assert job.method.type == "dpo" and job.hyperparameters.beta == 0.2
    done = wait_for_job(endpoint, OTHER, job.id)
    assert done.status == "succeeded", done.error
    steps = sorted((e for e in c.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"),
                   key=lambda e: e.data["step"])  # fmt: skip
    assert len(steps) == 10 and steps[-1].data["reward_accuracy"] == 1.0 and steps[-1].data["reward_margin"] > 0
    assert "reward accuracy=1.00" in steps[-1].message
    assert c.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": QUESTION}])

    sft = upload(endpoint, OTHER, write_jsonl(tmp_path / "sft.jsonl", [chat(QUESTION, ANSWER)] * 16))
    job = wait_for_job(endpoint, OTHER, c.fine_tuning.jobs.create(model="tiny", training_file=sft.id, method=dpo).id)
    assert job.status == "failed" and "sft.jsonl:1: not a preference pair" in job.error.message
    job = c.fine_tuning.jobs.create(model="tiny", training_file=f.id)  # supervised, on pairs
    job = wait_for_job(endpoint, OTHER, job.id)
    assert job.status == "failed" and "pairs.jsonl:1: a preference pair" in job.error.message


def test_a_reinforcement_job_raises_its_graders_reward_and_the_served_model_scores_higher(
    endpoint, ft_spec, smol_tokenizer, tmp_path
):
    """GRPO through the official client: 8 prompts, 4 per step, 6 epochs (12 steps), a python grader the endpoint's
    sharp tiny model can learn to please (helpers.liked_words_grader), held-out prompts evaluated every 4 steps.
    Step events carry the reward; then the served ft: model's greedy answers to the held-out prompts, graded by the
    API's own grader route, score above the base model's."""
    grader = liked_words_grader(Path(ft_spec.model_path), smol_tokenizer)
    rows = [{"messages": [{"role": "user", "content": f"Say something about topic {i}."}]} for i in range(8)]
    prompts = upload(endpoint, OTHER, write_jsonl(tmp_path / "prompts.jsonl", rows))
    held_out = upload(endpoint, OTHER, write_jsonl(tmp_path / "held_out.jsonl", rows[:4]))
    hp = {"n_epochs": 6, "batch_size": 4, "eval_interval": 4}
    method = {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp}}
    c = client(endpoint, OTHER)
    job = c.fine_tuning.jobs.create(model="tiny", training_file=prompts.id, validation_file=held_out.id, method=method)
    assert job.method.type == "reinforcement" and job.method.reinforcement.hyperparameters.batch_size == 4
    done = wait_for_job(endpoint, OTHER, job.id)
    assert done.status == "succeeded", done.error
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=100))
    steps = sorted((e for e in events if e.type == "metrics" and "train_loss" in e.data), key=lambda e: e.data["step"])
    assert [e.data["step"] for e in steps] == list(range(1, 13))
    assert all(0 <= e.data["reward"] <= 1 and "reward=" in e.message for e in steps)
    # the held-out reward of greedy answers (eval_samples auto: 1) at steps 4 and 8 in their step's event, and after
    # the last step in one of its own
    assert [e.data["step"] for e in steps if "eval_reward" in e.data] == [4, 8]
    assert "validation reward=" in steps[3].message
    held = [e for e in events if e.type == "metrics" and "train_loss" not in e.data]
    assert [e.data["step"] for e in held] == [12] and held[0].message.startswith("Step 12/12: validation reward=")

    def served_reward(model: str) -> float:
        """The mean grade of `model`'s greedy answers (as long as training's samples) to the held-out prompts."""
        grades = []
        for row in rows[:4]:
            reply = c.chat.completions.create(model=model, messages=row["messages"], max_tokens=8, temperature=0)
            text = reply.choices[0].message.content or ""
            grades.append(c.fine_tuning.alpha.graders.run(grader=grader, model_sample=text, item=row).reward)
        return sum(grades) / len(grades)

    base, tuned = served_reward("tiny"), served_reward(done.fine_tuned_model)
    assert tuned >= base + 0.5, (base, tuned)
    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data  # the last step's checkpoint, served by its own name
    assert [k.step_number for k in ckpts] == [12]
    assert ckpts[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-12"
    assert served_reward(ckpts[0].fine_tuned_model_checkpoint) == tuned
    assert held[0].data["eval_reward"] >= 0.5  # the job's own held-out figure agrees

    sft = upload(endpoint, OTHER, write_jsonl(tmp_path / "sft.jsonl", [chat(QUESTION, ANSWER)] * 8))
    job = c.fine_tuning.jobs.create(model="tiny", training_file=sft.id, validation_file=held_out.id, method=method)
    job = wait_for_job(endpoint, OTHER, job.id, timeout=60)
    assert job.status == "failed" and job.error.code == "invalid_file"  # conversations are not prompt rows
    assert "sft.jsonl:1: a supervised conversation (it ends with the assistant's answer), not a prompt row" in (
        job.error.message
    )
