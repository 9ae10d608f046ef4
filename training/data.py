"""The Ray Data instruction pipeline: files -> validated rows -> rendered text -> token ids + labels -> packed rows.

Every stage streams. Rows carry a `source` ("file.jsonl:12", "data.parquet row 7", ...) from the
read onwards, so a bad row is reported where the user can fix it. `check_rows` runs the read and
validation stages once before training; `build_datasets` returns the Ray Datasets that Ray Train
feeds to `ray.train.get_dataset_shard`; `inspect_data` computes the numbers `rayft data inspect` prints.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from rayft.training import storage
from rayft.training.config import DataConfig, ModelConfig
from rayft.training.formats import RowError, TemplateError, normalize, parse_json_line

FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
READ_BATCH_ROWS = 2048
MAX_REPORTED_BAD_ROWS = 20


class DataError(Exception):
    """Data that cannot be trained on; the message lists where and what to do."""

    error_kind = "data"  # what `rayft` calls it ("data error ..."); rayft.training.run_dir.user_error


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    kind: str  # "files", "saved", "hub"
    paths: list[str] = field(default_factory=list)
    name: str = ""


def resolve_source(spec: str | list[str], what: str) -> Source:
    """Turn a data.train / data.eval value into files, a saved `datasets` dir, or a hub dataset."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if len(specs) == 1 and specs[0].startswith("hf://"):
        return Source("hub", name=specs[0][len("hf://") :])
    if len(specs) == 1 and os.path.isdir(specs[0]) and _is_saved_dataset(specs[0]):
        return Source("saved", paths=[specs[0]])
    files: list[str] = []
    for s in specs:
        if storage.is_remote(s):
            files += _remote_files(s, what)
            continue
        s = s.removeprefix("file://")
        if os.path.isdir(s):
            found = sorted(str(p) for p in Path(s).rglob("*") if p.is_file() and p.suffix.lower() in FILE_TYPES)
            if not found:
                raise DataError(f"{what}: directory {s} has no .jsonl/.json/.parquet/.csv files")
            files += found
        elif any(c in s for c in "*?["):
            found = sorted(glob.glob(s, recursive=True))
            if not found:
                raise DataError(f"{what}: the pattern {s} matches no files")
            files += found
        elif os.path.isfile(s):
            files.append(s)
        else:
            raise DataError(f"{what}: file not found: {s} (relative paths are relative to the job file)")
    for f in files:
        if Path(f).suffix.lower() not in FILE_TYPES:
            raise DataError(f"{what}: {f}: unsupported file type; use .jsonl, .json, .parquet or .csv")
    return Source("files", paths=files)


def _remote_files(spec: str, what: str) -> list[str]:
    """Files in cloud storage (s3://, gs://, ...): one file, a directory (prefix) or a glob pattern."""
    try:
        if any(c in spec for c in "*?["):
            found = storage.match(spec)
            if not found:
                raise DataError(f"{what}: the pattern {spec} matches no files")
            return found
        if storage.is_dir(spec):
            found = [f for f in storage.find_files(spec) if Path(f).suffix.lower() in FILE_TYPES]
            if not found:
                raise DataError(f"{what}: {spec} holds no .jsonl/.json/.parquet/.csv files")
            return found
        if storage.exists(spec):
            return [spec]
    except storage.StorageError as e:
        raise DataError(f"{what}: {e}") from None
    raise DataError(f"{what}: not found: {spec}")


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


READ_CHUNK_BYTES = 4 << 20  # JSONL files are read in chunks of about this size, in parallel


def repeat_counts(paths: list[str], repeat: dict[str, int]) -> dict[str, int]:
    """Copies of each file per epoch from data.repeat, whose keys name files by path suffix (a file name
    such as `knowledge.jsonl`, or `facts/knowledge.jsonl`). A key that names no training file is an error."""
    counts = {storage.absolute(p): 1 for p in paths}
    for key, times in repeat.items():
        suffix = "/" + key.strip("/").removeprefix("./")
        hits = [p for p in counts if p.endswith(suffix) or p == storage.absolute(key)]
        if not hits:
            names = ", ".join(sorted(storage.basename(p) for p in counts)[:10])
            raise DataError(f"data.repeat: {key!r} names none of the training files ({names})")
        for p in hits:
            counts[p] = times
    return counts


def plan_reads(paths: list[str], copies: dict[str, int] | None = None) -> list[dict]:
    """Read tasks: JSONL files split at line boundaries into ~READ_CHUNK_BYTES chunks (each knowing its
    first line number, for error messages); other files whole. Many small tasks keep every tokenizer
    actor busy and let the first training batch arrive before a large file is read to its end."""
    items = []
    for path in paths:
        path = storage.absolute(path)
        for copy in range((copies or {}).get(path, 1)):
            items += _file_reads(path, copy)
    return items


def _file_reads(path: str, copy: int) -> list[dict]:
    items = []
    size = storage.size(path)
    if FILE_TYPES[Path(path).suffix.lower()] != "jsonl" or size <= READ_CHUNK_BYTES:
        return [{"path": path, "start": 0, "end": size, "line": 1, "copy": copy}]
    with storage.open_binary(path) as f:
        start, line = 0, 1
        while start < size:
            f.seek(min(start + READ_CHUNK_BYTES, size))
            f.readline()  # run to the end of the line the boundary fell in
            end = min(f.tell(), size)
            items.append({"path": path, "start": start, "end": end, "line": line, "copy": copy})
            f.seek(start)
            line += f.read(end - start).count(b"\n")
            start = end
    return items


def _read_file(batch: dict) -> Any:
    """Ray Data UDF: read tasks in, batches of {"source", "raw"} out (raw = the row as JSON text)."""
    copies = batch.get("copy", [0] * len(batch["path"]))
    for path, start, end, line, copy in zip(
        batch["path"], batch["start"], batch["end"], batch["line"], copies, strict=True
    ):
        sources: list[str] = []
        raws: list[str] = []
        for src, raw in _iter_file(str(path), int(start), int(end), int(line)):
            # repeated copies (data.repeat) are distinct rows: own ids, so each is trained once per epoch
            sources.append(f"{src}#{int(copy)}" if copy else src)
            raws.append(raw)
            if len(sources) >= READ_BATCH_ROWS:
                yield {"source": sources, "raw": raws}
                sources, raws = [], []
        if sources:
            yield {"source": sources, "raw": raws}


def _iter_file(path: str, start: int, end: int, first_line: int):
    """(source, raw) pairs; a source is "path:line" (or path[index] / "path row N"), stable across runs."""
    name = path
    kind = FILE_TYPES[Path(path).suffix.lower()]
    if kind == "jsonl" or (kind == "json" and _looks_like_jsonl(path)):
        with storage.open_binary(path) as f:
            f.seek(start)
            lineno = first_line
            while f.tell() < end:
                line = f.readline()
                if not line:
                    break
                text = line.decode("utf-8", errors="replace")
                if text.strip():
                    yield f"{name}:{lineno}", text
                lineno += 1
    elif kind == "json":
        with storage.open_text(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                yield f"{name}:{e.lineno}", "\0invalid JSON: " + e.msg
                return
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            yield f"{name}", "\0a .json file must hold a list of rows (or JSONL lines)"
            return
        for i, row in enumerate(data):
            yield f"{name}[{i}]", json.dumps(row)
    elif kind == "csv":
        with storage.open_text(path, newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{name}:{reader.line_num}", json.dumps(row)
    else:
        import pyarrow.parquet as pq

        i = 0
        for rb in pq.ParquetFile(storage.open_binary(path)).iter_batches(batch_size=READ_BATCH_ROWS):
            for row in rb.to_pylist():
                yield f"{name} row {i}", json.dumps(row, default=_json_default)
                i += 1


def _looks_like_jsonl(path: str) -> bool:
    with storage.open_text(path) as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
    return head == "{"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def _hf_to_rows(hf_ds, label: str):
    import ray.data

    hf_ds = hf_ds.add_column("__rayft_row", list(range(len(hf_ds))))
    ds = ray.data.from_huggingface(hf_ds)

    def to_raw(batch: dict) -> dict:
        rows = batch.pop("__rayft_row")
        keys = list(batch)
        raws = [json.dumps({k: batch[k][j] for k in keys}, default=_json_default) for j in range(len(rows))]
        return {"source": [f"{label} row {int(r)}" for r in rows], "raw": raws}

    return ds.map_batches(to_raw, batch_format="numpy")  # pyright: ignore[reportArgumentType]


def deterministic_order() -> None:
    """Same seed, same row order: Ray Data keeps block order in this process's datasets (a dataset takes the
    setting when it is created). Set by the pipeline itself, so it holds for a caller's own ray.init()."""
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True


def quiet_ray_data() -> None:
    """No Ray Data progress bars or execution banners in this process: rayft prints its own progress line."""
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def read_rows(source: Source, data: DataConfig, repeat: dict[str, int] | None = None):
    """A Ray Dataset of {"source", "raw"} rows, one per example (files named in `repeat` several times)."""
    import ray.data

    deterministic_order()  # every dataset of the pipeline starts here
    if source.kind == "files":
        tasks = plan_reads(source.paths, repeat_counts(source.paths, repeat) if repeat else None)
        files = ray.data.from_items(tasks, override_num_blocks=len(tasks))
        return files.map_batches(_read_file, batch_size=1, num_cpus=data.cpus_per_data_task)  # pyright: ignore[reportArgumentType]
    import datasets

    if source.kind == "saved":
        hf = datasets.load_from_disk(source.paths[0])
        if isinstance(hf, datasets.DatasetDict):
            if data.hub_split not in hf:
                raise DataError(
                    f"{source.paths[0]} has splits {', '.join(map(str, hf))}; set data.hub_split to one of them"
                )
            hf = hf[data.hub_split]
        return _hf_to_rows(hf, os.path.basename(source.paths[0].rstrip("/")))
    hf = datasets.load_dataset(source.name, split=data.hub_split)
    return _hf_to_rows(hf, f"{source.name}[{data.hub_split}]")


# --------------------------------------------------------------------------- validation


def _validate_batch(batch: dict, fmt: str, keep_raw: bool = False) -> dict:
    """Ray Data UDF: parse and check rows; bad rows keep their source and get an error message."""
    docs, errors = [], []
    for raw in batch["raw"]:
        raw = str(raw)
        try:
            if raw.startswith("\0"):
                raise RowError(raw[1:])
            docs.append(json.dumps(normalize(parse_json_line(raw), fmt)))
            errors.append("")
        except RowError as e:
            docs.append("")
            errors.append(str(e))
    out = {"source": list(batch["source"]), "doc": docs, "error": errors}
    if keep_raw:
        out["raw"] = list(batch["raw"])
    return out


def _split_filter(seed: int, fraction: float, want_eval: bool):
    threshold = int(fraction * 1_000_000)

    def keep(batch: dict) -> dict:
        mask = np.array(
            [(zlib.crc32(f"{seed}:{s}".encode()) % 1_000_000 < threshold) == want_eval for s in batch["source"]],
            dtype=bool,
        )
        return {k: np.asarray(v)[mask] for k, v in batch.items()}

    return keep


def validated_rows(data: DataConfig, split: str, keep_raw: bool = False):
    """Validated rows ({"source", "doc", "error"}, plus the row's JSON text as "raw" with keep_raw) of
    the train or eval split, bad rows included."""
    if split == "eval" and data.eval is None and data.eval_fraction == 0:
        return None
    spec = data.eval if split == "eval" and data.eval is not None else data.train
    repeat = data.repeat if split == "train" else None  # evaluation rows are never repeated
    ds = read_rows(resolve_source(spec, f"data.{split if spec is data.eval else 'train'}"), data, repeat)
    ds = ds.map_batches(
        _validate_batch,  # pyright: ignore[reportArgumentType]
        fn_kwargs={"fmt": data.format, "keep_raw": keep_raw},
        batch_format="numpy",
        num_cpus=data.cpus_per_data_task,
    )
    if data.eval is None and data.eval_fraction > 0:
        ds = ds.map_batches(
            _split_filter(data.seed, data.eval_fraction, want_eval=(split == "eval")),  # pyright: ignore[reportArgumentType]
            batch_format="numpy",
            num_cpus=data.cpus_per_data_task,
        )
    return ds


@dataclass
class RowCheck:
    split: str
    rows: int = 0
    bad: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)  # (source, problem)


def check_rows(data: DataConfig, splits: tuple[str, ...] = ("train", "eval")) -> dict[str, RowCheck]:
    """One streaming pass over read + validation: count rows and collect bad ones.

    With on_bad_rows: error, raises DataError naming the first bad rows (file:line and problem)
    and the total, before any training starts.
    """
    checks: dict[str, RowCheck] = {}
    for split in splits:
        ds = validated_rows(data, split)
        if ds is None:
            continue
        check = checks[split] = RowCheck(split)
        for batch in ds.select_columns(["source", "error"]).iter_batches(batch_size=4096, batch_format="numpy"):
            check.rows += len(batch["error"])
            for src, err in zip(batch["source"], batch["error"], strict=True):
                if err:
                    check.bad += 1
                    if len(check.examples) < MAX_REPORTED_BAD_ROWS:
                        check.examples.append((str(src), str(err)))
        if check.rows == check.bad and check.rows > 0 and data.on_bad_rows == "skip":
            raise DataError(
                f"data.{split}: all {check.rows} rows are bad, nothing is left after skipping them:\n"
                + _bad_listing(check)
            )
        if check.rows == 0:
            raise DataError(f"data.{split}: no rows found (are the files empty?)")
    bad = [c for c in checks.values() if c.bad]
    if bad and data.on_bad_rows == "error":
        total = sum(c.bad for c in bad)
        parts = [f"{total} bad row{'s' if total != 1 else ''} found; nothing was trained."]
        for c in bad:
            parts.append(
                f"data.{c.split}: {c.bad} of {c.rows} rows are bad"
                + (f" (first {len(c.examples)} shown)" if c.bad > len(c.examples) else "")
                + ":"
            )
            parts.append(_bad_listing(c))
        parts.append("Fix these rows, or set data.on_bad_rows: skip to drop them (they will be counted).")
        raise DataError("\n".join(parts))
    return checks


def _bad_listing(check: RowCheck) -> str:
    return "\n".join(f"  {src}: {err}" for src, err in check.examples)


# --------------------------------------------------------------------------- tokenizing


class Tokenize:
    """Renders and tokenizes validated rows; each Ray worker process keeps one per setting (see tokenize_batch)."""

    def __init__(self, model: dict, data: dict, keep_dropped: bool = False, pairs: bool = False, prompts: bool = False):
        from rayft.training.formats import Renderer
        from rayft.training.models import load_tokenizer

        self.data = DataConfig.model_validate(data)
        m = ModelConfig.model_validate(model)
        self.tokenizer = load_tokenizer(m.name, m.revision)
        self.renderer = Renderer(
            self.tokenizer, self.data.template, self.data.train_on_inputs, self.data.special_tokens_in_content
        )
        self.keep_dropped = keep_dropped
        self.pairs = pairs  # preference pairs (training.objective dpo): each row is its chosen and rejected answer
        self.prompts = prompts  # prompts (training.objective grpo): each row is a prompt and its graders' item

    def __call__(self, batch: dict) -> dict:
        from rayft.training.formats import tokenize_rendered

        keep = [i for i, e in enumerate(batch["error"]) if not e]
        texts, spans, sources, items = [], [], [], []
        for i in keep:
            src = str(batch["source"][i])
            doc = json.loads(batch["doc"][i])
            if self.prompts != (doc["kind"] == "prompt"):
                raise DataError(f"{src}: {PROMPT_MISMATCH[self.prompts]}")
            if self.pairs != (doc["kind"] == "pair"):
                raise DataError(f"{src}: {PAIR_MISMATCH[self.pairs]}")
            try:
                for d in (doc["chosen"], doc["rejected"]) if self.pairs else (doc,):
                    text, sp = self.renderer.render(d)
                    texts.append(text)
                    spans.append(sp)
            except RowError as e:
                raise DataError(f"{src}: {e}") from None
            except TemplateError as e:
                raise DataError(str(e)) from None
            sources.append(src)
            items.append(json.dumps(doc.get("item"), ensure_ascii=False))
        columns = ["source", "row_id", "input_ids", "labels", "num_tokens", "num_trained", "status"]
        columns += ["rejected_ids", "rejected_labels"] if self.pairs else PROMPT_COLUMNS if self.prompts else []
        out: dict[str, list] = {k: [] for k in columns}
        encoded = tokenize_rendered(self.tokenizer, texts, spans) if texts else []
        per_row = 2 if self.pairs else 1
        for n, src in enumerate(sources):
            seqs = [self._fit(src, ids, labels) for ids, labels in encoded[n * per_row : (n + 1) * per_row]]
            statuses = [st for _, _, st in seqs]
            status = next((st for st in ("dropped", "truncated") if st in statuses), "ok")
            trained = [int((labels != -100).sum()) for _, labels, _ in seqs]
            if self.prompts and status == "truncated":
                status = "dropped"  # a prompt cut short lost its question's end: never sampled from
            elif min(trained) == 0 and status != "dropped" and not self.prompts:
                status = "dropped"  # nothing left to learn from (e.g. the reply was truncated away)
            if status == "dropped" and not self.keep_dropped:
                continue
            out["source"].append(src)
            out["row_id"].append(row_id(src))
            (ids, labels, _), *rest = seqs
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            if self.pairs:
                out["rejected_ids"].append(rest[0][0])
                out["rejected_labels"].append(rest[0][1])
            if self.prompts:
                out["item"].append(items[n])
                out["sample_key"].append(sample_key(src))
            out["num_tokens"].append(sum(len(encoded[n * per_row + k][0]) for k in range(per_row)))
            out["num_trained"].append(sum(trained))
            out["status"].append(status)
        return out

    def _fit(self, src: str, ids, labels):
        """One sequence held to data.max_seq_len by data.overlong: (ids, labels, status)."""
        max_len, n = self.data.max_seq_len, len(ids)
        if n <= max_len:
            return ids, labels, "ok"
        if self.data.overlong == "error":
            raise DataError(
                f"{src}: {n} tokens, longer than data.max_seq_len ({max_len}); raise max_seq_len or set "
                "data.overlong to truncate or drop"
            )
        if self.data.overlong == "drop":
            return ids, labels, "dropped"
        return ids[:max_len], labels[:max_len], "truncated"


PROMPT_MISMATCH = {
    True: "not a prompt, and training.objective grpo samples answers to prompts: give each row 'messages' ending "
    "in a user turn, or 'prompt', and the fields its grader reads (set data.format: prompt or auto)",
    False: "a prompt with no answer to learn from; training.objective grpo samples answers to prompts (set it, with "
    "training.rl), other objectives need rows with answers",
}

PAIR_MISMATCH = {
    True: "not a preference pair, and training.objective dpo learns from pairs only: give each row a prompt, a "
    "chosen and a rejected answer ({prompt, chosen, rejected} or {input, preferred_output, non_preferred_output})",
    False: "a preference pair (chosen and rejected answers), and training.objective is sft: set training.objective: "
    "dpo to learn from pairs, or give rows with one answer",
}


_TOKENIZERS: dict[str, Tokenize] = {}  # this worker process's loaded tokenizers, newest last
_TOKENIZERS_KEPT = 2


def tokenize_batch(
    batch: dict, model: dict, data: dict, keep_dropped: bool = False, pairs: bool = False, prompts: bool = False
) -> dict:
    """Ray Data task: tokenize a batch. Loading a tokenizer costs seconds, tokenizing a batch milliseconds, so
    each worker process keeps the tokenizers it loaded: later tasks, epochs, eval passes and runs of the same
    job reuse them (an actor pool would load them again for every pass)."""
    key = json.dumps([model, data, keep_dropped, pairs, prompts], sort_keys=True, default=str)
    tok = _TOKENIZERS.pop(key, None) or Tokenize(model, data, keep_dropped, pairs, prompts)
    _TOKENIZERS[key] = tok
    while len(_TOKENIZERS) > _TOKENIZERS_KEPT:
        _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
    return tok(batch)


def row_id(source: str) -> int:
    """A stable 63-bit id of an example, from where it was read (used to skip trained rows on resume)."""
    return int.from_bytes(hashlib.blake2b(source.encode(), digest_size=8).digest(), "little") >> 1


# A prompt row's columns besides the tokens (training.objective grpo): its graders' item, and its sampling key.
PROMPT_COLUMNS = ["item", "sample_key"]


def sample_key(source: str) -> int:
    """A prompt row's id for seeding its samples (training.objective grpo): its file's name, line and copy, without
    the directories, so the same job samples the same answers from any checkout, machine or bucket. (Unlike row_id
    it may repeat for same-named files in two directories; two prompts then share seeds, which is harmless.)"""
    return row_id(source.rsplit("/", 1)[-1])


def _pack_batch(batch: dict, max_seq_len: int, seed: int) -> dict:
    from rayft.training.formats import pack_examples

    ids = np.asarray(batch["row_id"], dtype=np.int64)
    # The order of a window's packed rows is seeded by data.seed and the window's examples: the same data
    # packs into the same rows in the same order on every pass, which resume relies on.
    window_seed = [seed, int.from_bytes(hashlib.blake2b(ids.tobytes(), digest_size=8).digest(), "little")]
    examples = list(zip(batch["input_ids"], batch["labels"], strict=True))
    rows = pack_examples(examples, max_seq_len, seed=window_seed)
    out = {k: [r[k] for r in rows] for k in ("input_ids", "labels", "position_ids", "num_examples")}
    out["row_ids"] = [ids[r["members"]] for r in rows]
    return out


PACK_WINDOW_ROWS = 1024


LOCAL_SHUFFLE_MAX_ROWS = 50_000


def shuffled_rows(ds, data: DataConfig, rows: int | None):
    """The validated rows in a seeded random order. Ray Data's distributed shuffle costs seconds even for a
    few rows, so a split known to hold at most LOCAL_SHUFFLE_MAX_ROWS rows (raw JSON text, a few MB to
    tens of MB) is permuted in this process instead, with the same guarantee: same seed, same order."""
    import ray.data

    if rows is not None and rows <= LOCAL_SHUFFLE_MAX_ROWS:
        items = ds.take_all()
        order = np.random.default_rng(data.seed).permutation(len(items))
        return ray.data.from_items([items[i] for i in order], override_num_blocks=max(1, min(len(items) // 2048, 8)))
    # Fractional CPUs: beside training workers that hold whole CPUs, a 1-CPU shuffle task would never start.
    return ds.random_shuffle(seed=data.seed, num_cpus=data.cpus_per_data_task)


def tokenized(
    model: ModelConfig,
    data: DataConfig,
    split: str,
    keep_dropped: bool = False,
    shuffle: bool = True,
    rows: int | None = None,
    pairs: bool = False,
    prompts: bool = False,
):
    """Token rows {"source", "input_ids", "labels", "num_tokens", "num_trained", "status"} for a split, the
    training split shuffled when data.shuffle is on (`shuffle=False`: file order, for counting). `rows` is
    the split's size when known (check_rows); see shuffled_rows."""
    ds = validated_rows(data, split)
    if ds is None:
        return None
    if split == "train" and data.shuffle and shuffle:
        ds = shuffled_rows(ds, data, rows)
    # A small split is one block, so one task: Ray Data would warn about the unused concurrency on every run.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    return ds.map_batches(
        tokenize_batch,  # pyright: ignore[reportArgumentType]
        fn_kwargs={
            "model": model.model_dump(),
            "data": data.model_dump(),
            "keep_dropped": keep_dropped,
            "pairs": pairs,
            "prompts": prompts,
        },
        batch_size=256,
        batch_format="numpy",
        num_cpus=data.cpus_per_data_task,
        concurrency=data.tokenizer_tasks,
    )


CACHED_BYTES_PER_TOKEN = 24  # input_ids, labels and position_ids, int64 each


def fits_cache(rows: int, data: DataConfig) -> bool:
    """Whether a split of `rows` examples is small enough to tokenize once (data.cache_max_mb)."""
    return rows * data.max_seq_len * CACHED_BYTES_PER_TOKEN <= data.cache_max_mb * 1e6


def build_datasets(
    model: ModelConfig,
    data: DataConfig,
    rows: dict[str, int] | None = None,
    read_again: frozenset[str] = frozenset(),
    pairs: bool = False,
    prompts: bool = False,
) -> dict[str, Any]:
    """The training-ready Ray Datasets: {"train": ..., "eval": ...} (eval only when configured).

    Rows have input_ids and labels (plus position_ids when packed); batch them with
    training.formats.collate. `rows` are the examples per split (from check_rows): a small training split
    is then shuffled in this process (shuffled_rows). A split in `read_again` that fits data.cache_max_mb is
    computed now and kept in the object store: epochs and eval passes then read it instead of running the
    pipeline again.
    """
    rows = rows or {}
    out = {}
    for split in ("train", "eval"):
        ds = tokenized(model, data, split, rows=rows.get(split), pairs=pairs, prompts=prompts)
        if ds is None:
            continue
        if data.packing:
            ds = ds.map_batches(
                _pack_batch,  # pyright: ignore[reportArgumentType]
                fn_kwargs={"max_seq_len": data.max_seq_len, "seed": data.seed},
                batch_size=PACK_WINDOW_ROWS,
                batch_format="numpy",
                num_cpus=data.cpus_per_data_task,
            )
        else:
            extra = ["rejected_ids", "rejected_labels"] if pairs else PROMPT_COLUMNS if prompts else []
            ds = ds.select_columns(["row_id", "input_ids", "labels", *extra])
        if split in read_again and split in rows and fits_cache(rows[split], data):
            ds = ds.materialize()
        out[split] = ds
    return out


# --------------------------------------------------------------------------- inspection


def inspect_data(
    model: ModelConfig,
    data: DataConfig,
    micro_batch_size: int = 4,
    examples: int = 3,
    pairs: bool = False,
    prompts: bool = False,
) -> dict:
    """Everything `rayft data inspect` reports, as a JSON-ready dict. `pairs`: preference pairs (training.objective
    dpo): the counts cover both answers of each pair, and each split also reports its pairs and the chosen and
    rejected answers' lengths; examples show the chosen answer, then the rejected one. `prompts` (training.objective
    grpo): each split also reports the fields its rows give the graders, and examples show each prompt's fields."""
    from rayft.training.formats import IGNORE_INDEX, pack_examples, padded_length
    from rayft.training.models import load_tokenizer

    checks = check_rows(data)
    tokenizer = load_tokenizer(model.name, model.revision)
    report: dict[str, Any] = {"model": model.name, "max_seq_len": data.max_seq_len, "splits": {}}
    for split, check in checks.items():
        ds = tokenized(model, data, split, keep_dropped=True, shuffle=False, pairs=pairs, prompts=prompts)
        assert ds is not None  # check_rows names only the splits there are
        lengths, trained, statuses, shown = [], [], [], []
        kept: list[tuple[np.ndarray, np.ndarray]] = []
        answers: dict[str, list[int]] = {"chosen": [], "rejected": []}
        fields: dict[str, int] = {}  # prompts: the graders' fields, and the rows that have each
        batches = cast(Iterator[dict[str, np.ndarray]], ds.iter_batches(batch_size=1024, batch_format="numpy"))
        for batch in batches:
            lengths.append(batch["num_tokens"])
            trained.append(batch["num_trained"])
            statuses.append(batch["status"])
            for i, status in enumerate(batch["status"]):
                if status == "dropped":
                    continue
                seqs = [(batch["input_ids"][i], batch["labels"][i])]
                if pairs:
                    seqs.append((batch["rejected_ids"][i], batch["rejected_labels"][i]))
                    for kind, (_, labels) in zip(answers, seqs, strict=True):
                        answers[kind].append(int((np.asarray(labels) != IGNORE_INDEX).sum()))
                kept.extend(seqs)
                item = json.loads(str(batch["item"][i])) if prompts else {}
                for k in item:
                    if k not in ("messages", "prompt"):
                        fields[k] = fields.get(k, 0) + 1
                for ids, labels in seqs:
                    if len(shown) < examples:
                        shown.append(_segments(tokenizer, ids, labels, IGNORE_INDEX))
                        if prompts:
                            graded = {k: v for k, v in item.items() if k not in ("messages", "prompt")}
                            shown[-1].append({"text": "", "trained": False, "fields": graded})
        n_tok = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        n_trained = np.concatenate(trained) if trained else np.zeros(0, dtype=np.int64)
        status = np.concatenate(statuses) if statuses else np.zeros(0, dtype=object)
        used = np.array([len(k[0]) for k in kept], dtype=np.int64)
        # Padding cost without packing: each micro-batch pads to its longest row (multiple of 8).
        padded = sum(
            padded_length(int(used[i : i + micro_batch_size].max())) * len(used[i : i + micro_batch_size])
            for i in range(0, len(used), micro_batch_size)
        )
        packed_rows = 0
        for i in range(0, len(kept), PACK_WINDOW_ROWS):
            packed_rows += len(pack_examples(kept[i : i + PACK_WINDOW_ROWS], data.max_seq_len))
        pct = {f"p{q}": int(np.percentile(n_tok, q)) for q in (50, 90, 95, 99)} if len(n_tok) else {}
        report["splits"][split] = {
            "rows": check.rows,
            "bad_rows": check.bad,
            "bad_examples": [{"source": s, "problem": p} for s, p in check.examples],
            "examples": int(len(used)),
            "truncated": int((status == "truncated").sum()),
            "dropped": int((status == "dropped").sum()),
            "tokens": int(used.sum()),
            "prompt_tokens": int((n_tok - n_trained).sum()),
            "response_tokens": int(n_trained.sum()),
            "length": {
                "min": int(n_tok.min()) if len(n_tok) else 0,
                "mean": float(n_tok.mean()) if len(n_tok) else 0.0,
                "max": int(n_tok.max()) if len(n_tok) else 0,
                **pct,
            },
            "padding_efficiency": float(used.sum() / padded) if padded else 0.0,
            "packed_rows": packed_rows,
            "packing_efficiency": float(used.sum() / (packed_rows * data.max_seq_len)) if packed_rows else 0.0,
            "rendered_examples": shown,
        }
        if prompts:
            report["splits"][split]["prompt_fields"] = fields
        if pairs:
            report["splits"][split]["pairs"] = {
                "pairs": len(answers["chosen"]),
                **{
                    f"{kind}_answer_tokens": {
                        "min": min(v, default=0),
                        "mean": float(np.mean(v)) if v else 0.0,
                        "max": max(v, default=0),
                    }
                    for kind, v in answers.items()
                },
            }
    return report


def _segments(tokenizer, ids, labels, ignore: int) -> list[dict]:
    """Split a tokenized example into runs of trained / masked text for display."""
    out: list[dict] = []
    run: list[int] = []
    cur = None
    for tid, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        t = lab != ignore
        if cur is not None and t != cur:
            out.append({"text": tokenizer.decode(run), "trained": cur})
            run = []
        run.append(tid)
        cur = t
    if run:
        out.append({"text": tokenizer.decode(run), "trained": cur})
    return out
