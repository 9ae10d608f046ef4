"""What the loop trains for: the Objective interface, the context its step and eval get, and the supervised
objective (SFT). Preference tuning's objective (Dpo) lives in rayft.training.preference, reinforcement
finetuning's (Grpo) in rayft.training.grpo; the loop picks one by
training.objective (rayft.training.loop.OBJECTIVES), so another objective is another implementation here or
beside preference.py, never another branch in the loop.

Also the micro-batches every objective reads from a Ray Data shard: the training split's, skipping rows a resumed
epoch already trained, and the eval split's, which every rank stops reading together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rayft.training.config import LoopConfig
from rayft.training.formats import IGNORE_INDEX as IGNORE
from rayft.training.step_metrics import StepClock, release_freed_memory


@dataclass(frozen=True, kw_only=True)
class StepContext:
    """What an optimizer step (or an eval pass) works with on this rank."""

    engine: Any  # the DeepSpeed engine
    device: Any  # torch.device
    pad_id: int
    world: int  # ranks
    grad_accum: int  # micro-batches per optimizer step on each rank
    clock: StepClock
    trim_heap: bool = False  # hand the heap's freed pages back around the optimizer step (see Sft.step)


@dataclass(frozen=True, kw_only=True)
class StepOutcome:
    """One optimizer step on this rank, as the loop records it."""

    loss_sum: float  # this rank's summed loss
    loss_count: int  # what the step's loss is a mean over, on all ranks: trained tokens (SFT), pairs (DPO)
    sums: list[float] = field(default_factory=list)  # the objective's own figures, for its outcome_metrics


class Objective(Protocol):
    """A way to train: built once per worker as `cls(cfg, engine)` (after the engine, before any resume), then one
    `step` per optimizer step and one `evaluate` per eval pass. Every method is called on every rank."""

    one_row: bool  # whether a micro-batch's pairs run as one packed row (StepAccumulator.add's token count)

    def step(self, ctx: StepContext, group: list, step: int) -> StepOutcome:
        """One optimizer step over `group`, this rank's grad_accum micro-batches of (rows, row ids); `step` is the
        number this step will have (1 for the first), for what must be reproducible on resume (GRPO's sampling)."""
        ...

    def outcome_metrics(self, outcome: StepOutcome, device) -> dict:
        """The objective's own metrics for a step, over all ranks; added to (and overriding) the loop's."""
        ...

    def evaluate(self, ctx: StepContext, shard) -> dict:
        """The eval split's metrics (eval_*) over all ranks."""
        ...


class Sft:
    """Supervised finetuning: cross-entropy on the trained (label-carrying) tokens, a mean over every one of the
    step's trained tokens on every rank."""

    one_row = False

    def __init__(self, cfg: LoopConfig, engine=None):
        self.micro_batch_size = cfg.training.micro_batch_size

    def step(self, ctx: StepContext, group: list, step: int = 0) -> StepOutcome:
        """One optimizer step over `group`, this rank's grad_accum micro-batches of (rows, row ids).

        The step's loss is the mean over every trained token of every micro-batch on every rank: the token
        count is all-reduced before the first forward, and each micro-batch's summed loss is scaled so that
        DeepSpeed's averaging (1/grad_accum per micro-batch, 1/world over ranks) leaves sum / count. A
        micro-batch with 10 trained tokens weighs 10/2,000 of one with 2,000, not as much. Returns this rank's
        summed loss and the step's trained tokens on all ranks.

        ctx.trim_heap: return the heap's free pages to the system after the step's last backward and after the
        optimizer step (release_freed_memory; ~0.1 s on a 0.5B model). The backward's gathered weights and
        transient gradients, freed by then, would otherwise stay resident under the optimizer's own allocations:
        on a 0.5B ZeRO-3 model with 2 ranks, 1.4 GiB per rank."""
        import torch
        import torch.distributed as dist

        engine, device, clock = ctx.engine, ctx.device, ctx.clock
        count = torch.tensor(
            [float(sum(trained_tokens(rows) for rows, _ in group))], dtype=torch.float64, device=device
        )
        if dist.is_initialized():
            dist.all_reduce(count)
        step_tokens = int(count.item())
        scale = ctx.world * ctx.grad_accum / max(step_tokens, 1)
        losses = []
        for i, (rows, _) in enumerate(group):
            boundary = ctx.trim_heap and i == len(group) - 1
            clock.start()
            loss_sum, _ = forward(engine, rows, device, ctx.pad_id)
            clock.lap("forward_s")
            engine.backward(loss_sum * scale)  # its gradient reduction is timed apart, as grad_sync_s (time_grad_sync)
            if boundary:
                release_freed_memory()
            clock.lap("backward_s")
            engine.step()
            if boundary:
                release_freed_memory()
            clock.lap("optimizer_s")
            losses.append(loss_sum.item())
        return StepOutcome(loss_sum=sum(losses), loss_count=step_tokens)

    def outcome_metrics(self, outcome: StepOutcome, device) -> dict:
        return {}  # the loop's loss is SFT's

    def evaluate(self, ctx: StepContext, shard) -> dict:
        """Token-weighted mean loss over the whole eval split, and its perplexity."""
        import math

        import torch
        import torch.distributed as dist

        engine, device = ctx.engine, ctx.device
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for rows in eval_micro_batches(shard, self.micro_batch_size, device):
                loss_sum, n = forward(engine, rows, device, ctx.pad_id)
                total += torch.tensor([loss_sum.item(), n], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(total)
        engine.train()
        loss = (total[0] / total[1].clamp(min=1)).item()
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(total[1].item())}


def forward(engine, rows: list[dict], device, pad_id: int):
    """(summed cross-entropy over the micro-batch's trained tokens, their number): the model's mean loss
    times the count of shifted labels that carry loss."""
    from rayft.training.formats import collate

    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    return engine(**batch, use_cache=False).loss * n, n


def trained_tokens(rows: list[dict]) -> int:
    """Tokens of a micro-batch that carry loss (labels after the shift)."""
    return sum(int((np.asarray(r["labels"])[1:] != IGNORE).sum()) for r in rows)


# --------------------------------------------------------------------------- micro-batches from a shard


def micro_batches(shard, size: int, skip: set[int]):
    """Yield (rows, row ids) micro-batches of `size` rows from a Ray Data shard, leaving out
    rows already trained this epoch (after a resume)."""
    buffer: list[dict] = []
    for block in shard.iter_batches(batch_size=size, batch_format="numpy", prefetch_batches=2):
        keys = list(block)
        for values in zip(*(block[k] for k in keys), strict=True):
            row = dict(zip(keys, values, strict=True))
            ids = _row_ids(row)
            if skip and any(i in skip for i in ids):
                continue
            row["_ids"] = ids
            buffer.append(row)
            if len(buffer) == size:
                yield buffer, [i for r in buffer for i in r["_ids"]]
                buffer = []
    if buffer:
        yield buffer, [i for r in buffer for i in r["_ids"]]


def _row_ids(row: dict) -> list[int]:
    if "row_ids" in row:
        return [int(i) for i in np.asarray(row["row_ids"]).ravel()]
    return [int(row["row_id"])]


def all_ranks_have(mine: bool, device) -> bool:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return mine
    flag = torch.tensor([1 if mine else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def eval_micro_batches(shard, size: int, device):
    """The eval split's micro-batches (their rows) for as long as every rank still has one, so that ranks whose
    shards differ in length stop together and their collectives stay matched."""
    batches = micro_batches(shard, size, skip=set())
    while True:
        item = next(batches, None)
        if not all_ranks_have(item is not None, device):
            return
        assert item is not None  # this rank has one, as every rank has
        yield item[0]
