"""Rewards for reinforcement finetuning: training.rl.grader (an OpenAI grader object, rayft.training.graders) or
training.rl.reward (reward functions with TRL's signature), scored in Ray tasks beside the training workers.

Each rank sends its step's completions to one Ray task (training.rl.grader_cpus CPUs), so grading runs in another
process and never in a training worker: a grader that raises, hangs or crashes its process costs its completions'
rewards (training.rl.failure_reward, counted as `reward_failures`), never the run. A grader object times out per
completion (grader_timeout_s); a reward function scores its whole batch in one call, which gets grader_timeout_s per
completion in all. Without Ray (a worker loop run by hand) the scoring runs in this process.

A reward function is called as fn(completions, prompts=..., completion_ids=..., **fields): completions the sampled
texts, prompts each completion's prompt (its messages, or its text), completion_ids their token ids, and every other
field of the prompt rows by name, one value per completion. It returns one float per completion (None counts as a
failure).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rayft.training.config import RlConfig


@dataclass
class Scores:
    """A batch's rewards, each component's scores (a multi grader's graders, or each reward function), and how many
    completions failed to be scored."""

    rewards: np.ndarray
    parts: dict[str, np.ndarray] = field(default_factory=dict)
    failures: int = 0


class Rewarder:
    def __init__(self, rl: RlConfig, sources: dict[str, str] | None = None):
        self.rl = rl
        self.sources = sources or {}  # FILE.py reward functions' code (reward_sources)
        self._remote = None

    def score(self, completions: list[str], completion_ids: list[list[int]], items: list[dict]) -> Scores:
        """Rewards of completions (items[i] is completion i's prompt row)."""
        import ray

        args = (self.rl.model_dump(), completions, completion_ids, items, self.sources)
        if not ray.is_initialized():
            return score_batch(*args)
        if self._remote is None:
            self._remote = ray.remote(num_cpus=self.rl.grader_cpus, max_retries=0)(score_batch)
        ref = self._remote.remote(*args)
        # Grader objects time out per completion inside the task; the task as a whole gets as long as all of them.
        limit = self.rl.grader_timeout_s * max(len(completions), 1) + 60
        try:
            return ray.get(ref, timeout=limit)
        except Exception as e:  # noqa: BLE001 - the task died or hung: these completions score failure_reward
            import logging

            logging.getLogger("rayft.rewards").warning("grading task failed (%s: %s)", type(e).__name__, e)
            ray.cancel(ref, force=True)
            return Scores(
                np.full(len(completions), self.rl.failure_reward, dtype=np.float64), failures=len(completions)
            )


def score_batch(
    rl: dict, completions: list[str], completion_ids: list[list[int]], items: list[dict], sources: dict[str, str]
) -> Scores:
    """Score a batch in this process (the body of the grading task)."""
    cfg = RlConfig.model_validate(rl)
    if cfg.grader is not None:
        return _grade(cfg, completions, items)
    return _call_functions(cfg, completions, completion_ids, items, sources)


_GRADERS: dict[str, Any] = {}  # this process's parsed graders, by spec


def _grade(cfg: RlConfig, completions: list[str], items: list[dict]) -> Scores:
    from rayft.training.graders import grade_batch, parse_grader

    key = json.dumps([cfg.grader, cfg.score_model.model_dump() if cfg.score_model else None], sort_keys=True)
    if key not in _GRADERS:
        _GRADERS[key] = parse_grader(cfg.grader or {}, score_model_client=_score_model_client(cfg))
    results = grade_batch(
        _GRADERS[key], completions, items, timeout_s=cfg.grader_timeout_s, failure_score=cfg.failure_reward
    )
    rewards = np.array([r.score for r in results], dtype=np.float64)
    names = sorted({k for r in results for k in r.sub_scores})
    parts = {n: np.array([r.sub_scores.get(n, math.nan) for r in results], dtype=np.float64) for n in names}
    failures = sum(1 for r in results if not r.ok)
    return Scores(rewards, parts, failures)


def _score_model_client(cfg: RlConfig):
    """The client score_model graders reach their models with (training.rl.score_model), its key read from this
    process's environment; None without one."""
    from rayft.training.graders import openai_compatible_client

    sm = cfg.score_model
    if sm is None:
        return None
    key = "EMPTY"  # what OpenAI's client sends to a server that wants no key
    if sm.api_key_env:
        key = os.environ.get(sm.api_key_env, "")
        if not key:
            raise RuntimeError(
                f"training.rl.score_model.api_key_env: the environment variable {sm.api_key_env} is not set where the "
                "grading tasks run (set it in the shell that starts rayft, or in the cluster's runtime environment)"
            )
    return openai_compatible_client(sm.base_url, key, timeout_s=sm.timeout_s, structured_output=sm.structured_output)


def _call_functions(
    cfg: RlConfig, completions: list[str], completion_ids: list[list[int]], items: list[dict], sources: dict[str, str]
) -> Scores:
    from rayft.training.formats import PROMPT_KEYS

    prompts = [next((it[k] for k in PROMPT_KEYS if k in it), None) for it in items]
    names = sorted({k for it in items for k in it if k not in PROMPT_KEYS})
    fields = {k: [it.get(k) for it in items] for k in names}
    total = np.zeros(len(completions), dtype=np.float64)
    failed = np.zeros(len(completions), dtype=bool)
    parts = {}
    for rf in cfg.reward:
        fn = load_function(rf.function, sources)
        try:
            out = fn(completions, prompts=prompts, completion_ids=completion_ids, **fields)
            scores = np.array([math.nan if v is None else float(v) for v in out], dtype=np.float64)
            if len(scores) != len(completions):
                raise ValueError(f"returned {len(scores)} scores for {len(completions)} completions")
        except Exception as e:  # noqa: BLE001 - a failing reward function costs its batch's rewards, not the run
            import logging

            logging.getLogger("rayft.rewards").warning(
                "reward function %s failed: %s: %s", rf.function, type(e).__name__, e
            )
            scores = np.full(len(completions), math.nan)
        bad = ~np.isfinite(scores)
        failed |= bad
        name = rf.function.rpartition(":")[2]  # the part's metric: reward/<function name>
        parts[name] = np.where(bad, cfg.failure_reward, scores)
        total += rf.weight * parts[name]
    total = np.where(failed, cfg.failure_reward, total)
    return Scores(total, parts if len(parts) > 1 else {}, int(failed.sum()))


def reward_sources(rl: RlConfig) -> dict[str, str]:
    """The source of every FILE.py reward function of the config, read here (the driver, where the job file's paths
    hold), so workers and grading tasks on any node run the same code without the file. Also checks here, before
    any training, that a score_model grader's key is in the environment (grading tasks inherit the driver's)."""
    sm = rl.score_model
    if sm is not None and sm.api_key_env and not os.environ.get(sm.api_key_env):
        raise ValueError(
            f"training.rl.score_model.api_key_env names {sm.api_key_env}, which is not set: export it (the score "
            "model server's API key) in the shell that runs rayft, or in the cluster's runtime environment"
        )
    out = {}
    for rf in rl.reward:
        where = rf.function.rpartition(":")[0]
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise ValueError(
                    f"training.rl.reward: {where} is not a file (a reward function file's path is relative to the job "
                    "file)"
                )
            with open(where, encoding="utf-8") as f:
                out[where] = f.read()
    return out


def load_function(spec: str, sources: dict[str, str] | None = None) -> Callable[..., Any]:
    """The function a "FILE.py:function" (its source from `sources`, else the file) or "module:function" spec
    names, with an error that says what is missing. A file's code runs once per process, as a module of its own."""
    import sys
    import types

    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        source = (sources or {}).get(where)
        if source is None:
            source = reward_sources(RlConfig(reward=[{"function": spec}]))[where]  # pyright: ignore[reportArgumentType]
        module_name = "rayft_reward_" + hashlib.blake2b(f"{where}\0{source}".encode(), digest_size=8).hexdigest()
        module = sys.modules.get(module_name)
        if module is None:
            module = types.ModuleType(module_name)
            module.__file__ = where
            sys.modules[module_name] = module
            try:
                exec(compile(source, where, "exec"), module.__dict__)  # the job's own reward code, as an import would
            except Exception:
                del sys.modules[module_name]
                raise
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(
                f"training.rl.reward: cannot import {where!r} ({e}); install it where the workers run, or name a file "
                "(rewards.py:function, relative to the job file)"
            ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"training.rl.reward: {where} has no function {name!r}")
    return fn
