"""The Ray Data pipeline on a local Ray: sources, bad rows, splits, shuffling, length policies, packing."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from helpers import QUICKSTART, chat, write_jsonl
from rayft.training.config import DataConfig, ModelConfig
from rayft.training.data import DataError, build_datasets, check_rows, inspect_data, tokenized

pytestmark = pytest.mark.usefixtures("ray_local")
MODEL = ModelConfig()
ROWS = [chat(f"Question number {i}?", f"Answer number {i}.") for i in range(40)]


def token_rows(data: DataConfig, split: str = "train", rows: int | None = None) -> list[dict]:
    return tokenized(MODEL, data, split, rows=rows).take_all()


def test_bad_rows_stop_the_run_with_file_line_and_problem(tmp_path):
    rows: list = [chat("ok", "fine")] * 3
    rows += ["{not json"]
    rows += [{"messages": [{"role": "user", "content": f"no reply {i}"}]} for i in range(24)]
    rows += [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}]
    path = write_jsonl(tmp_path / "support.jsonl", rows)
    with pytest.raises(DataError) as info:
        check_rows(DataConfig(train=str(path)))
    msg = str(info.value)
    assert "26 bad rows found; nothing was trained" in msg
    assert "data.train: 26 of 29 rows are bad (first 20 shown)" in msg
    assert "support.jsonl:4: invalid JSON" in msg
    assert "support.jsonl:5: the conversation has no assistant message" in msg
    assert msg.count("support.jsonl:") == 20
    assert "on_bad_rows: skip" in msg  # says what to do


def test_skip_drops_bad_rows_and_counts_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:10] + ["[broken", {"text": 7}])
    report = inspect_data(MODEL, DataConfig(train=str(path), on_bad_rows="skip"))
    split = report["splits"]["train"]
    assert (split["rows"], split["bad_rows"], split["examples"]) == (12, 2, 10)
    assert {b["source"].rsplit(":", 1)[1] for b in split["bad_examples"]} == {"11", "12"}


@pytest.mark.slow
def test_every_source_kind_gives_the_same_tokens(tmp_path):
    flat = [{"instruction": f"Say {i}", "input": "", "output": f"{i}!"} for i in range(12)]
    reference = [
        r["input_ids"].tolist()
        for r in token_rows(DataConfig(train=str(write_jsonl(tmp_path / "ref.jsonl", flat)), shuffle=False))
    ]

    (tmp_path / "arr.json").write_text(json.dumps(flat))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(flat)
    import datasets

    hf = datasets.Dataset.from_list(flat)
    hf.to_parquet(str(tmp_path / "d.parquet"))
    hf.save_to_disk(str(tmp_path / "saved"))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", flat[:5])
    write_jsonl(shards / "b.jsonl", flat[5:])

    for spec in [
        tmp_path / "arr.json",
        tmp_path / "d.csv",
        tmp_path / "d.parquet",
        tmp_path / "saved",
        shards,
        shards / "*.jsonl",
        [str(shards / "a.jsonl"), str(shards / "b.jsonl")],
    ]:
        train = [str(s) for s in spec] if isinstance(spec, list) else str(spec)
        got = [r["input_ids"].tolist() for r in token_rows(DataConfig(train=train, shuffle=False))]
        assert got == reference, spec


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="file not found: .*nope.jsonl"):
        check_rows(DataConfig(train=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="matches no files"):
        check_rows(DataConfig(train=str(tmp_path / "*.jsonl")))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        check_rows(DataConfig(train=str(tmp_path / "notes.txt")))


def test_eval_fraction_splits_disjointly_and_deterministically(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    data = DataConfig(train=path, eval_fraction=0.25, shuffle=False)
    train = {r["source"] for r in token_rows(data, "train")}
    evals = {r["source"] for r in token_rows(data, "eval")}
    assert not train & evals and len(train | evals) == 40
    assert 4 <= len(evals) <= 18
    assert evals == {r["source"] for r in token_rows(data, "eval")}


@pytest.mark.parametrize("known_rows", [None, len(ROWS)], ids=["ray-data-shuffle", "local-permutation"])
def test_shuffle_is_seeded(tmp_path, known_rows):
    """A split of unknown size goes through Ray Data's shuffle; one counted by check_rows and small enough
    is permuted in the driver. Both: the same seed gives the same order, every row exactly once."""
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    order = [r["source"] for r in token_rows(DataConfig(train=path, seed=1), rows=known_rows)]
    again = [r["source"] for r in token_rows(DataConfig(train=path, seed=1), rows=known_rows)]
    other = [r["source"] for r in token_rows(DataConfig(train=path, seed=2), rows=known_rows)]
    unshuffled = [r["source"] for r in token_rows(DataConfig(train=path, shuffle=False), rows=known_rows)]
    assert order == again and order != other and order != unshuffled
    assert sorted(order) == sorted(unshuffled) and len(set(order)) == len(ROWS)


def test_overlong_rows_are_truncated_dropped_or_refused(tmp_path):
    long_reply = " ".join(["word"] * 300)
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS[:5] + [chat("Tell me a lot", long_reply)]))
    base = {"train": path, "max_seq_len": 128, "shuffle": False}

    rep = inspect_data(MODEL, DataConfig(**base, overlong="truncate"))["splits"]["train"]
    assert (rep["examples"], rep["truncated"], rep["dropped"]) == (6, 1, 0)
    assert rep["tokens"] <= 5 * 128 + 128
    assert max(len(r["input_ids"]) for r in token_rows(DataConfig(**base))) == 128

    rep = inspect_data(MODEL, DataConfig(**base, overlong="drop"))["splits"]["train"]
    assert (rep["examples"], rep["truncated"], rep["dropped"]) == (5, 0, 1)

    with pytest.raises(Exception, match=r"d.jsonl:6: \d+ tokens, longer than data.max_seq_len \(128\)"):
        inspect_data(MODEL, DataConfig(**base, overlong="error"))


def test_packed_training_rows_fit_and_keep_every_example(tmp_path):
    from rayft.training.formats import collate

    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    plain = build_datasets(MODEL, DataConfig(train=path, shuffle=False))["train"].take_all()
    packed = build_datasets(MODEL, DataConfig(train=path, packing=True, max_seq_len=256, shuffle=False))
    rows = packed["train"].take_all()
    assert "eval" not in packed
    assert sum(r["num_examples"] for r in rows) == len(plain) == 40
    assert all(len(r["input_ids"]) <= 256 for r in rows)
    assert len(rows) < 40 / 3  # several examples per row
    # Every trained token survives packing.
    assert sum(int((r["labels"] != -100).sum()) for r in rows) == sum(int((r["labels"] != -100).sum()) for r in plain)
    batch = collate(rows[:2], pad_id=2)
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape[1] % 8 == 0


def test_quickstart_inspection():
    data = DataConfig(
        train=str(QUICKSTART / "train.jsonl"), eval=str(QUICKSTART / "eval.jsonl"), max_seq_len=512, packing=True
    )
    report = inspect_data(MODEL, data, micro_batch_size=4, examples=1)
    train, ev = report["splits"]["train"], report["splits"]["eval"]
    assert (train["rows"], train["bad_rows"], train["dropped"], train["truncated"]) == (1200, 0, 0, 0)
    assert ev["rows"] == 170
    assert 0 < train["response_tokens"] < train["tokens"]
    assert train["length"]["max"] <= 512 and train["packing_efficiency"] > 0.85
    (segments,) = train["rendered_examples"]
    trained = [s["text"] for s in segments if s["trained"]]
    assert len(trained) == 1 and trained[0].startswith('{"product":') and trained[0].endswith("}<|im_end|>")
    assert json.loads(trained[0].removesuffix("<|im_end|>"))["severity"] in {"low", "medium", "high", "urgent"}
    lengths = np.array([train["length"][k] for k in ("p50", "p90", "p99")])
    assert (np.diff(lengths) >= 0).all()


def test_large_jsonl_files_are_read_in_line_aligned_chunks(tmp_path, monkeypatch):
    from rayft.training import data as data_mod

    rows = [chat(f"q{i}", f"a{i}") for i in range(50)] + ["{oops"] + [chat("x", "y")]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    monkeypatch.setattr(data_mod, "READ_CHUNK_BYTES", 700)
    tasks = data_mod.plan_reads([str(path)])
    assert len(tasks) > 5
    assert tasks[0]["start"] == 0 and tasks[-1]["end"] == path.stat().st_size
    assert all(a["end"] == b["start"] for a, b in zip(tasks, tasks[1:], strict=False))
    lines = path.read_bytes().split(b"\n")
    for t in tasks:  # each chunk starts on a line boundary and knows its line number
        assert path.read_bytes()[t["start"] :].startswith(lines[t["line"] - 1])
    with pytest.raises(DataError) as info:
        check_rows(DataConfig(train=str(path)))
    assert f"{path}:51: invalid JSON" in str(info.value) and "1 bad row found" in str(info.value)
    got = sorted(r["source"] for r in token_rows(DataConfig(train=str(path), on_bad_rows="skip", shuffle=False)))
    assert got == sorted(f"{path}:{i}" for i in [*range(1, 51), 52])


def test_repeat_upsamples_a_training_file_with_distinct_row_ids(tmp_path):
    write_jsonl(tmp_path / "tasks.jsonl", ROWS[:10])
    write_jsonl(tmp_path / "facts.jsonl", ROWS[10:14])
    files = [str(tmp_path / "tasks.jsonl"), str(tmp_path / "facts.jsonl")]
    data = DataConfig(train=files, eval=str(tmp_path / "facts.jsonl"), repeat={"facts.jsonl": 3}, shuffle=False)
    rows = token_rows(data)
    assert len(rows) == 10 + 3 * 4
    assert len({int(r["row_id"]) for r in rows}) == len(rows)  # each copy is its own row: trained once per epoch
    assert len(token_rows(data, "eval")) == 4  # evaluation rows are never repeated
    with pytest.raises(DataError, match=r"data.repeat: 'notes.jsonl' names none of the training files"):
        token_rows(DataConfig(train=files, repeat={"notes.jsonl": 2}))


def test_every_global_batch_of_packed_rows_holds_each_source_near_its_share(tmp_path):
    from rayft.training.data import row_id

    # Two sources of very different lengths, as in the quickstart: long tickets and short facts.
    long_rows = [chat(f"Ticket {i}: my order arrived broken.", " ".join(["detail"] * 90) + f" {i}") for i in range(300)]
    short_rows = [chat(f"Fact {i}?", f"Answer {i}.") for i in range(900)]
    paths = [
        str(write_jsonl(tmp_path / "long.jsonl", long_rows)),
        str(write_jsonl(tmp_path / "short.jsonl", short_rows)),
    ]
    long_ids = {row_id(f"{paths[0]}:{n}") for n in range(1, 301)}

    def packed_rows(seed: int) -> list[dict]:
        data = DataConfig(train=paths, packing=True, max_seq_len=512, seed=seed)
        return build_datasets(MODEL, data, rows={"train": 1200})["train"].take_all()

    rows = packed_rows(seed=42)
    members = [[int(i) for i in r["row_ids"]] for r in rows]
    trained = [i for m in members for i in m]
    assert len(trained) == len(set(trained)) == 1200  # every example once
    assert {i for i in trained if i in long_ids} == long_ids

    share = len(long_ids) / 1200
    batch_rows = 8  # e.g. micro-batch 2 x 2 workers x accumulation 2
    worst = 0.0
    for start in range(0, len(members) - batch_rows + 1, batch_rows):
        batch = [i for m in members[start : start + batch_rows] for i in m]
        worst = max(worst, abs(sum(i in long_ids for i in batch) / len(batch) - share))
    # First-fit-decreasing's own order runs from long-example rows to short-only rows: its batches are one kind.
    assert worst <= 0.1, f"a global batch of {batch_rows} rows is {worst:.0%} off the long source's {share:.0%} share"

    # Seeded: the same seed gives the same rows in the same order (resume relies on it); another seed another order.
    assert [[int(i) for i in r["row_ids"]] for r in packed_rows(seed=42)] == members
    assert [[int(i) for i in r["row_ids"]] for r in packed_rows(seed=7)] != members
