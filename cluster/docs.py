"""docs/config.md, generated from the job file's schema: every key of every section, its default and its
description, as `rayft config show --describe` prints them (`config_reference`).

    make docs                                # writes docs/config.md
    python -m rayft.cluster.docs --check     # exit 1 when docs/config.md is not what the schema gives

Edit a field's description in its package's config module (training/config.py, tuning/config.py,
serving/config.py, cluster/config.py), then run `make docs`; a test fails while docs/config.md is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rayft.cluster.config import JobConfig, config_reference

CONFIG_MD = Path(__file__).resolve().parents[1] / "docs" / "config.md"

HEAD = """\
# Config reference

Every key of the job file, its default and what it does; back to the [README](../README.md).

<!-- Generated from the config schema by `make docs` (python -m rayft.cluster.docs): edit the field
descriptions in the code, not this page. -->

One YAML job file drives every stage (`rayft data inspect`, `train`, `eval`, `sweep`, `serve`,
`submit`). A small one:

```yaml
# rayft data inspect my-job.yaml
model:
  name: smollm2-135m-instruct        # built-in alias, a local HF model dir, or a hub id
data:
  train: data/train.jsonl            # relative to this file
  eval: data/eval.jsonl              # or eval_fraction: 0.1
  max_seq_len: 512
  packing: true
training:
  method: lora
  lr: 3.0e-4
scaling:
  num_workers: 2
run:
  name: my-first-finetune
```

Precedence is defaults < YAML < `--set a.b=value` (values are parsed as YAML: `--set data.packing=true`).
Unknown keys are errors, and every problem is reported at once with its path, the bad value and
the line it came from:

```
config error job.yaml: 2 problems in the job config
  - training.lr: must be greater than 0 (got -1) [job.yaml:8]
  - data.colour: unknown key (allowed: cpus_per_data_task, eval, ...) [job.yaml:6]
```

Data paths are relative to the job file, so a job file travels with its data; `run.storage_path`
is relative to the directory you run from. Every YAML in `configs/` starts with the command that
runs it. `training.global_batch_size` must equal `micro_batch_size x accumulation x num_workers`; the
accumulation is derived, never set. `rayft config show JOB.yaml` prints the resolved job (credentials
as `***`), and `rayft config show JOB.yaml --describe` prints the tables below.

Sections: {toc}.
"""


def _cell(text: str) -> str:
    """Table-cell text that renders as written: no column breaks, tags or emphasis from its characters."""
    for ch in ("\\", "|", "<", "*"):
        text = text.replace(ch, "\\" + ch)
    return text


def config_markdown() -> str:
    """The whole of docs/config.md."""
    rows = config_reference()
    sections = list(JobConfig.model_fields)
    toc = ", ".join(f"[`{name}`](#{name})" for name in sections)
    parts = [HEAD.replace("{toc}", toc)]
    for name in sections:
        about = JobConfig.model_fields[name].description or ""
        table = ["| key | default | meaning |", "| --- | --- | --- |"]
        table += [
            f"| `{key}` | `{default}` | {_cell(desc)} |" for key, default, desc in rows if key.split(".", 1)[0] == name
        ]
        parts.append(f"## {name}\n\n{_cell(about)}\n\n" + "\n".join(table) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write docs/config.md from the config schema.")
    p.add_argument("--out", type=Path, default=CONFIG_MD, help="file to write (default: docs/config.md)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is stale")
    args = p.parse_args(argv)
    text = config_markdown()
    if args.check:
        if not args.out.exists() or args.out.read_text(encoding="utf-8") != text:
            print(f"{args.out} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
