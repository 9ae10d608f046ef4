"""GRPO's pieces without Ray: advantages, token weights and the clipped loss against numbers worked out by hand,
prompt rows and the training.rl config (every error a user can make), and the rollout engine over a live PEFT model
(its logits are the trained model's, and a changed adapter changes what it samples)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from rayft.training.config import TrainJob
from rayft.training.formats import RowError, normalize
from rayft.training.grpo import advantages, token_losses, token_weights

# --------------------------------------------------------------------------- advantages


def test_group_advantages_are_centred_and_scaled_by_each_groups_sample_std():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv = advantages(rewards, "group")
    # group 0: mean 0.5; sample std sqrt(4 x 0.25 / 3) = 0.57735
    a = 0.5 / (math.sqrt(4 * 0.25 / 3) + 1e-4)
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a]) and a == pytest.approx(0.86588, abs=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: no signal, no NaN


def test_batch_and_unscaled_advantages():
    rewards = np.array([[3.0, 1.0], [0.0, 0.0]])
    assert advantages(rewards, "none").tolist() == [[1.0, -1.0], [0.0, 0.0]]
    assert advantages(rewards, "batch", batch_std=2.0)[0].tolist() == pytest.approx([1 / 2.0001, -1 / 2.0001])


# --------------------------------------------------------------------------- how token losses add up


def test_token_weights_of_each_loss_variant():
    lengths = [2, 4]  # two completions on this rank; the step has 3 completions and 10 tokens on all ranks
    assert token_weights(lengths, "grpo", max_new_tokens=8, completions=3, tokens=10) == pytest.approx([1 / 6, 1 / 12])
    assert token_weights(lengths, "dr_grpo", max_new_tokens=8, completions=3, tokens=10) == [1 / 24, 1 / 24]
    assert token_weights(lengths, "dapo", max_new_tokens=8, completions=3, tokens=10) == [0.1, 0.1]


def test_first_pass_loss_is_minus_the_advantage_and_its_gradient_the_policy_gradient():
    import torch

    logps = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([2.0, 2.0, -1.0])
    loss, clipped, kl = token_losses(logps, logps.detach(), adv, clip_eps=0.2, clip_eps_high=0.2, beta=0.0)
    assert loss.tolist() == pytest.approx([-2.0, -2.0, 1.0])  # ratio 1: -A per token
    assert not clipped.any() and kl.abs().sum() == 0
    (loss * torch.tensor([0.25, 0.25, 0.5])).sum().backward()
    # d/dlogp of -ratio x A at ratio 1 is -A, times each token's weight
    assert logps.grad is not None and logps.grad.tolist() == pytest.approx([-0.5, -0.5, 0.5])


def test_ratio_clipping_by_hand():
    import torch

    old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.8, 0.8, 0.2, 0.2]))  # ratios 1.6, 1.6, 0.4, 0.4
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped, _ = token_losses(new, old, adv, clip_eps=0.2, clip_eps_high=0.28, beta=0.0)
    # A>0, r=1.6: min(1.6, 1.28) = 1.28 (clipped)   A<0, r=1.6: min(-1.6, -1.28) = -1.6 (not clipped)
    # A>0, r=0.4: min(0.4, 0.8) = 0.4 (not clipped)  A<0, r=0.4: min(-0.4, -0.8) = -0.8 (clipped)
    assert loss.tolist() == pytest.approx([-1.28, 1.6, -0.4, 0.8])
    assert clipped.tolist() == [True, False, False, True]


def test_kl_term_is_the_k3_estimator_weighted_by_beta():
    import torch

    logps = torch.tensor([-1.0, -1.0])
    ref = torch.tensor([-1.0, -2.0])
    loss, _, kl = token_losses(logps, logps, torch.zeros(2), clip_eps=0.2, clip_eps_high=0.2, beta=0.5, ref_logps=ref)
    k3 = math.exp(-1.0) - (-1.0) - 1  # exp(ref - logp) - (ref - logp) - 1 with ref - logp = -1
    assert kl.tolist() == pytest.approx([0.0, k3])
    assert loss.tolist() == pytest.approx([0.0, 0.5 * k3])


def test_a_step_loss_equals_the_variant_definition_across_micro_batches():
    """Two completions with advantages +1 and -1 (lengths 1 and 3) at ratio 1: per-token loss -A. grpo: the mean
    of per-completion means = (-1 + 1) / 2 = 0; dapo: the token mean = (-1 + 3) / 4 = 0.5; dr_grpo with
    max_new_tokens 4: (-1 + 3) / (2 x 4) = 0.25."""
    import torch

    lengths, advs = [1, 3], [1.0, -1.0]
    expected = {"grpo": 0.0, "dapo": 0.5, "dr_grpo": 0.25}
    for variant, want in expected.items():
        w = token_weights(lengths, variant, max_new_tokens=4, completions=2, tokens=4)
        total = 0.0
        for n, a, wi in zip(lengths, advs, w, strict=True):  # each completion as its own micro-batch
            lp = torch.zeros(n)
            loss, _, _ = token_losses(lp, lp, torch.full((n,), a), clip_eps=0.2, clip_eps_high=0.2, beta=0.0)
            total += float((loss * wi).sum())
        assert total == pytest.approx(want), variant


# --------------------------------------------------------------------------- prompt rows


def test_prompt_rows_keep_every_field_for_the_grader():
    row = {
        "messages": [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
        "answer": "4",
    }
    doc = normalize(row, "prompt")
    assert doc["kind"] == "prompt"
    assert [m["role"] for m in doc["messages"]] == ["system", "user"]  # OpenAI's developer role is the system turn
    assert doc["item"] == row
    assert normalize({"prompt": "Say hi", "x": 1}, "prompt") == {
        "kind": "prompt",
        "text": "Say hi",
        "item": {"prompt": "Say hi", "x": 1},
    }


@pytest.mark.parametrize(
    ("row", "words"),
    [
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "ends with the user turn",
        ),
        ({"question": "q", "answer": "a"}, "needs 'messages'"),
        ({"messages": []}, "non-empty list"),
        ({"prompt": "  "}, "is empty"),
    ],
)
def test_bad_prompt_rows_say_what_is_wrong(row, words):
    with pytest.raises(RowError, match=words):
        normalize(row, "prompt")


def test_the_rl_quickstart_data_is_its_generators_and_its_eval_is_held_out(tmp_path):
    """examples/quickstart-rl/*.jsonl are what make_data.py writes, and no held-out prompt shares a name, a city or
    a story template with a training prompt."""
    import json

    from helpers import ROOT, regenerate_example

    folder = ROOT / "examples" / "quickstart-rl"
    make = regenerate_example("quickstart-rl", tmp_path)
    train, held_out = ([json.loads(line) for line in open(folder / n)] for n in ("train.jsonl", "eval.jsonl"))
    assert len(train) == 480 and len(held_out) == 48
    for row in train + held_out:
        assert normalize(row, "prompt")["item"]["answer"] in row["messages"][0]["content"]
    train_cities = {r["answer"] for r in train}
    assert not train_cities & {r["answer"] for r in held_out}
    text = " ".join(r["messages"][0]["content"] for r in train)
    assert not any(n in text.split() for n in make.NAMES[45:])


# --------------------------------------------------------------------------- the config


def _job(**training):
    return {"data": {"train": "x.jsonl"}, "training": {"objective": "grpo", **training}}


def test_grpo_config_makes_rows_prompts_and_takes_reward_functions():
    job = TrainJob.model_validate(
        _job(rl={"reward": ["my_rewards:exact", {"function": "my_rewards:short", "weight": 0.5}]})
    )
    assert job.data.format == "prompt"
    assert job.training.rl is not None
    assert [(r.function, r.weight) for r in job.training.rl.reward] == [
        ("my_rewards:exact", 1.0),
        ("my_rewards:short", 0.5),
    ]


@pytest.mark.parametrize(
    ("training", "words"),
    [
        ({}, "needs training.rl"),
        ({"rl": {}}, "no reward"),
        ({"method": "full", "rl": {"reward": ["m:f"]}}, "LoRA adapters only"),
        ({"rl": {"reward": ["not a function"]}}, "is not FILE.py:function or module:function"),
        ({"rl": {"reward": ["m:f"], "samples_per_prompt": 1}}, "greater than or equal to 2"),
        ({"rl": {"reward": ["m:f"], "loss": "ppo"}}, "'grpo', 'dr_grpo' or 'dapo'"),
    ],
)
def test_grpo_config_errors(training, words):
    with pytest.raises(ValidationError, match=words):
        TrainJob.model_validate(_job(**training))


def test_rl_section_only_with_grpo_and_prompt_format_only_with_grpo():
    with pytest.raises(ValidationError, match="applies to objective grpo"):
        TrainJob.model_validate({"data": {"train": "x"}, "training": {"rl": {"reward": ["m:f"]}}})
    with pytest.raises(ValidationError, match="for training.objective grpo"):
        TrainJob.model_validate({"data": {"train": "x", "format": "prompt"}})
    with pytest.raises(ValidationError, match="data.format messages does not apply"):
        TrainJob.model_validate(_job(rl={"reward": ["m:f"]}) | {"data": {"train": "x", "format": "messages"}})


# --------------------------------------------------------------------------- rewards in a Ray task


def test_rewards_run_in_a_ray_task_and_failures_cost_only_their_completions(ray_local, tmp_path):
    """Reward functions (a FILE.py one, by its source) and an OpenAI grader, scored in a Ray task: weights add up,
    a function that raises scores its batch failure_reward, a grader that spins is stopped at its timeout, and
    each is counted; nothing raises."""
    import os

    from rayft.training.config import RlConfig
    from rayft.training.rewards import Rewarder, reward_sources

    (tmp_path / "rw.py").write_text(
        "def length(completions, **fields):\n    return [len(c) / 10 for c in completions]\n\n\n"
        "def named(completions, name, **fields):\n    return [float(n in c) for c, n in zip(completions, name)]\n\n\n"
        "def broken(completions, **fields):\n    raise RuntimeError('the answer key is gone')\n"
    )
    file = str(tmp_path / "rw.py")
    rl = RlConfig(reward=[{"function": f"{file}:length", "weight": 0.5}, f"{file}:named"], failure_reward=-1)
    sources = reward_sources(rl)
    os.remove(file)  # the task runs the code the driver read, not the file
    items = [{"prompt": "Hi", "name": "Ada"}, {"prompt": "Hi", "name": "Bo"}]
    scores = Rewarder(rl, sources).score(["Ada here", "nobody"], [[1, 2], [3]], items)
    assert scores.rewards.tolist() == pytest.approx([0.5 * 0.8 + 1.0, 0.5 * 0.6 + 0.0])
    assert scores.failures == 0 and sorted(scores.parts) == ["length", "named"]

    broken = RlConfig(reward=[f"{file}:named", f"{file}:broken"], failure_reward=-1)
    scores = Rewarder(broken, sources).score(["Ada here", "nobody"], [[1], [2]], items)
    assert scores.rewards.tolist() == [-1.0, -1.0] and scores.failures == 2

    spin = "def grade(sample, item):\n    while item['name'] == 'Bo':\n        pass\n    return 1.0\n"
    graded = RlConfig(grader={"type": "python", "name": "p", "source": spin}, grader_timeout_s=1, failure_reward=-1)
    scores = Rewarder(graded).score(["a", "b", "c"], [[1], [2], [3]], [items[0], items[1], items[0]])
    assert scores.rewards.tolist() == [1.0, -1.0, 1.0] and scores.failures == 1


# --------------------------------------------------------------------------- the rollout engine on a live model


class _Holder:
    """What EngineRollouts reads of a DeepSpeed engine: the module being trained."""

    def __init__(self, module):
        self.module = module


def test_rollouts_read_the_live_adapter(tiny_model_dir):
    """The engine's logits for a prompt equal the trained model's own forward, with the adapter as it is now; after
    the adapter's weights change (an optimizer step), what it samples changes with them, with no reload."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.training.rollout import EngineRollouts

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False),
    )
    model.train()
    rollouts = EngineRollouts(_Holder(model), tok, "cpu", zero3=False)
    prompt = tok("Ticket 7: my lamp is broken")["input_ids"]

    def engine_logits():
        with rollouts.engine.no_autograd():
            ids = torch.tensor([prompt])
            return rollouts.engine.forward(ids, torch.ones_like(ids), None, []).logits[0, -1]

    model.eval()
    with torch.no_grad():
        direct = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    assert torch.allclose(engine_logits(), direct, atol=1e-5)

    greedy = dict(n=1, max_new_tokens=12, temperature=0.0, top_p=1.0, seeds=[[0]])
    before = rollouts.sample([prompt], **greedy)[0]
    assert model.training is False  # sample() restores the mode it found (eval here)
    model.train()
    rollouts.sample([prompt], **greedy)
    assert model.training is True
    with torch.no_grad():  # an "optimizer step" on the adapter only
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    after = rollouts.sample([prompt], **greedy)[0]
    assert before.token_ids != after.token_ids
    model.eval()
    with torch.no_grad():
        assert torch.allclose(engine_logits(), model(input_ids=torch.tensor([prompt])).logits[0, -1], atol=1e-5)
    # Sampling is reproducible from its seeds, and a request that stops carries its stop token to train on.
    sampled = dict(n=3, max_new_tokens=12, temperature=1.0, top_p=1.0, seeds=[[1, 2, 3]])
    a, b = rollouts.sample([prompt], **sampled), rollouts.sample([prompt], **sampled)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) > 1
    for c in a:
        assert c.finish_reason in ("stop", "length")
        assert len(c.token_ids) == 12 if c.finish_reason == "length" else c.token_ids[-1] in rollouts.engine.stop_ids
