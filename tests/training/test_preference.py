"""Preference tuning (training.objective: dpo): the loss against the formula worked by hand, the reference as the
policy with its adapter switched off, pair rows in TRL's and OpenAI's formats (and bad ones named), pairs
tokenized with one prompt and loss on the answers only, and real 2-worker DeepSpeed runs (ZeRO-2/3, LoRA and full)
whose reward accuracy on their pairs passes 0.9."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import train_killing_a_worker, write_jsonl


def sigmoid_loss(margin: float, beta: float) -> float:
    return -math.log(1 / (1 + math.exp(-beta * margin)))


def test_the_dpo_and_ipo_losses_are_the_formulas_by_hand():
    import torch

    from rayft.training.config import DpoConfig
    from rayft.training.preference import dpo_losses

    # two pairs: log-probs of (chosen 0, chosen 1, rejected 0, rejected 1) under the policy and the reference
    policy = torch.tensor([-3.0, -5.0, -4.0, -2.0])
    ref = torch.tensor([-3.5, -4.0, -4.5, -2.5])
    counts = torch.tensor([2, 4, 3, 5])
    margins = [(-3.0 + 3.5) - (-4.0 + 4.5), (-5.0 + 4.0) - (-2.0 + 2.5)]  # 0.0 and -1.5

    losses, chosen, rejected = dpo_losses(policy, ref, counts, DpoConfig(beta=0.1))
    assert losses.tolist() == pytest.approx([sigmoid_loss(m, 0.1) for m in margins])
    assert chosen.tolist() == pytest.approx([0.05, -0.1]) and rejected.tolist() == pytest.approx([0.05, 0.05])

    losses, _, _ = dpo_losses(policy, ref, counts, DpoConfig(beta=0.5, loss="ipo"))
    per_token = [(0.5 / 2 - 0.5 / 3), (-1.0 / 4 - 0.5 / 5)]  # mean log-ratios, chosen minus rejected
    assert losses.tolist() == pytest.approx([(d - 1 / (2 * 0.5)) ** 2 for d in per_token])

    losses, _, _ = dpo_losses(policy, ref, counts, DpoConfig(beta=0.1, sft_weight=0.5))
    nll = [3.0 / 2, 5.0 / 4]  # the chosen answers' mean token NLL under the policy
    assert losses.tolist() == pytest.approx([sigmoid_loss(m, 0.1) + 0.5 * n for m, n in zip(margins, nll, strict=True)])


def test_with_its_adapter_switched_off_the_policy_is_the_reference(tiny_model_dir, smol_tokenizer):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rayft.training.config import DpoConfig
    from rayft.training.preference import Reference, dpo_losses, pair_batch, sequence_logps

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()

    class Engine:  # what the loop passes: callable like the model, the PEFT model as `module`
        module = model

        def __call__(self, **kw):
            return model(**kw)

    rows = [tokenized_pair(smol_tokenizer, "Is the sky blue?", "Yes.", "No, it is green.")]
    batch = pair_batch(rows, torch.device("cpu"), smol_tokenizer.pad_token_id)
    ref = Reference(Engine()).logps(batch)
    with model.disable_adapter(), torch.no_grad():
        off = sequence_logps(model, batch)[0]
    with torch.no_grad():
        on, counts = sequence_logps(model, batch)
    assert torch.equal(ref, off) and not torch.allclose(on, ref)  # the adapter changes the policy, not the reference
    losses, chosen, rejected = dpo_losses(off, ref, counts, DpoConfig())
    assert chosen.tolist() == [0.0] and rejected.tolist() == [0.0]
    assert losses.tolist() == pytest.approx([math.log(2)])


@pytest.mark.parametrize("one_row", [False, True], ids=["row-per-pair", "one-row"])
@pytest.mark.parametrize("fast", [False, True], ids=["stock-forward", "rayft-cpu-forward"])
def test_each_answer_of_a_pair_row_scores_as_if_alone(tiny_model_dir, smol_tokenizer, fast, one_row):
    """A pair runs as one row (chosen, then rejected, positions restarting), or all pairs of a micro-batch as
    one row: each answer's log-probability is the one it has alone, with the stock forward and with rayft's
    packed attention + trained-position logits."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from rayft.training.cpu_ops import use_packed_attention
    from rayft.training.model_setup import use_trained_position_logits
    from rayft.training.preference import pair_batch, sequence_logps

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    rows = [
        tokenized_pair(smol_tokenizer, "Is the sky blue?", "Yes.", "No, it is green, and the grass is blue too."),
        tokenized_pair(smol_tokenizer, "Name a prime number larger than ten, please.", "Eleven.", "Nine."),
    ]

    def alone(ids, labels) -> tuple[float, int]:
        ids, labels = torch.tensor([list(ids)]), torch.tensor(list(labels))
        with torch.no_grad():
            logps = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        trained = labels[1:] != -100
        return float(logps[trained].gather(1, labels[1:][trained][:, None]).sum()), int(trained.sum())

    expected = [alone(r["input_ids"], r["labels"]) for r in rows]
    expected += [alone(r["rejected_ids"], r["rejected_labels"]) for r in rows]
    if fast:
        assert use_packed_attention(model) and use_trained_position_logits(model)
    batch = pair_batch(rows, torch.device("cpu"), smol_tokenizer.pad_token_id, one_row=one_row)
    assert batch["input_ids"].shape[0] == (1 if one_row else 2)
    with torch.no_grad():
        sums, counts = sequence_logps(model, batch)
    assert counts.tolist() == [n for _, n in expected]
    assert sums.tolist() == pytest.approx([v for v, _ in expected], abs=1e-3)


def tokenized_pair(tokenizer, question: str, chosen: str, rejected: str) -> dict:
    from rayft.training.formats import Renderer, normalize, tokenize_rendered

    doc = normalize({"prompt": [{"role": "user", "content": question}], "chosen": chosen, "rejected": rejected})
    renderer = Renderer(tokenizer, None)
    (c_ids, c_labels), (r_ids, r_labels) = tokenize_rendered(
        tokenizer, *zip(*(renderer.render(doc[k]) for k in ("chosen", "rejected")), strict=True)
    )
    return {"input_ids": c_ids, "labels": c_labels, "rejected_ids": r_ids, "rejected_labels": r_labels}


def test_pair_rows_in_trl_and_openai_formats_share_the_prompt_and_train_the_answers_only(smol_tokenizer):
    import numpy as np

    from rayft.training.formats import detect_format, normalize

    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    rows = [
        {"prompt": question, "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": "Lyon."},
        {"input": {"messages": question}, "preferred_output": [{"role": "assistant", "content": "Paris."}],
         "non_preferred_output": [{"role": "assistant", "content": "Lyon."}]},
    ]  # fmt: skip
    docs = [normalize(r) for r in rows]
    assert all(detect_format(r) == "preference" for r in rows)
    assert docs[0] == docs[1]
    text = normalize({"prompt": "2+2=", "chosen": "4", "rejected": "5"})
    assert text["chosen"]["segments"] == [["2+2=", False], ["4", True]]

    pair = tokenized_pair(smol_tokenizer, "Capital of France?", "Paris.", "Lyon, I think.")
    c_ids, c_labels = np.asarray(pair["input_ids"]), np.asarray(pair["labels"])
    r_ids, r_labels = np.asarray(pair["rejected_ids"]), np.asarray(pair["rejected_labels"])
    start = int(np.argmax(c_labels != -100))  # the first trained token: the answer's
    assert start == int(np.argmax(r_labels != -100)) and (c_ids[:start] == r_ids[:start]).all()
    answer = smol_tokenizer.decode(c_ids[c_labels != -100])
    assert answer.startswith("Paris.") and "Capital" not in answer
    assert smol_tokenizer.decode(r_ids[r_labels != -100]).startswith("Lyon, I think.")


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "Q", "chosen": "A", "rejected": "A"}, "chosen and rejected are the same answer"),
        ({"chosen": "A", "rejected": "B"}, "missing field 'prompt'"),
        ({"prompt": [{"role": "system", "content": "x"}], "chosen": "A", "rejected": "B"}, "no user message"),
        ({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "user", "content": "A"}], "rejected": "B"},
         "chosen[0].role is 'user'; an answer holds assistant messages only"),
        ({"input": {"text": "Q"}, "preferred_output": "A", "non_preferred_output": "B"}, "field 'input' must be"),
        ({"prompt": "Q", "chosen": "A", "rejected": 3}, "field 'rejected' must be a string"),
    ],
)  # fmt: skip
def test_a_bad_pair_row_names_its_problem(row, problem):
    from rayft.training.formats import RowError, normalize

    with pytest.raises(RowError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        normalize(row)


def test_dpo_refuses_packing_and_an_sft_run_refuses_pairs(tmp_path, tiny_model_dir, smol_tokenizer):
    from pydantic import ValidationError

    from rayft.training.config import TrainJob
    from rayft.training.data import DataError, Tokenize

    with pytest.raises(ValidationError, match="data.packing does not apply to training.objective dpo"):
        TrainJob.model_validate({"data": {"train": "x.jsonl", "packing": True}, "training": {"objective": "dpo"}})
    doc = json.dumps({"kind": "pair", "chosen": {"kind": "segments", "segments": [["Q: ", False], ["yes", True]]},
                      "rejected": {"kind": "segments", "segments": [["Q: ", False], ["no", True]]}})  # fmt: skip
    batch = {"source": ["p.jsonl:1"], "doc": [doc], "error": [""]}
    data = {"train": "p.jsonl"}
    with pytest.raises(DataError, match="p.jsonl:1: a preference pair .* set training.objective: dpo"):
        Tokenize({"name": str(tiny_model_dir)}, data)(batch)
    out = Tokenize({"name": str(tiny_model_dir)}, data, pairs=True)(batch)
    assert out["status"] == ["ok"] and len(out["rejected_ids"]) == 1


# ------------------------------------------------------------------------------------------------ real runs


def pairs_job(tmp_path: Path, model_dir: Path, **training) -> Path:
    """16 pairs: a question and a right answer (chosen) against a wrong one (rejected); eval on the same pairs."""
    names = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Mo", "Ned", "Oz", "Pia"]
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Is {n} on the team?"}],
            "chosen": [{"role": "assistant", "content": f"Yes, {n} is on the team."}],
            "rejected": [{"role": "assistant", "content": "I do not know anyone by that name."}],
        }
        for n in names
    ]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    t = {"objective": "dpo", "micro_batch_size": 2, "global_batch_size": 8, "warmup_ratio": 0.0, **training}
    (tmp_path / "job.yaml").write_text(
        f"model: {{name: {model_dir}}}\n"
        "data: {train: pairs.jsonl, eval: pairs.jsonl, max_seq_len: 64}\n"
        f"training: {json.dumps(t)}\n"
        "scaling: {num_workers: 2}\n"
        f"run: {{name: dpo, storage_path: {tmp_path / 'runs'}}}\n"
    )
    return tmp_path / "job.yaml"


@pytest.mark.slow
# ZeRO-2 with LoRA learns the same way in the drill below (a worker killed mid-run), which checks the same.
# Full finetuning (a frozen reference copy, partitioned under ZeRO-3) runs in the cluster tier with the drill.
@pytest.mark.parametrize(
    ("zero_stage", "method"),
    [
        (3, "lora"),
        pytest.param(2, "full", marks=pytest.mark.cluster),
        pytest.param(3, "full", marks=pytest.mark.cluster),
    ],
)
def test_two_workers_learn_to_rank_the_chosen_answer_first(ray_local, tmp_path, tiny_model_dir, zero_stage, method):
    from rayft.cluster.config import load_config
    from rayft.training.trainer import read_metrics, run_training

    lr = 5e-3 if method == "lora" else 1e-3
    job = load_config(pairs_job(tmp_path, tiny_model_dir, epochs=12, zero_stage=zero_stage, method=method, lr=lr))
    result = run_training(job)
    assert result.steps == 24  # 16 pairs x 12 epochs / 8 per step
    records = read_metrics(job.run_dir)
    steps = [r for r in records if "reward_accuracy" in r and "step" in r and not r.get("final")]
    assert len(steps) == 24 and all(r["pairs"] == 8 for r in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=0.02)  # policy = reference at the start
    assert steps[-1]["reward_accuracy"] >= 0.9 and steps[-1]["reward_margin"] > 0
    final = [r for r in records if "eval_reward_accuracy" in r][-1]
    assert final["eval_reward_accuracy"] >= 0.9 and final["eval_pairs"] == 16
    assert final["eval_loss"] < math.log(2)


@pytest.mark.cluster  # a failure drill
@pytest.mark.slow
def test_a_dpo_run_whose_worker_is_killed_resumes_from_its_checkpoint_and_still_learns(
    ray_local, tmp_path, tiny_model_dir
):
    """LoRA under ZeRO-2, a worker SIGKILLed after the step-8 checkpoint: the run resumes there (adapter,
    optimizer, data position), trains to the planned 24 steps, and its pairs still end ranked right."""

    from rayft.cluster.config import load_config

    t = dict(epochs=12, zero_stage=2, method="lora", lr=5e-3, checkpoint_every_steps=8)
    job = load_config(pairs_job(tmp_path, tiny_model_dir, **t))
    result, records = train_killing_a_worker(job, 8)
    assert result is not None, "training did not finish after a worker was killed"
    assert result.steps == 24
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["resumed"] and starts[1]["step"] == 8
    resumed = [r for r in records[records.index(starts[1]) :] if "reward_accuracy" in r and not r.get("final")]
    assert [r["step"] for r in resumed if "step" in r and "loss" in r][:1] == [9]
    steps = {r["step"]: r for r in records if "reward_accuracy" in r and "loss" in r and not r.get("final")}
    assert sorted(steps) == list(range(1, 25)) and all(r["pairs"] == 8 for r in steps.values())
    assert steps[1]["loss"] == pytest.approx(math.log(2), abs=0.02)  # policy = reference at the start
    assert steps[24]["reward_accuracy"] >= 0.9 and steps[24]["reward_margin"] > 0
    final = [r for r in records if "eval_reward_accuracy" in r][-1]
    assert final["eval_reward_accuracy"] >= 0.9 and final["eval_pairs"] == 16
    assert final["eval_loss"] < math.log(2)


def test_eval_ranks_pairs_by_reward_and_scores_answers_by_the_rows_rule():
    from rayft.training.evaluate import compare_pairs, passes, score

    rule = {"contains": ["Reset", "ten seconds"], "max_words": 12}
    assert passes("Hold reset for ten seconds.", rule)
    assert not passes("Hold the button.", rule)  # misses the content
    assert not passes("Great question! " * 4 + "Hold reset for ten seconds.", rule)  # too long
    rows = [("a", 10.0, 20.0, 8.0, 25.0, True, False), ("b", 10.0, 20.0, 12.0, 19.0, True, True),
            ("c", 10.0, 20.0, 9.0, 20.0, False, True), ("d", 10.0, 20.0, 9.0, 21.0, False, False)]  # fmt: skip
    base, tuned = [], []
    for source, b_c, b_r, f_c, f_r, f_ok, b_ok in rows:
        common = {"split": "s", "source": source, "rule": json.dumps(rule), "reference": "x", "answer": "x"}
        good, bad = "Hold reset for ten seconds.", "Hold the button."
        base.append(common | {"ref_nll": b_c, "rej_nll": b_r, "prediction": good if b_ok else bad})
        tuned.append(common | {"ref_nll": f_c, "rej_nll": f_r, "prediction": good if f_ok else bad})
    # reward accuracy: (base - tuned) NLL drop of the chosen answer above the rejected one's: a, c, d yes; b no
    # win rate: a win, b tie, c loss, d tie -> (1 + 0.5 + 0 + 0.5) / 4
    assert compare_pairs(base, tuned) == {"reward_accuracy": 0.75, "win_rate": 0.5}
    assert score(tuned)["rule_pass"] == 0.5 and score([r | {"rule": None} for r in tuned])["rule_pass"] is None


def test_data_inspect_counts_pairs_and_both_answers(ray_local, tmp_path, tiny_model_dir):
    from rayft.training.config import DataConfig, ModelConfig
    from rayft.training.data import inspect_data

    rows = [{"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "No, not at all, never, not once."}
            for i in range(5)]  # fmt: skip
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    report = inspect_data(ModelConfig(name=str(tiny_model_dir)), DataConfig(train=str(path)), pairs=True)
    split = report["splits"]["train"]
    assert split["pairs"]["pairs"] == 5 and split["examples"] == 10  # both answers of every pair
    chosen, rejected = split["pairs"]["chosen_answer_tokens"], split["pairs"]["rejected_answer_tokens"]
    assert chosen["max"] < rejected["min"]
    shown = ["".join(s["text"] for s in ex if s["trained"]) for ex in split["rendered_examples"][:2]]
    assert shown[0].startswith("Yes.") and shown[1].startswith("No, not at all")


def test_a_sweep_can_search_beta_and_rank_trials_by_reward_accuracy(tmp_path):
    from rayft.cluster.config import load_config
    from rayft.tuning.sweep import check_sweep

    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}])
    (tmp_path / "sweep.yaml").write_text(
        "data: {train: pairs.jsonl, eval: pairs.jsonl, packing: false}\n"
        "training: {objective: dpo, max_steps: 6, eval_every_steps: 2}\n"
        "sweep:\n  search: grid\n  space: {training.dpo.beta: {grid: [0.05, 0.1, 0.5]}}\n"
        "  metric: eval_reward_accuracy\n"
    )
    job = load_config(tmp_path / "sweep.yaml")
    assert check_sweep(job) == [] and job.sweep.metric_mode == "max"
    sft = load_config(tmp_path / "sweep.yaml", ["training.objective=sft", "data.train=x.jsonl", "data.eval=x.jsonl"])
    assert "never report 'eval_reward_accuracy'" in check_sweep(sft)[0]
