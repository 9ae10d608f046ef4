"""Reinforcement finetuning (training.objective: grpo): sample answers to prompts from the live policy, score them
with a grader or reward functions, and push the policy toward the answers that scored above their group's mean.

One optimizer step (the objective `Grpo`, stepped by rayft.training.loop like SFT and DPO):

1. **Rollouts.** Each prompt of this rank's micro-batches gets `samples_per_prompt` completions (its group), sampled
   from the policy as it is now (rayft.training.rollout).
2. **Rewards.** The completions are scored in a Ray task beside the workers (rayft.training.rewards).
3. **Advantages.** A completion's advantage is its reward minus its group's mean reward, divided by the group's
   standard deviation (advantage_scale: group), by the whole step's (batch), or by nothing (none, as Dr. GRPO).
   A group whose rewards are all equal teaches nothing: its advantages are 0, and the step counts it
   (`zero_std_groups`).
4. **Loss.** For each completion token t, with the ratio r_t = pi(t) / pi_old(t) (1 on the first pass over a
   batch, when pi_old is the policy that sampled it) and the completion's advantage A:

       loss_t = -min(r_t A, clip(r_t, 1 - clip_eps, 1 + clip_eps_high) A) + beta * KL_t
       KL_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (the k3 estimator; ref: the adapter switched off)

   summed with weights that make the step's loss (training.rl.loss):
       grpo     the mean over completions of each completion's mean token loss;
       dr_grpo  the sum over all tokens / (completions x max_new_tokens);
       dapo     the mean over every completion token of the step.
   The totals are over every micro-batch of every rank (as the SFT loss is): each micro-batch's share is scaled so
   that DeepSpeed's averaging over micro-batches and ranks leaves exactly that loss.
5. `iterations` > 1 reuses the batch for that many optimizer updates; pi_old stays the sampling policy, so the clip
   bounds how far the later updates move.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np

from rayft.training.config import LoopConfig, RlConfig
from rayft.training.formats import IGNORE_INDEX as IGNORE
from rayft.training.model_setup import has_trained_position_logits
from rayft.training.objectives import StepContext, StepOutcome, eval_micro_batches
from rayft.training.rewards import Scores

# What a step sums over this rank's completions (then over ranks); MAXED are maxima over ranks.
SUMS = (
    "reward",
    "reward_sq",
    "completions",
    "groups",
    "zero_std_groups",
    "completion_tokens",
    "sequence_tokens",
    "padded_tokens",
    "clipped_completions",
    "kl",
    "entropy",
    "clipped_tokens",
    "reward_failures",
    "resampled_groups",
    "timing/generate",
    "timing/grade",
    "timing/train",
    "timing/sync",
)
MAXED = ("completion_length_max",)
ADV_EPS = 1e-4  # added to the std an advantage is divided by (a group with one distinct outlier stays finite)


# --------------------------------------------------------------------------- the math (pure, tested by hand)


def advantages(rewards: np.ndarray, scale: str, batch_std: float | None = None) -> np.ndarray:
    """Advantages of rewards shaped (prompts, samples): each minus its group's mean, divided by the group's std
    (scale "group"), by `batch_std` ("batch": the std of every reward of the step, over all ranks) or not ("none").
    Standard deviations are the sample std (n - 1), as TRL's and OpenRLHF's are."""
    centered = rewards - rewards.mean(axis=1, keepdims=True)
    if scale == "group":
        return centered / (rewards.std(axis=1, ddof=1, keepdims=True) + ADV_EPS)
    if scale == "batch":
        assert batch_std is not None
        return centered / (batch_std + ADV_EPS)
    return centered


def token_weights(lengths: list[int], loss: str, *, max_new_tokens: int, completions: int, tokens: int) -> list[float]:
    """The weight of each token of each completion (by its length) in the step's loss; `completions` and `tokens`
    are the step's totals over all ranks."""
    if loss == "grpo":
        return [1.0 / (n * completions) for n in lengths]
    if loss == "dr_grpo":
        return [1.0 / (max_new_tokens * completions)] * len(lengths)
    return [1.0 / tokens] * len(lengths)  # dapo


def token_losses(logps, old_logps, adv, *, clip_eps: float, clip_eps_high: float, beta: float, ref_logps=None):
    """(loss per token, whether its ratio was clipped, KL per token) for 1-D tensors of token log-probs under the
    policy, the sampling policy and (beta > 0) the reference, and each token's advantage."""
    import torch

    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps_high)
    loss = -torch.minimum(ratio * adv, clipped_ratio * adv)
    clipped = (ratio * adv) > (clipped_ratio * adv)  # the clipped term won the min: no gradient through this token
    kl = torch.zeros_like(logps)
    if beta and ref_logps is not None:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        loss = loss + beta * kl
    return loss, clipped, kl.detach()


# --------------------------------------------------------------------------- the objective


class Grpo:
    """GRPO (rayft.training.objectives.Objective): rollouts, rewards, and a clipped policy-gradient step."""

    one_row = False

    def __init__(self, cfg: LoopConfig, engine):
        import torch

        from rayft.training.models import load_tokenizer
        from rayft.training.rewards import Rewarder, load_function
        from rayft.training.rollout import EngineRollouts

        t = cfg.training
        assert t.rl is not None  # the config requires it for grpo
        self.rl: RlConfig = t.rl
        self.seed = t.seed
        self.micro_batch_size = t.micro_batch_size
        for rf in self.rl.reward:
            load_function(rf.function, cfg.reward_sources)  # a missing module fails the run here, before any step
        device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
        tokenizer = load_tokenizer(cfg.model.name, cfg.model.revision)
        self.rollouts = EngineRollouts(engine, tokenizer, device, zero3=t.zero_stage == 3)
        self.rewarder = Rewarder(self.rl, cfg.reward_sources)
        self.parts = part_names(self.rl)

    def step(self, ctx: StepContext, group: list, step: int = 0) -> StepOutcome:
        import torch
        import torch.distributed as dist

        rl, engine, device, clock = self.rl, ctx.engine, ctx.device, ctx.clock
        g = rl.samples_per_prompt
        sums = dict.fromkeys(SUMS, 0.0)
        # One rollout for the whole step (all micro-batches' prompts batched together, one weight gather under
        # ZeRO-3), graded at once, then split back by micro-batch: prompt-major, g completions per prompt.
        step_rows = [r for rows, _ in group for r in rows]
        all_comps, scores = self._rollout(step_rows, step, sums)
        micro = []  # per micro-batch: (rows, completions), each completion's prompt index local to its micro-batch
        first = 0
        for rows, _ in group:
            mine = all_comps[first * g : (first + len(rows)) * g]
            micro.append((rows, [dataclasses.replace(c, prompt=c.prompt - first) for c in mine]))
            first += len(rows)

        t2 = time.perf_counter()
        rewards = scores.rewards.reshape(-1, g)
        lengths = [len(c.token_ids) for c in all_comps]
        totals = torch.tensor(
            [float(len(all_comps)), float(sum(lengths)), float(rewards.sum()), float((rewards**2).sum())],
            dtype=torch.float64,
            device=device,
        )
        if dist.is_initialized():
            dist.all_reduce(totals)
        n_all, tok_all, r_sum, r_sq = totals.tolist()
        batch_std = math.sqrt(max(r_sq / n_all - (r_sum / n_all) ** 2, 0.0) * n_all / max(n_all - 1, 1))
        adv = advantages(rewards, rl.advantage_scale, batch_std).reshape(-1)
        weights = token_weights(
            lengths, rl.loss, max_new_tokens=rl.max_new_tokens, completions=int(n_all), tokens=int(tok_all)
        )
        scale = ctx.world * ctx.grad_accum
        inputs = [completion_batch(rows, comps, device, ctx.pad_id) for rows, comps in micro]  # once, every pass
        sums["sequence_tokens"] = float(sum(int(b["attention_mask"].sum()) for b, _ in inputs))
        sums["padded_tokens"] = float(sum(b["input_ids"].numel() for b, _ in inputs))
        refs = [self._reference(ctx, batch) for batch, _ in inputs] if rl.beta else [None] * len(micro)
        olds: list = [None] * len(micro)
        loss_sum, offset_of = 0.0, np.cumsum([0] + [len(c) for _, c in micro])
        for it in range(rl.iterations):
            for k, (batch, owner) in enumerate(inputs):
                lo, hi = offset_of[k], offset_of[k + 1]
                clock.start()
                logps, entropy = completion_logps(engine, batch, with_entropy=it == 0)
                if olds[k] is None:
                    olds[k] = logps.detach()
                tok_adv = torch.tensor(adv[lo:hi], dtype=torch.float32, device=device)[owner]
                tok_w = torch.tensor(weights[lo:hi], dtype=torch.float32, device=device)[owner]
                losses, clipped, kl = token_losses(
                    logps,
                    olds[k],
                    tok_adv,
                    clip_eps=rl.clip_eps,
                    clip_eps_high=rl.clip_eps_high or rl.clip_eps,
                    beta=rl.beta,
                    ref_logps=refs[k],
                )
                loss = (losses * tok_w).sum()
                clock.lap("forward_s")
                engine.backward(loss * scale)
                clock.lap("backward_s")
                engine.step()
                clock.lap("optimizer_s")
                loss_sum += float(loss.detach()) / rl.iterations
                if it == 0:
                    sums["kl"] += float(kl.sum())
                    sums["entropy"] += float(entropy.sum()) if entropy is not None else 0.0
                if it == rl.iterations - 1:
                    sums["clipped_tokens"] += float(clipped.sum())
        sums["timing/train"] = time.perf_counter() - t2

        sums["reward"] = float(rewards.sum())
        sums["reward_sq"] = float((rewards**2).sum())
        sums["completions"] = float(len(all_comps))
        sums["groups"] = float(rewards.shape[0])
        sums["zero_std_groups"] = float((rewards.max(axis=1) == rewards.min(axis=1)).sum())
        sums["completion_tokens"] = float(sum(lengths))
        sums["clipped_completions"] = float(sum(c.finish_reason == "length" for c in all_comps))
        sums["reward_failures"] = float(scores.failures)
        part_sums = [float(np.nansum(scores.parts.get(p, np.zeros(0)))) for p in self.parts]
        maxima = [float(max(lengths, default=0))]
        return StepOutcome(loss_sum=loss_sum, loss_count=1, sums=[*sums.values(), *part_sums, *maxima])

    def _rollout(self, rows: list[dict], step: int, sums: dict) -> tuple[list, Scores]:
        """g completions of each row's prompt, graded (prompt-major). With rl.resample_flat_groups, a group whose
        rewards are all equal (no signal) is sampled again with fresh seeds, up to that many times, and its first
        draw with a spread replaces it. Times and redraws are added to `sums`."""
        g = self.rl.samples_per_prompt
        prompts = [np.asarray(r["input_ids"]).tolist() for r in rows]
        items = [json.loads(str(r["item"])) for r in rows]
        comps, scores = self._sample_and_grade(rows, prompts, items, list(range(len(rows))), step, 0, sums)
        rewards = scores.rewards.reshape(-1, g).copy()
        parts = {p: v.reshape(-1, g).copy() for p, v in scores.parts.items()}
        failures = scores.failures
        for draw in range(1, self.rl.resample_flat_groups + 1):
            flat = [i for i in range(len(rows)) if rewards[i].max() == rewards[i].min()]
            if not flat:
                break
            sums["resampled_groups"] += len(flat)
            again, more = self._sample_and_grade(rows, prompts, items, flat, step, draw, sums)
            failures += more.failures
            redrawn = more.rewards.reshape(-1, g)
            for k, i in enumerate(flat):
                if redrawn[k].max() > redrawn[k].min():
                    comps[i * g : (i + 1) * g] = again[k * g : (k + 1) * g]
                    rewards[i] = redrawn[k]
                    for p in parts:
                        parts[p][i] = more.parts[p].reshape(-1, g)[k]
        return comps, Scores(rewards.reshape(-1), {p: v.reshape(-1) for p, v in parts.items()}, failures)

    def _sample_and_grade(self, rows, prompts, items, which: list[int], step: int, draw: int, sums: dict):
        """g completions of the prompts of rows[which] (their draw-th set of seeds) and their scores; each
        completion's `prompt` is its row's index in `rows`."""
        rl, g = self.rl, self.rl.samples_per_prompt
        t0 = time.perf_counter()
        seeds = [[_seed(self.seed, step, rows[i], draw * g + j) for j in range(g)] for i in which]
        comps = self.rollouts.sample(
            [prompts[i] for i in which],
            n=g,
            max_new_tokens=rl.max_new_tokens,
            temperature=rl.temperature,
            top_p=rl.top_p,
            seeds=seeds,
        )
        comps = [dataclasses.replace(c, prompt=which[c.prompt]) for c in comps]
        sums["timing/sync"] += self.rollouts.sync_s
        sums["timing/generate"] += time.perf_counter() - t0 - self.rollouts.sync_s
        t1 = time.perf_counter()
        scores = self.rewarder.score(
            [c.text for c in comps], [c.token_ids for c in comps], [items[c.prompt] for c in comps]
        )
        sums["timing/grade"] += time.perf_counter() - t1
        return comps, scores

    def _reference(self, ctx: StepContext, batch: dict):
        """Token log-probs of a completion_batch under the reference: the model with its adapter switched off."""
        import torch

        with torch.no_grad(), ctx.engine.module.disable_adapter():
            return completion_logps(ctx.engine, batch, with_entropy=False)[0]

    def outcome_metrics(self, outcome: StepOutcome, device) -> dict:
        """Reward mean and std (and each part's mean), the share of groups without signal, completion lengths and
        the clipped share, KL, entropy, the ratio-clipped share, grading failures, and the step's time split."""
        import torch
        import torch.distributed as dist

        n_sums = len(SUMS) + len(self.parts)
        v = torch.tensor(outcome.sums[:n_sums], dtype=torch.float64, device=device)
        m = torch.tensor(outcome.sums[n_sums:], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(v)
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
            world = dist.get_world_size()
        else:
            world = 1
        s = dict(zip([*SUMS, *self.parts], v.tolist(), strict=True))
        n, tokens = max(s["completions"], 1.0), max(s["completion_tokens"], 1.0)
        mean = s["reward"] / n
        out = {
            "reward": mean,
            "reward_std": math.sqrt(max(s["reward_sq"] / n - mean**2, 0.0)),
            "zero_std_groups": s["zero_std_groups"] / max(s["groups"], 1.0),
            "completions": int(s["completions"]),
            "completion_length": s["completion_tokens"] / n,
            "completion_length_max": int(m[0].item()),
            "clipped_completions": s["clipped_completions"] / n,
            "kl": s["kl"] / tokens,
            "entropy": s["entropy"] / tokens,
            "clip_ratio": s["clipped_tokens"] / tokens,
            "reward_failures": int(s["reward_failures"]),
            "resampled_groups": int(s["resampled_groups"]),
            **{k: s[k] / world for k in SUMS if k.startswith("timing/")},
        }
        out |= {f"reward/{p}": s[p] / n for p in self.parts}
        step_s = sum(out[k] for k in out if k.startswith("timing/"))
        out["completions_per_s"] = s["completions"] / step_s if step_s else 0.0
        # The token figures of the step's training forwards (prompt + completion per sequence), in place of the
        # prompt rows' that the loop counts: tokens computed (padded), real ones, and the completion tokens trained.
        out |= {
            "tokens": int(s["padded_tokens"]),
            "nonpad_tokens": int(s["sequence_tokens"]),
            "trained_tokens": int(s["completion_tokens"]),
            "tokens_per_s": s["padded_tokens"] / step_s if step_s else 0.0,
            "nonpad_tokens_per_s": s["sequence_tokens"] / step_s if step_s else 0.0,
        }
        return out

    def evaluate(self, ctx: StepContext, shard) -> dict:
        """The held-out reward: eval_samples completions per eval prompt (1: greedy), their mean reward over all
        ranks' prompts; the same samples at every eval pass, so passes compare."""
        import torch
        import torch.distributed as dist

        rl = self.rl
        n = rl.eval_samples
        temperature = 0.0 if n == 1 else rl.temperature
        totals = [0.0] * (3 + len(self.parts))  # reward, completions, completion tokens, each part's sum
        for rows in eval_micro_batches(shard, self.micro_batch_size, ctx.device):
            seeds = [[_seed(self.seed, -1, r, j) for j in range(n)] for r in rows]
            prompts = [np.asarray(r["input_ids"]).tolist() for r in rows]
            comps = self.rollouts.sample(
                prompts, n=n, max_new_tokens=rl.max_new_tokens, temperature=temperature, top_p=rl.top_p, seeds=seeds
            )
            items = _items(rows, comps)
            scores = self.rewarder.score([c.text for c in comps], [c.token_ids for c in comps], items)
            totals[0] += float(scores.rewards.sum())
            totals[1] += len(comps)
            totals[2] += sum(len(c.token_ids) for c in comps)
            for i, p in enumerate(self.parts):
                totals[3 + i] += float(np.nansum(scores.parts.get(p, np.zeros(0))))
        v = torch.tensor(totals, dtype=torch.float64, device=ctx.device)
        if dist.is_initialized():
            dist.all_reduce(v)
        reward, count, tokens, *parts = v.tolist()
        count = max(count, 1.0)
        out = {"eval_reward": reward / count, "eval_completion_length": tokens / count, "eval_completions": int(count)}
        return out | {f"eval_reward/{p}": s / count for p, s in zip(self.parts, parts, strict=True)}


def part_names(rl: RlConfig) -> list[str]:
    """The reward's components that get a metric of their own: a multi grader's graders, or several functions."""
    if rl.grader is not None:
        graders = rl.grader.get("graders") if rl.grader.get("type") == "multi" else None
        return sorted(graders) if isinstance(graders, dict) else []
    return [rf.function.rpartition(":")[2] for rf in rl.reward] if len(rl.reward) > 1 else []


def completion_batch(rows: list[dict], comps, device, pad_id: int):
    """The completions as model inputs, one right-padded row each (its prompt, then its tokens, which alone carry
    labels), and the completion each label-carrying token belongs to (row-major, as the log-probs come)."""
    import torch

    from rayft.training.formats import collate

    seqs = []
    for c in comps:
        prompt = np.asarray(rows[c.prompt]["input_ids"], dtype=np.int64)
        ids = np.concatenate([prompt, np.asarray(c.token_ids, dtype=np.int64)])
        labels = ids.copy()
        labels[: len(prompt)] = IGNORE
        seqs.append({"input_ids": ids, "labels": labels})
    batch = {k: v.to(device) for k, v in collate(seqs, pad_id).items()}
    trained = batch["labels"][:, 1:] != IGNORE
    owner = trained.nonzero()[:, 0]
    return batch, owner.to(torch.long)


def completion_logps(model, batch: dict, with_entropy: bool):
    """(log-probability of each completion token, their entropies or None), row-major over the batch's labels."""
    import torch.nn.functional as F

    from rayft.training.model_setup import token_entropy

    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if has_trained_position_logits(model):
        out = model(**inputs, labels=labels, return_token_logps=True, return_entropy=with_entropy)
        return out["token_logps"], out.get("token_entropy")
    targets = labels[:, 1:]
    trained = targets != IGNORE
    logits = model(**inputs, use_cache=False).logits[:, :-1][trained].float()
    logps = -F.cross_entropy(logits, targets[trained], reduction="none")
    return logps, token_entropy(logits) if with_entropy else None


def _seed(seed: int, step: int, row: dict, j: int) -> int:
    from rayft.training.rollout import sample_seed

    return sample_seed(seed, step, int(np.asarray(row["sample_key"]).ravel()[0]), j)


def _items(rows: list[dict], comps) -> list[dict]:
    """Each completion's prompt row (the graders' item), each row's JSON read once."""
    import json

    parsed = [json.loads(str(r["item"])) for r in rows]
    return [parsed[c.prompt] for c in comps]
