"""Batch inference with Ray Data: an actor pool holds the model; each actor generates greedily for
batches of chat prompts (left padding, one `generate` call per batch), can also sample several answers
per prompt (rewarded evaluation), and can score reference answers (their summed negative
log-likelihood and token count, for perplexity).

`rayft eval` and `rayft generate` both run through `generate_dataset`; the model is named the way
users name it everywhere else: a built-in alias, a model directory, a run directory (its final/
export), or a LoRA adapter directory (loaded over its base model).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayft.training import storage
from rayft.training.config import EvalConfig
from rayft.training.models import ModelError
from rayft.training.run_dir import ADAPTER_CONFIG, FINAL_DIR, RunDir, is_adapter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class InferenceModel:
    """A resolved model for inference: `path` for from_pretrained (a dir or hub id), plus an adapter dir."""

    name: str  # as the user gave it
    path: str
    adapter: str | None = None
    revision: str | None = None  # hub revision of `path` (the base an adapter was trained on)

    def describe(self) -> str:
        return f"{self.name} (adapter over {self.path})" if self.adapter else self.name


def resolve_inference_model(name: str, base_model: str | None = None, revision: str | None = None) -> InferenceModel:
    """Resolve what a user passed as a model: alias, hub id, model dir, run dir or adapter dir.

    A run dir resolves to its final/ export. An adapter dir (adapter_config.json, no config.json)
    is loaded over `base_model`, or over the base recorded by the export, at `revision` (else the revision
    the export recorded) when the base is a hub id. Local directories must hold a tokenizer; the error says
    how to get one.
    """
    from rayft.training.models import resolve_model

    if storage.is_remote(name):
        return _resolve_remote(name, base_model, revision)
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and RunDir(str(path)).has_final():
        path = Path(RunDir(str(path)).final)  # a run directory
    if path.is_dir() and not (path / "config.json").is_file():
        if not is_adapter(str(path)):
            raise ModelError(
                f"{path} is neither a model directory (config.json), a LoRA adapter (adapter_config.json) nor a "
                "run directory with a final/ export; train first (rayft train) or point at a model directory"
            )
        recorded, recorded_revision = adapter_base(path)
        base = base_model or recorded
        if base is None:
            raise ModelError(f"{path} is a LoRA adapter; say which base model it belongs to (model.name)")
        _need_tokenizer(path)
        return InferenceModel(name, resolve_model(base), str(path.resolve()), revision or recorded_revision)
    resolved = resolve_model(str(path) if path.is_dir() else name)
    if Path(resolved).is_dir():
        _need_tokenizer(Path(resolved))
        revision = None  # a local directory has no hub revision
    return InferenceModel(name, resolved, revision=revision)


def _resolve_remote(name: str, base_model: str | None, revision: str | None) -> InferenceModel:
    """A model, adapter or run directory in cloud storage. It stays a URI here: whoever loads it (an eval actor,
    a serving replica) takes a node-local copy (storage.cached), so no node reads another's disk."""
    from rayft.training.models import resolve_model

    uri = name.rstrip("/")
    try:
        names = set(storage.listdir(uri))
        if "config.json" not in names and FINAL_DIR in names:  # a run directory
            uri = RunDir(uri).final
            names = set(storage.listdir(uri))
    except storage.StorageError as e:
        raise ModelError(str(e)) from None
    if not names:
        raise ModelError(f"{name}: nothing there; give a model, adapter or run directory in the bucket")
    if not names & set(TOKENIZER_FILES):
        raise ModelError(f"model directory {uri} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    if "config.json" in names:
        return InferenceModel(name, uri)
    if ADAPTER_CONFIG not in names:
        raise ModelError(
            f"{uri} is neither a model directory (config.json), a LoRA adapter (adapter_config.json) nor a run "
            "directory with a final/ export"
        )
    recorded, recorded_revision = _recorded_base(
        json.loads(storage.read_text(storage.join(uri, ADAPTER_CONFIG))),
        [storage.join(uri, "rayft_export.json"), storage.join(uri.rsplit("/", 1)[0], "rayft_export.json")],
    )
    base = base_model or recorded
    if base is None:
        raise ModelError(f"{uri} is a LoRA adapter; say which base model it belongs to (model.name)")
    return InferenceModel(name, resolve_model(base), uri, revision or recorded_revision)


def _recorded_base(peft: dict, records: list[str]) -> tuple[str | None, str | None]:
    base, revision = peft.get("base_model_name_or_path") or None, peft.get("revision") or None
    for candidate in records:
        if storage.exists(candidate):
            info = json.loads(storage.read_text(candidate))
            return info.get("base_model") or base, info.get("base_revision") or revision
    return base, revision


def adapter_base(adapter_dir: Path) -> tuple[str | None, str | None]:
    """(base model, hub revision) a LoRA adapter dir was trained on: rayft's export record (rayft_export.json),
    else PEFT's adapter config."""
    peft = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    return _recorded_base(peft, [str(adapter_dir / "rayft_export.json"), str(adapter_dir.parent / "rayft_export.json")])


def _need_tokenizer(path: Path) -> None:
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"model directory {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "next to the weights (tokenizer.save_pretrained(dir)) or re-export the run with `rayft export RUN_DIR`"
        )


def load_for_inference(model: InferenceModel, use_gpu: bool = False, dtype: str = "auto"):
    """(model, tokenizer) ready for batched generation: eval mode, left padding, a pad token.

    dtype as rayft.training.models.resolve_dtype reads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.training.models import resolve_dtype

    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, resolve_dtype(dtype, device))
    path, adapter = storage.cached(model.path), model.adapter and storage.cached(model.adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter or path, revision=None if adapter else model.revision)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=model.revision)
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter).merge_and_unload()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    return lm.to(device).eval(), tokenizer  # pyright: ignore[reportArgumentType] - transformers wraps Module.to, which checkers then see unbound


class Generator:
    """Ray Data actor: holds one model and answers batches of prompts.

    Input columns: `prompt` (a rendered prompt string, ending where the reply starts) and optionally
    `full` + `spans` (the prompt and reference rendered together, and the reference's character
    spans as JSON) to score the reference. Output adds `prediction`, `ref_nll`, `ref_tokens`.

    With `samples` set (rewarded evaluation, training.objective grpo) each prompt is also answered `samples` times at
    `temperature`/`top_p`, and the answers are kept as the model wrote them (not stripped) with their token ids:
    `prediction_ids`, `samples` and `sample_ids` (JSON lists), so graders see what they would see in training.
    Sampling draws from a generator seeded by `seed` and the batch's prompts: the same rows give the same samples.
    """

    def __init__(
        self,
        model: InferenceModel,
        max_new_tokens: int,
        threads: int = 0,
        use_gpu: bool = False,
        dtype: str = "auto",
        samples: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model, self.tok = load_for_inference(model, use_gpu, dtype)
        self.max_new_tokens = max_new_tokens
        self.samples, self.temperature, self.top_p, self.seed = samples, temperature, top_p, seed
        self.device = next(self.model.parameters()).device
        stops = {self.tok.eos_token_id, self.model.generation_config.eos_token_id}
        flat = set()
        for s in stops:
            flat.update(s if isinstance(s, list) else [s])
        self.stop_ids = sorted(i for i in flat if i is not None)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        prompts = [str(p) for p in batch["prompt"]]
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(  # pyright: ignore[reportAttributeAccessIssue] - transformers' own typing
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                eos_token_id=self.stop_ids or None,
                pad_token_id=self.tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        result = dict(batch)
        if self.samples is not None:
            ids = self._answers(new)
            result["prediction"] = np.array([self._text(i) for i in ids], dtype=object)
            result["prediction_ids"] = np.array([json.dumps(i) for i in ids], dtype=object)
            texts, sample_ids = self._sample(enc, prompts) if self.samples else ([[]] * len(prompts),) * 2
            result["samples"] = np.array([json.dumps(t) for t in texts], dtype=object)
            result["sample_ids"] = np.array([json.dumps(i) for i in sample_ids], dtype=object)
        else:
            predictions = [t.strip() for t in self.tok.batch_decode(new, skip_special_tokens=True)]
            result["prediction"] = np.array(predictions, dtype=object)
        if "full" in batch:
            nll, count = self._score([str(f) for f in batch["full"]], [json.loads(str(s)) for s in batch["spans"]])
            result["ref_nll"], result["ref_tokens"] = np.array(nll), np.array(count)
        if "rejected_full" in batch:  # preference rows: the rejected answer is scored too
            texts, spans = (
                [str(f) for f in batch["rejected_full"]],
                [json.loads(str(s)) for s in batch["rejected_spans"]],
            )
            nll, count = self._score(texts, spans)
            result["rej_nll"], result["rej_tokens"] = np.array(nll), np.array(count)
        return result

    def _answers(self, new) -> list[list[int]]:
        """Each generated row's tokens up to and including its first stop token (the padding after it dropped)."""
        out = []
        for row in new.tolist():
            end = next((k + 1 for k, t in enumerate(row) if t in self.stop_ids), len(row))
            out.append(row[:end])
        return out

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _sample(self, enc, prompts: list[str]) -> tuple[list[list[str]], list[list[list[int]]]]:
        """`samples` answers per prompt at the sampling settings: (texts, token ids), one list per prompt."""
        import hashlib

        import torch

        digest = hashlib.blake2b("\n".join([str(self.seed), *prompts]).encode(), digest_size=8).digest()
        torch.manual_seed(int.from_bytes(digest, "little") >> 1)
        with torch.inference_mode():
            out = self.model.generate(  # pyright: ignore[reportAttributeAccessIssue] - transformers' own typing
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=0,  # the whole vocabulary, as rayft's rollouts sample
                num_return_sequences=self.samples,
                eos_token_id=self.stop_ids or None,
                pad_token_id=self.tok.pad_token_id,
            )
        ids = self._answers(out[:, enc["input_ids"].shape[1] :])
        n = self.samples or 1
        grouped = [ids[i * n : (i + 1) * n] for i in range(len(prompts))]  # generate returns them prompt-major
        return [[self._text(i) for i in g] for g in grouped], grouped

    def _score(self, texts: list[str], spans: list[list]) -> tuple[list[float], list[int]]:
        """Summed NLL and number of the reference tokens, in one right-padded forward pass."""
        import torch
        import torch.nn.functional as F

        from rayft.training.formats import collate, tokenize_rendered
        from rayft.training.model_setup import PLAIN_LM_HEAD_TYPES, next_token_logits_at

        rows = [{"input_ids": ids, "labels": labels} for ids, labels in tokenize_rendered(self.tok, texts, spans)]
        batch = {k: v.to(self.device) for k, v in collate(rows, self.tok.pad_token_id).items()}
        targets = batch.pop("labels")[:, 1:]
        mask = targets != -100
        with torch.inference_mode():
            if getattr(self.model.config, "model_type", None) in PLAIN_LM_HEAD_TYPES:
                # project to the vocabulary only at reference positions (as in training)
                logits = next_token_logits_at(self.model, mask, **batch).float()
            else:
                logits = self.model(**batch, use_cache=False).logits[:, :-1][mask].float()
            nll = F.cross_entropy(logits, targets[mask], reduction="none")
            per_row = torch.zeros(len(rows), dtype=torch.float64, device=nll.device)
            per_row.index_add_(0, mask.nonzero()[:, 0], nll.double())
        return per_row.tolist(), mask.sum(1).tolist()


_EVAL = EvalConfig.model_fields  # the defaults are the `eval:` section's, so `rayft eval` and callers agree


@dataclass
class InferenceConfig:
    """How the actor pool runs (built from the job file's `eval` section or CLI flags)."""

    max_new_tokens: int = _EVAL["max_new_tokens"].default
    batch_size: int = _EVAL["batch_size"].default
    replicas: int = _EVAL["replicas"].default
    cpus_per_replica: float = _EVAL["cpus_per_replica"].default
    use_gpu: bool = False
    dtype: str = _EVAL["dtype"].default
    samples: int | None = None  # rewarded evaluation: sampled answers per prompt besides the greedy one (0: none)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def generate_dataset(ds, model: InferenceModel, cfg: InferenceConfig):
    """`ds` (rows with `prompt`, optionally `full` + `spans`) → the same rows with predictions, streamed
    through `cfg.replicas` model actors."""
    return ds.map_batches(
        Generator,
        fn_constructor_kwargs={
            "model": model,
            "max_new_tokens": cfg.max_new_tokens,
            "threads": 0 if cfg.use_gpu else max(1, int(cfg.cpus_per_replica)),
            "use_gpu": cfg.use_gpu,
            "dtype": cfg.dtype,
            "samples": cfg.samples,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "seed": cfg.seed,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        concurrency=cfg.replicas,
        num_cpus=cfg.cpus_per_replica,
        num_gpus=1 if cfg.use_gpu else 0,
    )


def run_inference(
    rows: list[dict], model: InferenceModel, cfg: InferenceConfig, on_rows: Callable[[int], None] | None = None
) -> list[dict]:
    """Run `rows` through the actor pool and return them, in input order, with their predictions.

    Rows are sorted by prompt length first so each batch pads little; `on_rows(n)` reports progress.
    """
    import ray.data

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt"]))
    items = [{"_idx": i, **rows[i]} for i in order]
    blocks = max(1, min(-(-len(items) // cfg.batch_size), 64))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    results: list[dict | None] = [None] * len(rows)
    cfg = dataclasses.replace(cfg, replicas=min(cfg.replicas, blocks))  # no idle model copies for a few rows
    for batch in generate_dataset(ds, model, cfg).iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch["_idx"])
        for j in range(n):
            row = {k: _plain(v[j]) for k, v in batch.items()}
            results[int(row.pop("_idx"))] = row
        if on_rows:
            on_rows(n)
    return [r for r in results if r is not None]


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v
