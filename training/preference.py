"""Preference tuning (training.objective: dpo): the loss, the reference model, and one optimizer step over
micro-batches of pairs: the objective `Dpo` (rayft.training.objectives.Objective), which the training loop
(rayft.training.loop) steps and evaluates as it does SFT.

A pair row holds the chosen answer (input_ids, labels) and the rejected one (rejected_ids, rejected_labels), both
after the same rendered prompt; labels carry loss on the answer tokens only. Each micro-batch runs as one batch of
2 x pairs sequences (chosen first, then rejected), through the policy and, without gradients, the reference:

    log-ratio of an answer   r = log pi(answer | prompt) - log ref(answer | prompt)   (summed over its tokens)
    sigmoid (DPO)            loss = -log sigmoid(beta * (r_chosen - r_rejected))
    ipo                      loss = ((m_chosen - m_rejected) - 1 / (2 beta))^2, m: per-token mean log-ratios
    + sft_weight x the chosen answer's mean token NLL

The implicit rewards are beta x r; a pair is ranked right when the chosen reward is the larger. For LoRA the
reference is the same model with its adapter switched off (no second copy); otherwise a frozen copy of the
reference model, sharded by DeepSpeed like the policy under ZeRO-3.
"""

from __future__ import annotations

from rayft.training.config import DpoConfig, LoopConfig
from rayft.training.formats import IGNORE_INDEX as IGNORE
from rayft.training.model_setup import has_trained_position_logits, load_partitioned, use_trained_position_logits
from rayft.training.objectives import StepContext, StepOutcome, eval_micro_batches

# What a step or an eval pass sums over pairs and all ranks: its loss, the pairs ranked right, the chosen and
# rejected rewards, and the pairs themselves.
SUMS = ("loss", "correct", "chosen", "rejected", "pairs")


def pair_batch(rows: list[dict], device, pad_id: int, one_row: bool = False) -> dict:
    """The micro-batch's 2 x pairs answers as model inputs, each pair as its chosen sequence then its rejected
    one, positions restarting at 0 at each sequence so none attends to another (rayft's packed attention on CPU,
    a block-diagonal causal mask elsewhere). One row per pair, rows padded to the longest pair; or, with
    `one_row` (for packed attention, which runs each sequence alone), every pair in a single row: no padding.
    `answer` gives each position's answer, 0..pairs-1 the chosen ones, pairs..2 x pairs-1 the rejected, -1 the
    padding. A sequence's first token is never a target (as in a batch of separate sequences), so no loss
    crosses from one sequence into the next."""
    import numpy as np
    import torch

    from rayft.training.formats import collate

    n, seqs = len(rows), []
    for i, r in enumerate(rows):
        parts = [(r["input_ids"], r["labels"], i), (r["rejected_ids"], r["rejected_labels"], n + i)]
        ids, labels, positions, answer = [], [], [], []
        for part_ids, part_labels, k in parts:
            part_labels = np.array(part_labels, dtype=np.int64)
            part_labels[0] = IGNORE
            ids.append(np.asarray(part_ids, dtype=np.int64))
            labels.append(part_labels)
            positions.append(np.arange(len(part_ids)))
            answer.append(np.full(len(part_ids), k))
        seqs.append({"input_ids": ids, "labels": labels, "position_ids": positions, "answer": answer})
    groups = [seqs] if one_row else [[s] for s in seqs]
    merged = [{k: np.concatenate([a for s in g for a in s[k]]) for k in seqs[0]} for g in groups]
    batch = collate(merged, pad_id)
    answer = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    for i, m in enumerate(merged):
        answer[i, : len(m["answer"])] = torch.from_numpy(m["answer"])
    batch["answer"] = answer
    return {k: v.to(device) for k, v in batch.items()}


def sequence_logps(model, batch: dict):
    """(summed log-probability of each answer's trained tokens, their number per answer), for the 2 x pairs
    answers of a pair_batch, chosen ones first. Models with rayft's trained-position forward project to the
    vocabulary only at the answers' tokens; others compute logits at every position."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    targets = labels[:, 1:]
    trained = targets != IGNORE
    if has_trained_position_logits(model):
        logps = model(**inputs, labels=labels, return_token_logps=True)["token_logps"]
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][trained]
        logps = -F.cross_entropy(logits.float(), targets[trained], reduction="none")
    answer = batch["answer"][:, 1:][trained]  # the answer of each trained target token, row-major as logps
    n = int(batch["answer"].max()) + 1
    sums = torch.zeros(n, dtype=torch.float32, device=labels.device).index_add(0, answer, logps.float())
    return sums, torch.bincount(answer, minlength=n)


def dpo_losses(policy, reference, counts, cfg: DpoConfig):
    """Per-pair losses and the chosen and rejected rewards, from the summed log-probs of the 2 x pairs
    sequences (chosen first) under the policy and the reference, and their trained-token counts."""
    import torch.nn.functional as F

    n = policy.shape[0] // 2
    ratio = policy - reference
    if cfg.loss == "ipo":  # per-token means: IPO's target margin is on a length-free scale
        mean = ratio / counts.clamp(min=1)
        losses = ((mean[:n] - mean[n:]) - 1 / (2 * cfg.beta)) ** 2
    else:
        losses = -F.logsigmoid(cfg.beta * (ratio[:n] - ratio[n:]))
    if cfg.sft_weight:
        losses = losses + cfg.sft_weight * (-policy[:n] / counts[:n].clamp(min=1))
    rewards = cfg.beta * ratio.detach()
    return losses, rewards[:n], rewards[n:]


class Reference:
    """Log-probs under the reference model: the policy with its LoRA adapter switched off, or a frozen copy."""

    def __init__(self, engine, model=None):
        self.engine, self.model = engine, model

    def logps(self, batch: dict):
        import torch

        with torch.no_grad():
            if self.model is not None:
                return sequence_logps(self.model, batch)[0]
            with self.engine.module.disable_adapter():
                return sequence_logps(self.engine, batch)[0]


def build_reference(cfg, engine, use_gpu: bool) -> Reference:
    """The run's reference model (training.dpo.reference): for LoRA from the base, the policy itself with the
    adapter off; else a frozen copy of the starting model (or of the model the setting names), loaded like the
    policy and, under ZeRO-3, partitioned across the ranks by an inference-only DeepSpeed engine."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayft.training.cpu_ops import use_packed_attention
    from rayft.training.ds_config import build_ds_config, resolve_precision
    from rayft.training.models import resolve_model

    t = cfg.training
    if t.method == "lora" and t.dpo.reference == "base":
        return Reference(engine)
    name = cfg.model.name if t.dpo.reference == "base" else reference_model_dir(t.dpo.reference)
    precision = resolve_precision(t, use_gpu)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    zero3 = t.zero_stage == 3
    if zero3:  # partitioned while it loads, as the policy was (rayft.training.model_setup.sharded_from_the_start)
        load_partitioned(build_ds_config(t, t.micro_batch_size, 1, use_gpu), keep_earlier=True)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(name),
        dtype=dtype,
        attn_implementation="sdpa",
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision if t.dpo.reference == "base" else None,
    )
    model.requires_grad_(False)
    model.eval()
    # The policy's own CPU attention and trained-position logits (rayft.training.model_setup.build_model), so the two
    # forwards of a micro-batch do the same work.
    if not use_gpu:
        use_packed_attention(model)
    if t.skip_untrained_logits:
        use_trained_position_logits(model)
    if zero3:
        import deepspeed

        ds_config = {k: v for k, v in build_ds_config(t, t.micro_batch_size, 1, use_gpu).items() if k != "optimizer"}
        ds_config.pop("scheduler", None)
        model, *_ = deepspeed.initialize(model=model, config=ds_config)
        model.eval()
        return Reference(engine, model)
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    return Reference(engine, model.to(device))  # pyright: ignore[reportArgumentType] - transformers wraps Module.to, which checkers then see unbound


def reference_model_dir(path: str) -> str:
    """A model to compare against: a model dir, or a run dir's final export (its merged model)."""
    from rayft.training import storage
    from rayft.training.run_dir import RunDir

    final = RunDir(path).final
    if storage.exists(storage.join(final, "config.json")):
        return final
    return path


def dpo_forward(engine, reference: Reference, rows: list[dict], device, pad_id: int, cfg: DpoConfig):
    """A micro-batch of pairs through the policy and the reference: (per-pair losses, chosen rewards,
    rejected rewards)."""
    batch = pair_batch(rows, device, pad_id, one_row=uses_packed_attention(engine))
    ref = reference.logps(batch)
    policy, counts = sequence_logps(engine, batch)
    return dpo_losses(policy, ref, counts, cfg)


def uses_packed_attention(model) -> bool:
    """Whether the model (inside its DeepSpeed engine and PEFT wrapper) runs rayft's packed CPU attention."""
    from rayft.training.cpu_ops import NAME

    model = getattr(model, "module", model)
    return getattr(model.config, "_attn_implementation", None) == NAME


class Dpo:
    """Preference tuning (rayft.training.objectives.Objective): the policy against its reference, pair by pair."""

    def __init__(self, cfg: LoopConfig, engine):
        self.dpo, self.micro_batch_size = cfg.training.dpo, cfg.training.micro_batch_size
        self.reference = build_reference(cfg, engine, cfg.use_gpu)  # what the rewards compare against
        self.one_row = uses_packed_attention(engine)  # a micro-batch's pairs run as one row (pair_batch)

    def step(self, ctx: StepContext, group: list, step: int = 0) -> StepOutcome:
        """One optimizer step over this rank's grad_accum micro-batches of pairs. The loss is the mean over every
        pair of the step on every rank: each micro-batch's summed loss is scaled so that DeepSpeed's averaging
        (1/grad_accum per micro-batch, 1/world over ranks) leaves sum / pairs. The outcome holds the step's sums
        (SUMS) on this rank and the step's pairs on all ranks."""
        import torch
        import torch.distributed as dist

        engine, device, clock = ctx.engine, ctx.device, ctx.clock
        count = torch.tensor([float(sum(len(rows) for rows, _ in group))], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(count)
        scale = ctx.world * ctx.grad_accum / max(count.item(), 1)
        sums = [0.0] * len(SUMS)
        for rows, _ in group:
            clock.start()
            losses, chosen, rejected = dpo_forward(engine, self.reference, rows, device, ctx.pad_id, self.dpo)
            clock.lap("forward_s")
            engine.backward(losses.sum() * scale)
            clock.lap("backward_s")
            engine.step()
            clock.lap("optimizer_s")
            _add(sums, losses.detach(), chosen, rejected)
        return StepOutcome(loss_sum=sums[0], loss_count=int(count.item()), sums=sums)

    def outcome_metrics(self, outcome: StepOutcome, device) -> dict:
        """The loss per pair, reward accuracy, chosen and rejected rewards and their margin."""
        return reduce_sums(outcome.sums, device)

    def evaluate(self, ctx: StepContext, shard) -> dict:
        """The preference loss, reward accuracy and rewards over the whole eval split."""
        import torch

        engine, device = ctx.engine, ctx.device
        engine.eval()
        sums = [0.0] * len(SUMS)
        with torch.no_grad():
            for rows in eval_micro_batches(shard, self.micro_batch_size, device):
                losses, chosen, rejected = dpo_forward(engine, self.reference, rows, device, ctx.pad_id, self.dpo)
                _add(sums, losses, chosen, rejected)
        engine.train()
        return {f"eval_{k}": v for k, v in reduce_sums(sums, device).items()}


def _add(sums: list[float], losses, chosen, rejected) -> None:
    for i, v in enumerate(
        (losses.sum(), (chosen > rejected).sum(), chosen.sum(), rejected.sum(), float(losses.numel()))
    ):
        sums[i] += float(v)


def reduce_sums(sums: list[float], device) -> dict:
    """The means over all ranks' pairs: loss, reward accuracy, chosen and rejected rewards, their margin."""
    import torch
    import torch.distributed as dist

    v = torch.tensor(sums, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(v)
    loss, correct, chosen, rejected, pairs = v.tolist()
    pairs = max(pairs, 1.0)
    return {
        "loss": loss / pairs,
        "reward_accuracy": correct / pairs,
        "reward_chosen": chosen / pairs,
        "reward_rejected": rejected / pairs,
        "reward_margin": (chosen - rejected) / pairs,
        "pairs": int(pairs),
    }
