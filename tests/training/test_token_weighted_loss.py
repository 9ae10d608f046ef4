"""The loss of an optimizer step is the mean over all of its trained tokens, however the step is split into
micro-batches, accumulation steps and ranks: the same packed rows of very uneven trained lengths give the same
loss and the same gradient norm as a plain PyTorch reference (real DeepSpeed ZeRO-2, gloo, 1 and 2 ranks)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import loop_config, run_ranks

# Four packed rows (two examples each) whose trained lengths differ by up to 40x: a mean of per-micro-batch
# means would weigh the 3-token row like the 120-token one.
TRAINED = [(3, 5), (60, 1), (7, 2), (120, 4)]
PROMPT = 9


def packed_rows(vocab: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for lengths in TRAINED:
        ids, labels, pos = [], [], []
        for n in lengths:
            example = rng.integers(5, vocab, size=PROMPT + n)
            ids += example.tolist()
            labels += [-100] * PROMPT + example[PROMPT:].tolist()
            pos += list(range(PROMPT + n))
        rows.append({"input_ids": np.array(ids), "labels": np.array(labels), "position_ids": np.array(pos)})
    return rows


# (world, micro-batch size, accumulation steps): how each layout deals the four rows.
LAYOUTS = {1: [(1, 4, 1), (1, 1, 4)], 2: [(2, 2, 1), (2, 1, 2)]}


def _run_layouts(rank: int, world: int, model_dir: str) -> list[tuple[float, int, float]]:
    """One rank: for each layout of this world size, build the engine and take one optimizer step."""
    import torch
    import torch.distributed as dist

    from rayft.training.config import TrainingConfig
    from rayft.training.model_setup import build_engine, build_model
    from rayft.training.objectives import Sft, StepContext
    from rayft.training.step_metrics import StepClock

    results = []
    for _, micro, accum in LAYOUTS[world]:
        training = TrainingConfig(
            method="full", zero_stage=2, lr=1e-3, micro_batch_size=micro, global_batch_size=micro * accum * world
        )
        cfg = loop_config(model_dir, training, grad_accum=accum)
        torch.manual_seed(0)
        engine = build_engine(build_model(cfg), cfg)
        rows = packed_rows(engine.module.config.vocab_size)
        mine = rows[rank * len(rows) // world : (rank + 1) * len(rows) // world]
        group = [(mine[i : i + micro], []) for i in range(0, len(mine), micro)]
        cpu = torch.device("cpu")
        ctx = StepContext(engine=engine, device=cpu, pad_id=0, world=world, grad_accum=accum, clock=StepClock(cpu))
        out = Sft(cfg).step(ctx, group)
        tokens = out.loss_count
        total = torch.tensor([out.loss_sum], dtype=torch.float64)
        dist.all_reduce(total)
        results.append((total.item() / tokens, tokens, float(engine.get_global_grad_norm())))
        engine.destroy()
    return results


def run_world(world: int, model_dir) -> list[tuple[float, int, float]]:
    return run_ranks(_run_layouts, world, str(model_dir))[0]


def reference(model_dir) -> tuple[float, int, float]:
    """The definition: one forward over all rows, summed cross-entropy over every trained token / their number."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from rayft.training.formats import collate

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    batch = collate(packed_rows(model.config.vocab_size), 0)
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    loss = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum") / mask.sum()
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return loss.item(), int(mask.sum()), norm.item()


def test_the_step_loss_is_the_mean_over_every_trained_token_whatever_the_split(tiny_model_dir):
    want_loss, want_tokens, want_norm = reference(tiny_model_dir)
    assert want_tokens == sum(sum(t) for t in TRAINED)
    layouts = LAYOUTS[1] + LAYOUTS[2]
    got = run_world(1, tiny_model_dir) + run_world(2, tiny_model_dir)
    for layout, (loss, tokens, norm) in zip(layouts, got, strict=True):
        assert tokens == want_tokens, layout
        assert loss == pytest.approx(want_loss, rel=1e-5), layout
        assert norm == pytest.approx(want_norm, rel=1e-4), layout
