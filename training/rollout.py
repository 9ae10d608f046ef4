"""Rollouts: completions sampled from the policy being trained (training.objective grpo).

`Rollouts` is what the GRPO objective asks for: n completions per prompt, each with its token ids (the stop token
included, so stopping is learned too) and its text. `EngineRollouts`, the first implementation, runs rayft's own
batching engine (rayft.training.generation, the one the endpoint serves with) over the live policy: the PEFT model
inside the DeepSpeed engine, its adapter the one being trained. Nothing is merged or copied per step: the base
weights stay as they are and every forward reads the adapter's current weights.

Under ZeRO-3 each rank holds a slice of every weight, and a forward gathers them from all ranks: ranks that decode
different numbers of tokens would wait on each other forever. EngineRollouts then gathers the weights once for the
whole rollout (deepspeed.zero.GatheredParameters: a full copy per rank while it samples, freed after), so each rank
decodes alone.

Sampling is reproducible: completion j of the prompt of row r at step s draws from a generator seeded by
(training.seed, s, r's sample key, j), the key being the row's file name, line and copy (rayft.training.data
sample_key, without the directories), so a resumed run draws the same random numbers as the uninterrupted one for
the same prompts, on any number of ranks and from any checkout, with no generator state to save. (A batch of
other prompts rounds the logits differently, so the samples agree only where the micro-batches do.)
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Completion:
    """One sampled answer to a prompt."""

    prompt: int  # index of its prompt in the call's list
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (the model ended it) or "length" (max_new_tokens reached)


class Rollouts(Protocol):
    def sample(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seeds: list[list[int]],
    ) -> list[Completion]:
        """n completions of each prompt (prompt-major: all of prompt 0's, then prompt 1's, ...); seeds[i][j] seeds
        completion j of prompt i; a temperature of 0 is greedy."""
        ...


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (training seed, step, row id, sample index): stable across runs and ranks."""
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EngineRollouts:
    """rayft's continuous-batching engine over the live policy (see the module's docstring). `max_batch`: the most
    completions decoded together (the rest join as others finish)."""

    def __init__(self, ds_engine, tokenizer, device, *, zero3: bool, max_batch: int = 64):
        from rayft.training.generation import TransformersEngine

        self.ds_engine = ds_engine
        self.zero3 = zero3
        self.max_batch = max_batch
        self.engine = TransformersEngine.live(ds_engine.module, tokenizer, device)
        self.sync_s = 0.0  # the last sample's time spent gathering the weights (ZeRO-3)

    def sample(self, prompts, *, n, max_new_tokens, temperature, top_p, seeds) -> list[Completion]:
        from rayft.training.generation import MIN_TEMPERATURE, GenerationRequest, RunningBatch

        module = self.ds_engine.module
        was_training = module.training
        module.eval()  # no dropout while sampling
        try:
            t0 = time.perf_counter()
            with self._whole_weights():
                self.sync_s = time.perf_counter() - t0
                pending = [
                    (
                        (i, j),
                        GenerationRequest(
                            prompt_ids=[int(t) for t in ids],
                            max_tokens=max_new_tokens,
                            temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
                            top_p=top_p,
                            seed=seeds[i][j],
                        ),
                    )
                    for i, ids in enumerate(prompts)
                    for j in range(n)
                ]
                pending.reverse()  # popped from the end: prompt-major order
                batch = RunningBatch(self.engine, merge=True)
                done: dict[tuple[int, int], Completion] = {}
                texts: dict[tuple[int, int], list[str]] = {}
                while pending or len(batch):
                    admit = [pending.pop() for _ in range(min(batch.room(self.max_batch), len(pending)))]
                    events, failures = batch.step(admit, [])
                    if failures:
                        raise failures[0][1]
                    for key, delta in events:
                        texts.setdefault(key, []).append(delta.text)
                        if delta.finish_reason:
                            done[key] = Completion(
                                prompt=key[0],
                                token_ids=list(delta.token_ids or []),
                                text="".join(texts.pop(key)),
                                finish_reason=delta.finish_reason,
                            )
        finally:
            module.train(was_training)
        return [done[(i, j)] for i in range(len(prompts)) for j in range(n)]

    def _whole_weights(self):
        """Under ZeRO-3, every weight gathered on this rank for the rollout (see the module's docstring)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.ds_engine.module.parameters()), modifier_rank=None)
