"""GRPO on the real path: 2 Ray Train workers with DeepSpeed and LoRA on the tiny model, rollouts on the live policy,
rewards in Ray tasks. The reward of a reward function the model can learn rises; graders that raise or hang cost
their completions' rewards, never the run; a run whose worker is killed resumes and samples what it would have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import tiny_llama, train_killing_a_worker, write_jsonl

NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Mo", "Ned", "Oz", "Pia"]


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """The tiny model with larger embeddings: a random tiny model's logits are near-uniform over 49,152 tokens and
    bounded (RMSNorm, then the tied embeddings), so LoRA could barely move them; these can move."""
    return tiny_llama(tmp_path_factory.mktemp("sharp-llama"), smol_tokenizer, sharp=True)


def liked_tokens_file(path: Path, model_dir: Path) -> Path:
    """A reward function file: the share of a completion's tokens among 4,096 tokens whose embeddings lie along
    one direction, so one change of the hidden state raises them all: learnable by a random model. At the start
    about 8% of sampled tokens are liked."""
    import torch
    from transformers import AutoModelForCausalLM

    emb = AutoModelForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight.detach()
    direction = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
    liked = sorted(torch.topk(emb @ direction, 4096).indices.tolist())
    path.write_text(
        f"LIKED = set({liked!r})\n\n\n"
        "def liked(completions, completion_ids, **fields):\n"
        "    return [sum(t in LIKED for t in ids) / len(ids) for ids in completion_ids]\n"
    )
    return path


def grpo_job(tmp_path: Path, model_dir: Path, rl: dict, **training) -> Path:
    """16 prompts (each with a `name` field for graders), 2 workers x 2 prompts per micro-batch."""
    rows = [{"messages": [{"role": "user", "content": f"Write about {n}."}], "name": n} for n in NAMES]
    write_jsonl(tmp_path / "prompts.jsonl", rows)
    t = {
        "objective": "grpo",
        "lr": 0.02,
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "warmup_ratio": 0.0,
        "rl": {"samples_per_prompt": 4, "max_new_tokens": 8, **rl},
        **training,
    }
    (tmp_path / "job.yaml").write_text(
        f"model: {{name: {model_dir}}}\n"
        "data: {train: prompts.jsonl, eval: prompts.jsonl, max_seq_len: 64}\n"
        f"training: {json.dumps(t)}\n"
        "scaling: {num_workers: 2}\n"
        f"run: {{name: grpo, storage_path: {tmp_path / 'runs'}}}\n"
    )
    return tmp_path / "job.yaml"


def step_records(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if "reward" in r and "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize(
    "zero_stage", [2, pytest.param(3, marks=pytest.mark.cluster)]
)  # ZeRO-3: the rollout gathers the weights
def test_two_workers_raise_the_reward_of_a_reward_function(ray_local, tmp_path, sharp_model_dir, zero_stage):
    """LoRA, 24 steps of 16 completions. The reward of the sampled completions rises and the held-out greedy reward
    ends above where it started; every metric the peers log is there, on every step."""
    from rayft.cluster.config import load_config
    from rayft.training.run_dir import RunDir
    from rayft.training.trainer import read_metrics, run_training

    liked_tokens_file(tmp_path / "rewards.py", sharp_model_dir)
    rl = {"reward": ["rewards.py:liked"]}
    job = load_config(grpo_job(tmp_path, sharp_model_dir, rl, max_steps=24, zero_stage=zero_stage))
    job.training.eval_every_steps = 1000  # only the final eval: the first one below is the base's, by hand
    result = run_training(job)
    assert result.steps == 24
    records = read_metrics(job.run_dir)
    steps = step_records(records)
    assert sorted(steps) == list(range(1, 25))
    first = sum(steps[s]["reward"] for s in (1, 2, 3)) / 3
    last = sum(steps[s]["reward"] for s in range(19, 25)) / 6
    assert first < 0.15 and last > first + 0.08, (first, last)
    for r in steps.values():
        assert r["completions"] == 16 and 1 <= r["completion_length"] <= 8 and 0 <= r["clipped_completions"] <= 1
        assert r["reward_failures"] == 0 and 0 <= r["zero_std_groups"] <= 1 and r["reward_std"] >= 0
        assert r["kl"] == 0 and r["entropy"] > 0 and r["clip_ratio"] == 0  # beta 0; one update per batch
        assert all(r[f"timing/{k}"] >= 0 for k in ("generate", "grade", "train", "sync")) and r["completions_per_s"] > 0
        # token figures of the training forwards: each completion's tokens are trained, after its prompt's
        assert r["trained_tokens"] == round(r["completion_length"] * 16) < r["nonpad_tokens"] <= r["tokens"]
    final = [r for r in records if r.get("final") and "eval_reward" in r][-1]
    assert final["eval_completions"] == 16 and final["eval_reward"] > 0.3
    assert RunDir(job.run_dir).adapter() is not None  # the adapter exports like any other


@pytest.mark.cluster  # two training runs compared step for step (keeps make test within 15 minutes)
@pytest.mark.slow
def test_flat_groups_are_sampled_again_until_they_have_a_spread(ray_local, tmp_path, sharp_model_dir):
    """A reward that is 1 only when the first token is a liked one (about 1 in 12): most groups of 4 score all 0,
    no signal. With training.rl.resample_flat_groups those groups are drawn again (fresh seeds) and replaced by a
    draw with a spread: step 1 starts from the same weights and the same first draw in both runs, so the second
    has exactly the first's flat groups redrawn, and fewer left flat."""
    from rayft.cluster.config import load_config
    from rayft.training.trainer import read_metrics, run_training

    runs = {}
    for resample in (0, 3):
        d = tmp_path / f"resample-{resample}"
        d.mkdir()
        liked_tokens_file(d / "rewards.py", sharp_model_dir)
        with open(d / "rewards.py", "a") as f:
            f.write("\n\ndef first_liked(completions, completion_ids, **fields):\n")
            f.write("    return [float(bool(ids) and ids[0] in LIKED) for ids in completion_ids]\n")
        rl = {"reward": ["rewards.py:first_liked"], "resample_flat_groups": resample}
        job = load_config(grpo_job(d, sharp_model_dir, rl, max_steps=1, eval_at_end=False))
        run_training(job)
        runs[resample] = step_records(read_metrics(job.run_dir))[1]
    plain, redrawn = runs[0], runs[3]
    flat_before = round(plain["zero_std_groups"] * 4)
    assert plain["resampled_groups"] == 0 and flat_before >= 2  # most groups of 4 have no spread
    assert redrawn["resampled_groups"] >= flat_before  # the first redraw is of exactly those groups
    assert redrawn["zero_std_groups"] < plain["zero_std_groups"] and redrawn["completions"] == 16
    assert redrawn["reward_std"] > plain["reward_std"]


@pytest.mark.cluster  # a whole run for what test_grpo.py checks of the grading task alone
@pytest.mark.slow
def test_a_grader_that_raises_or_hangs_costs_rewards_not_the_run(ray_local, tmp_path, tiny_model_dir):
    """An OpenAI python grader (in its sandbox) that raises for one name and spins forever for another: those
    completions score failure_reward and are counted, the others are graded, and the run ends normally."""
    from rayft.cluster.config import load_config
    from rayft.training.trainer import read_metrics, run_training

    source = (
        "def grade(sample, item):\n"
        "    if item['name'] == 'Ada':\n"
        "        raise ValueError('no')\n"
        "    if item['name'] == 'Bo':\n"
        "        while True:\n"
        "            pass\n"
        "    return 1.0\n"
    )
    rl = {
        "grader": {"type": "python", "name": "p", "source": source},
        "grader_timeout_s": 2,
        "failure_reward": -1.0,
    }
    job = load_config(grpo_job(tmp_path, tiny_model_dir, rl, max_steps=4))
    job.data.shuffle = False  # Ada and Bo are the first step's prompts
    result = run_training(job)
    assert result.steps == 4
    steps = step_records(read_metrics(job.run_dir))
    # step 1: Ada, Bo, Cy, Di x 4 samples: 8 failures (-1) and 8 graded 1.0
    assert steps[1]["reward_failures"] == 8 and steps[1]["reward"] == pytest.approx(0.0)
    assert all(steps[s]["reward_failures"] == 0 and steps[s]["reward"] == 1.0 for s in (2, 3, 4))


@pytest.mark.cluster  # a failure drill
@pytest.mark.slow
def test_a_grpo_run_whose_worker_is_killed_resumes_on_the_uninterrupted_curve(ray_local, tmp_path, sharp_model_dir):
    """ZeRO-3 (the rollout gathers the weights), a worker SIGKILLed after the step-4 checkpoint: the run resumes
    there (adapter, optimizer, prompt cursor), trains to the planned 8 steps and ends with its held-out eval, and
    every step's reward is the uninterrupted run's, which ran from another directory: samples are seeded by the
    prompt row's file name and line, not by where the files are."""
    from rayft.cluster.config import load_config
    from rayft.training.trainer import read_metrics, run_training

    rl = {"reward": ["rewards.py:liked"]}
    t = dict(max_steps=8, zero_stage=3, checkpoint_every_steps=4)
    runs = {}
    for name in ("uninterrupted", "killed"):
        (tmp_path / name).mkdir()
        liked_tokens_file(tmp_path / name / "rewards.py", sharp_model_dir)
        runs[name] = load_config(grpo_job(tmp_path / name, sharp_model_dir, rl, **t))
    assert run_training(runs["uninterrupted"]).steps == 8
    expected = step_records(read_metrics(runs["uninterrupted"].run_dir))

    result, records = train_killing_a_worker(runs["killed"], 4)
    assert result is not None and result.steps == 8
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["resumed"] and starts[1]["step"] == 4
    before = step_records(records[: records.index(starts[1])])
    resumed = step_records(records[records.index(starts[1]) :])
    assert sorted(resumed) == [5, 6, 7, 8] and 5 in before  # step 5 ran before the kill, and again after it
    for s in range(1, 9):
        got = (before | resumed)[s]
        assert got["completions"] == 16
        assert got["reward"] == pytest.approx(expected[s]["reward"], abs=1e-9), (
            s,
            got["reward"],
            expected[s]["reward"],
        )
    assert before[5]["reward"] == pytest.approx(resumed[5]["reward"], abs=1e-9)
    assert [r for r in records if r.get("final") and "eval_reward" in r]
