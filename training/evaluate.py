"""`rayft eval`: base versus finetuned on the same evaluation rows, by batch inference on Ray Data.

Each evaluation row becomes a prompt (the conversation up to its last reply, rendered as in
training) and a reference (that reply). Both models answer greedily; their answers are scored
per split (one split per evaluation file) and the two sets of scores, with examples where the
models differ, go into `<run>/eval/report.{json,md}` and a bar chart. Each model's predictions
are kept in `<run>/eval/predictions-{base,finetuned}.jsonl` with a fingerprint of what produced
them, so the base model is evaluated once and reused until the data, the base model or the
generation settings change.

A job with training.objective grpo has prompts, not references: each model answers every held-out
prompt greedily and `eval.samples` more times at the training temperature, and the job's reward
(training.rl: its grader or reward functions, scored in a Ray task as in training) grades every
answer. The report then gives each model's reward of the greedy answer (per grader of a multi
grader too) and the mean reward of the sampled ones, with the prompts where the two models' greedy
answers earned most differently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rayft.training import storage
from rayft.training.data import DataError
from rayft.training.formats import words
from rayft.training.inference import InferenceConfig, InferenceModel, run_inference
from rayft.training.run_dir import EVAL_DIR, EVAL_REPORT, RunDir

__all__ = ["EVAL_DIR"]  # the run dir's eval/ (rayft.training.run_dir), named here for the callers that use it
LABELS = ("base", "finetuned")
METRICS = (
    "tool_call",
    "tool_name",
    "exact_match",
    "contained",
    "token_f1",
    "json_valid",
    "rule_pass",
    "reward_accuracy",
    "win_rate",
    "perplexity",
)
REWARD_METRICS = ("reward_greedy", "reward_sampled")  # rewarded evaluation (training.objective grpo)
METRIC_TITLES = {
    "reward_greedy": "reward, greedy answer",
    "reward_sampled": "reward, mean of the sampled answers",
    "tool_call": "tool call right (name, arguments)",
    "tool_name": "right tool named",
    "exact_match": "exact match",
    "contained": "answer contained",
    "token_f1": "token F1",
    "json_valid": "valid JSON",
    "rule_pass": "answers passing the row's rule",
    "reward_accuracy": "pairs ranked right (reward accuracy)",
    "win_rate": "win rate over base, by the rule",
    "perplexity": "reference perplexity",
}
MAX_EXAMPLES = 5
GRADING = ("calls", "tools", "syntax")  # a row whose reference is a tool call: its calls, tools and call syntax


def metric_keys(per_label: dict[str, dict]) -> list[str]:
    """A split's metrics to show, in order: those any model has a value for (a rewarded evaluation's per-grader
    rewards, reward_greedy/<name>, after its totals)."""
    have = {k for scores in per_label.values() for k, v in scores.items() if v is not None}
    parts = sorted(k for k in have if k.startswith("reward_greedy/"))
    keys = [m for m in REWARD_METRICS if m in have] + parts
    return keys + [m for m in METRICS if m in have]


def metric_title(metric: str) -> str:
    if metric.startswith("reward_greedy/"):
        return f"reward, greedy answer: {metric.partition('/')[2]}"
    return METRIC_TITLES[metric]


# --------------------------------------------------------------------------- metrics

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def normalize_text(text: str) -> str:
    """Lower case, whitespace collapsed."""
    return " ".join(str(text).lower().split())


def parse_json(text: str) -> Any:
    """The JSON value `text` holds (an object or array, optionally in a ``` fence), else None."""
    s = str(text).strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1)
    if not s.startswith(("{", "[")):
        return None
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return None


def exact_match(prediction: str, reference: str) -> bool:
    """JSON references: equal after parsing both (key order and spacing do not matter).
    Other references: equal after normalizing case and whitespace."""
    ref = parse_json(reference)
    if ref is not None:
        return parse_json(prediction) == ref
    return normalize_text(prediction) == normalize_text(reference)


def contained(prediction: str, answer: str) -> bool:
    """The answer's words appear, in order and contiguously, among the prediction's words."""
    a, p = words(answer), words(prediction)
    if not a:
        return False
    return any(p[i : i + len(a)] == a for i in range(len(p) - len(a) + 1))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bag of words of prediction and reference (SQuAD-style)."""
    p, r = Counter(words(prediction)), Counter(words(reference))
    common = sum((p & r).values())
    if not p or not r:
        return float(p == r)
    if common == 0:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def called(prediction: str, row: dict) -> list[list] | None:
    """The calls a prediction makes ([[name, arguments], ...]), read as the endpoint reads them; None: no call."""
    from rayft.training.tools import ToolSyntax

    parsed = ToolSyntax(row["syntax"]).parse(prediction, json.loads(row["tools"]))
    return None if parsed is None else [[c["function"]["name"], c["function"]["arguments"]] for c in parsed[1]]


def score(rows: list[dict]) -> dict[str, float | int | None]:
    """Metrics over rows that carry prediction, reference, answer, ref_nll and ref_tokens.

    json_valid is only defined when every reference is JSON; perplexity is over reference tokens."""
    n = len(rows)
    if n == 0:
        return {"rows": 0}
    json_refs = all(parse_json(r["reference"]) is not None for r in rows)
    tokens = sum(int(r.get("ref_tokens", 0)) for r in rows)
    nll = sum(float(r.get("ref_nll", 0.0)) for r in rows)
    ruled = [r for r in rows if r.get("rule")]
    calls = [(called(r["prediction"], r), json.loads(r["calls"])) for r in rows if r.get("calls")]
    return {
        "rows": n,
        "tool_call": sum(got == want for got, want in calls) / len(calls) if calls else None,
        "tool_name": (
            sum(got is not None and [c[0] for c in got] == [c[0] for c in want] for got, want in calls) / len(calls)
            if calls
            else None
        ),
        "exact_match": sum(exact_match(r["prediction"], r["reference"]) for r in rows) / n,
        "contained": sum(contained(r["prediction"], r["answer"]) for r in rows) / n,
        "token_f1": sum(token_f1(r["prediction"], r["reference"]) for r in rows) / n,
        "json_valid": sum(parse_json(r["prediction"]) is not None for r in rows) / n if json_refs else None,
        "rule_pass": sum(passes(r["prediction"], r["rule"]) for r in ruled) / len(ruled) if ruled else None,
        "perplexity": math.exp(min(nll / tokens, 50.0)) if tokens else None,
    }


def passes(prediction: str, rule: dict | str) -> bool:
    """Whether an answer keeps an evaluation row's rule: {"contains": [text, ...], "max_words": N}, both
    optional; text is matched case-insensitively, words are whitespace-separated."""
    checks: dict = json.loads(rule) if isinstance(rule, str) else rule
    text = prediction.lower()
    if any(str(c).lower() not in text for c in checks.get("contains") or []):
        return False
    return checks.get("max_words") is None or len(prediction.split()) <= int(checks["max_words"])


def compare_pairs(base: list[dict], finetuned: list[dict]) -> dict:
    """What preference rows say about finetuned against base, on the same rows: reward accuracy (the share of
    pairs where finetuned raised the chosen answer's log-probability over base's by more than the rejected
    one's: DPO's implicit reward, finetuned against base as the reference) and the rule's win rate
    (finetuned's answer keeps the row's rule and base's does not; a tie counts half)."""
    by_source = {r["source"]: r for r in base}
    pairs = [(by_source[r["source"]], r) for r in finetuned if r["source"] in by_source and "rej_nll" in r]
    out: dict[str, float | None] = {"reward_accuracy": None, "win_rate": None}
    if pairs:
        right = sum((b["ref_nll"] - f["ref_nll"]) > (b["rej_nll"] - f["rej_nll"]) for b, f in pairs)
        out["reward_accuracy"] = right / len(pairs)
    ruled = [(b, f) for b, f in pairs if f.get("rule")]
    if ruled:
        wins = sum(passes(f["prediction"], f["rule"]) - passes(b["prediction"], b["rule"]) + 1 for b, f in ruled)
        out["win_rate"] = wins / (2 * len(ruled))
    return out


# --------------------------------------------------------------------------- evaluation rows


def eval_rows(job, max_rows: int | None = None) -> list[dict]:
    """The evaluation split as inference rows: split (file name), source (file:line), prompt, reference,
    answer (the row's `answer` field, else the reference), and the reference rendering for perplexity.
    A preference pair's reference is its chosen answer; its rejected answer is rendered too (scored for
    reward accuracy), and its `rule` kept (see passes). A prompt row (training.objective grpo) has its
    prompt and its graders' item (the row as JSON) instead of a reference.

    Reads with Ray Data like training does; rows that cannot be evaluated are listed in one DataError."""
    import numpy as np

    from rayft.training.data import validated_rows
    from rayft.training.formats import Renderer, RowError
    from rayft.training.models import load_tokenizer
    from rayft.training.tools import tool_syntax

    data = job.data
    ds = validated_rows(data, "eval", keep_raw=True)
    if ds is None:
        raise DataError(
            "nothing to evaluate: set data.eval to an evaluation file, or data.eval_fraction to hold out part of "
            "data.train"
        )
    checked = ds.take_all()
    renderer = Renderer(
        load_tokenizer(job.model.name, job.model.revision),
        data.template,
        train_on_inputs=False,
        specials=data.special_tokens_in_content,
    )
    syntax = tool_syntax(renderer.tok, data.template if data.template != "alpaca" else None).name
    rows, bad = [], []
    for r in checked:
        source = str(r["source"])
        try:
            if r["error"]:
                raise RowError(str(r["error"]))
            doc = json.loads(str(r["doc"]))
            if doc["kind"] == "prompt":  # training.objective grpo: graded, not compared with a reference
                item = json.dumps(doc["item"], ensure_ascii=False)
                prompt = renderer.rollout_prompt(doc)
                rows.append({"split": _split_name(source), "source": source, "prompt": prompt, "item": item})
                continue
            pair = doc if doc["kind"] == "pair" else None
            doc = pair["chosen"] if pair else doc
            prompt, reference = renderer.prompt(doc)
            full, spans = renderer.reference(doc)
        except RowError as e:
            bad.append(f"  {source}: {e}")
            continue
        value = json.loads(str(r["raw"]))
        answer = value.get("answer") if isinstance(value.get("answer"), str) and value["answer"].strip() else None
        row = {
            "split": _split_name(source),
            "source": source,
            "prompt": prompt,
            "reference": reference,
            "answer": answer or reference,
            "full": full,
            "spans": json.dumps(spans),
        }
        if pair:
            rejected_full, rejected_spans = renderer.reference(pair["rejected"])
            row |= {"rejected_full": rejected_full, "rejected_spans": json.dumps(rejected_spans)}
            if isinstance(value.get("rule"), dict):
                row["rule"] = json.dumps(value["rule"])
        last = [m for m in doc["messages"] if m["role"] == "assistant"][-1] if doc["kind"] == "chat" else {}
        if last.get("tool_calls"):  # graded as calls: read back in the syntax the model was taught
            row |= {
                "calls": json.dumps([[c["function"]["name"], c["function"]["arguments"]] for c in last["tool_calls"]]),
                "tools": json.dumps([t["function"]["name"] for t in doc.get("tools", [])]),
                "syntax": syntax,
            }
        rows.append(row)
    if bad:
        shown = "\n".join(bad[:20])
        raise DataError(
            f"{len(bad)} of {len(checked)} evaluation rows cannot be evaluated:\n{shown}\n"
            "Evaluation needs a prompt and a reference answer per row: use messages, alpaca or prompt_completion rows."
        )
    if not rows:
        raise DataError("the evaluation data has no rows")
    rows.sort(key=lambda r: _source_key(r["source"]))
    if max_rows is not None and max_rows < len(rows):
        # An even sample across splits, the same rows every time.
        rng = np.random.default_rng(0)
        keep = sorted(rng.choice(len(rows), size=max_rows, replace=False).tolist())
        rows = [rows[i] for i in keep]
    return rows


def _split_name(source: str) -> str:
    path = source.rsplit(":", 1)[0] if re.search(r":\d+$", source) else source
    return Path(path).stem or path


def _source_key(source: str) -> tuple[str, int]:
    m = re.match(r"^(.*):(\d+)$", source)
    return (m.group(1), int(m.group(2))) if m else (source, 0)


# --------------------------------------------------------------------------- running


def fingerprint(model: InferenceModel, rows: list[dict], icfg: InferenceConfig) -> str:
    """What a set of predictions depends on: the model (and its files' timestamps), rows and settings."""
    h = hashlib.blake2b(digest_size=12)
    for part in (model.path, model.adapter or ""):
        h.update(part.encode())
        if storage.is_remote(part):
            h.update(storage.tree_fingerprint(part).encode())  # names, sizes and times of every file
            continue
        for f in ("config.json", "model.safetensors", "adapter_model.safetensors"):
            p = Path(part) / f if part else None
            if p is not None and p.is_file():
                h.update(f"{f}:{p.stat().st_mtime_ns}:{p.stat().st_size}".encode())
    h.update(f"{icfg.max_new_tokens}:{icfg.dtype}".encode())
    if icfg.samples is not None:
        h.update(f"{icfg.samples}:{icfg.temperature}:{icfg.top_p}:{icfg.seed}".encode())
    for r in rows:
        h.update(r["prompt"].encode())
        h.update(r.get("reference", r.get("item", "")).encode())
    return h.hexdigest()


def predictions_path(eval_dir: str, label: str) -> str:
    return storage.join(eval_dir, f"predictions-{label}.jsonl")


def load_predictions(eval_dir: str, label: str, expected: str) -> list[dict] | None:
    """Saved predictions of `label` (local or in cloud storage), if they were made with the same fingerprint."""
    try:
        lines = storage.read_text(predictions_path(eval_dir, label)).splitlines()
    except FileNotFoundError:
        return None
    header = json.loads(lines[0] if lines else "{}")
    if header.get("fingerprint") != expected:
        return None
    return [json.loads(line) for line in lines[1:] if line.strip()]


def predict(
    model: InferenceModel,
    rows: list[dict],
    icfg: InferenceConfig,
    eval_dir: str,
    label: str,
    on_rows: Callable[[int], None] | None = None,
    reuse: bool = True,
) -> tuple[list[dict], bool]:
    """Predictions of one model on the rows, saved under eval_dir; returns (rows, reused)."""
    fp = fingerprint(model, rows, icfg)
    if reuse:
        saved = load_predictions(eval_dir, label, fp)
        if saved is not None and len(saved) == len(rows):
            by_source = {r["source"]: r for r in rows}  # how rows are graded comes from the rows, not the cache
            return [{k: by_source[s["source"]][k] for k in GRADING if k in by_source.get(s["source"], {})} | s
                    for s in saved], True  # fmt: skip
    t0 = time.perf_counter()
    done = run_inference(rows, model, icfg, on_rows)
    keep = ("split", "source", "prompt", "reference", "answer", "prediction", "ref_nll", "ref_tokens")
    pairs = ("rej_nll", "rej_tokens", "rule")  # preference rows only
    prompts = ("item", "prediction_ids", "samples", "sample_ids")  # prompt rows only (rewarded evaluation)
    out = [{k: _plain(r[k]) for k in keep + pairs + prompts + GRADING if k in r and r[k] is not None} for r in done]
    header = {"fingerprint": fp, "model": model.describe(), "seconds": round(time.perf_counter() - t0, 1)}
    storage.write_text(predictions_path(eval_dir, label), "".join(json.dumps(r) + "\n" for r in [header, *out]))
    return out, False


# --------------------------------------------------------------------------- rewards (training.objective grpo)


def grade(job, rows: list[dict]) -> None:
    """Grade a model's predictions on prompt rows with the job's reward, in one Ray task as training grades a
    step (rayft.training.rewards): sets each row's `reward` (its greedy answer's), `reward_parts` (per grader of a
    multi grader, or per reward function when there are several) and `sample_rewards`."""
    from rayft.training.rewards import Rewarder, reward_sources

    rl = job.training.rl
    texts: list[str] = []
    ids: list[list[int]] = []
    items: list[dict] = []
    for r in rows:
        item = json.loads(r["item"])
        samples = json.loads(r.get("samples") or "[]")
        texts += [r["prediction"], *samples]
        ids += [json.loads(r["prediction_ids"]), *json.loads(r.get("sample_ids") or "[]")]
        items += [item] * (1 + len(samples))
    scores = Rewarder(rl, reward_sources(rl)).score(texts, ids, items)
    at = 0
    for r in rows:
        n = len(json.loads(r.get("samples") or "[]"))
        r["reward"] = float(scores.rewards[at])
        r["reward_parts"] = {k: float(v[at]) for k, v in scores.parts.items()}
        r["sample_rewards"] = [float(x) for x in scores.rewards[at + 1 : at + 1 + n]]
        at += 1 + n


def score_rewards(rows: list[dict]) -> dict[str, float | int | None]:
    """A rewarded evaluation's metrics over graded rows (see grade)."""
    n = len(rows)
    sampled = [x for r in rows for x in r.get("sample_rewards", [])]
    out: dict[str, float | int | None] = {
        "rows": n,
        "reward_greedy": sum(r["reward"] for r in rows) / n if n else None,
        "reward_sampled": sum(sampled) / len(sampled) if sampled else None,
    }
    for part in sorted({k for r in rows for k in r.get("reward_parts", {})}):
        values = [r["reward_parts"][part] for r in rows if part in r.get("reward_parts", {})]
        out[f"reward_greedy/{part}"] = sum(values) / len(values)
    return out


# --------------------------------------------------------------------------- report


def _plain(v):
    """A value of an inference row as JSON can hold it (numpy scalars from Ray Data)."""
    return v.item() if hasattr(v, "item") else v


def by_split(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["split"], []).append(r)
    return out


def build_report(
    eval_dir: str, predictions: dict[str, list[dict]], models: dict[str, str], sampling: dict | None = None
) -> dict:
    """Write report.json, report.md and metrics.png from each model's predictions; returns the report. `sampling`:
    a rewarded evaluation's sampling settings (samples per prompt, temperature, top_p)."""
    labels = [lb for lb in LABELS if lb in predictions]
    splits: dict[str, dict] = {}
    rewarded = all("reward" in r for rows in predictions.values() for r in rows)
    for label in labels:
        for split, rows in by_split(predictions[label]).items():
            splits.setdefault(split, {})[label] = score_rewards(rows) if rewarded else score(rows)
    if len(labels) == 2 and not rewarded:  # preference rows: finetuned measured against base
        base = by_split(predictions["base"])
        for split, rows in by_split(predictions["finetuned"]).items():
            compared = compare_pairs(base.get(split, []), rows)
            if any(v is not None for v in compared.values()):
                splits[split]["finetuned"] |= compared
    examples = (rewarded_examples if rewarded else differing_examples)(predictions) if len(labels) == 2 else []
    report = {
        "models": {lb: models[lb] for lb in labels},
        "splits": splits,
        "examples": examples,
        "rows": len(next(iter(predictions.values()))),
    }
    if sampling is not None:
        report["sampling"] = sampling
    storage.write_text(storage.join(eval_dir, EVAL_REPORT), json.dumps(report, indent=2))
    storage.write_text(storage.join(eval_dir, "report.md"), render_markdown(report))
    plot = plot_metrics(report, storage.join(eval_dir, "metrics.png"))
    report["files"] = {
        "json": storage.join(eval_dir, EVAL_REPORT),
        "markdown": storage.join(eval_dir, "report.md"),
        "plot": plot,
    }
    return report


def differing_examples(predictions: dict[str, list[dict]], limit: int = MAX_EXAMPLES) -> list[dict]:
    """Rows where base and finetuned answer differently: first where exactly one is right (finetuned
    right first), then any other difference; spread over the splits."""
    base = {r["source"]: r for r in predictions["base"]}
    ranked = []
    for r in predictions["finetuned"]:
        b = base.get(r["source"])
        if b is None or normalize_text(b["prediction"]) == normalize_text(r["prediction"]):
            continue
        ft_ok, base_ok = exact_match(r["prediction"], r["reference"]), exact_match(b["prediction"], b["reference"])
        rank = 0 if ft_ok and not base_ok else 1 if base_ok and not ft_ok else 2
        ranked.append((rank, r, b))
    ranked.sort(key=lambda x: x[0])
    per_split: dict[str, list] = {}
    for item in ranked:
        per_split.setdefault(item[1]["split"], []).append(item)
    picked: list = []
    while len(picked) < limit and any(per_split.values()):
        for queue in per_split.values():  # round robin, so every split shows up
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    chosen = [
        {
            "split": r["split"],
            "source": r["source"],
            "prompt": r["prompt"],
            "reference": r["reference"],
            "base": b["prediction"],
            "finetuned": r["prediction"],
        }
        for _, r, b in sorted(picked, key=lambda x: x[0])
    ]
    return chosen


def rewarded_examples(predictions: dict[str, list[dict]], limit: int = MAX_EXAMPLES) -> list[dict]:
    """Prompts whose greedy answers earned the most different rewards, finetuned's gains first, then its losses."""
    base = {r["source"]: r for r in predictions["base"]}
    pairs = [(r, base[r["source"]]) for r in predictions["finetuned"] if r["source"] in base]
    differ = [(r, b) for r, b in pairs if r["reward"] != b["reward"]]
    differ.sort(key=lambda rb: (rb[0]["reward"] < rb[1]["reward"], -abs(rb[0]["reward"] - rb[1]["reward"])))
    return [
        {
            "split": r["split"],
            "source": r["source"],
            "prompt": r["prompt"],
            "item": r["item"],
            "base": b["prediction"],
            "finetuned": r["prediction"],
            "base_reward": b["reward"],
            "finetuned_reward": r["reward"],
        }
        for r, b in differ[:limit]
    ]


def format_metric(metric: str, value) -> str:
    if value is None:
        return "–"
    if metric == "perplexity":
        return f"{value:.2f}"
    if metric.startswith("reward_"):
        return f"{value:.3f}"
    return f"{100 * value:.1f}%"


def format_change(metric: str, before: float, after: float) -> str:
    """finetuned minus base, in the metric's unit (points for rates)."""
    d = after - before
    if metric == "perplexity" or metric.startswith("reward_"):
        return f"{d:+.3f}" if metric.startswith("reward_") else f"{d:+.2f}"
    return f"{100 * d:+.1f} pts"


def render_markdown(report: dict) -> str:
    labels = list(report["models"])
    lines = ["# Evaluation report", ""]
    for lb in labels:
        lines.append(f"- {lb}: `{report['models'][lb]}`")
    lines.append(f"- rows: {report['rows']}")
    if report.get("sampling"):
        sm = report["sampling"]
        lines.append(
            f"- rewards: each prompt's greedy answer and {sm['samples']} sampled answers (temperature "
            f"{sm['temperature']}, top_p {sm['top_p']}), graded by the job's training.rl reward"
        )
    lines.append("")
    for split, per_label in report["splits"].items():
        n = next(iter(per_label.values()))["rows"]
        lines += [
            f"## {split} ({n} rows)",
            "",
            "| metric | " + " | ".join(labels) + " |",
            "| --- |" + " ---: |" * len(labels),
        ]
        for m in metric_keys(per_label):
            values = [per_label.get(lb, {}).get(m) for lb in labels]
            lines.append(f"| {metric_title(m)} | " + " | ".join(format_metric(m, v) for v in values) + " |")
        lines.append("")
    if report["examples"]:
        lines += ["## Examples where the two models differ", ""]
        for i, ex in enumerate(report["examples"], 1):
            lines += [f"### {i}. {ex['split']} — `{ex['source']}`", ""]
            if "item" in ex:  # a rewarded evaluation: the graders' item and each answer's reward
                lines += ["Prompt:", "", _block(ex["prompt"]), "Item (what the graders see):", "", _block(ex["item"])]
                for lb in ("base", "finetuned"):
                    lines += [f"{lb.capitalize()} (reward {ex[lb + '_reward']:.3f}):", "", _block(ex[lb])]
                continue
            for key in ("prompt", "reference", "base", "finetuned"):
                lines += [f"{key.capitalize()}:", "", _block(ex[key])]
    return "\n".join(lines).rstrip() + "\n"


def _block(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}\n{text}\n{fence}\n"


def plot_metrics(report: dict, path: str) -> str | None:
    """Grouped bars: each split's rate metrics (percent), one bar per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    labels = list(report["models"])
    groups, values = [], {lb: [] for lb in labels}
    rewarded = False
    for split, per_label in report["splits"].items():
        for m in metric_keys(per_label):
            if m == "perplexity":
                continue
            rewarded = rewarded or m.startswith("reward_")
            groups.append(f"{split}\n" + textwrap.fill(metric_title(m), 18))
            for lb in labels:
                v = per_label.get(lb, {}).get(m)
                scale = 1 if m.startswith("reward_") else 100
                values[lb].append(scale * v if v is not None else 0.0)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 4))
    width = 0.8 / max(len(labels), 1)
    for i, lb in enumerate(labels):
        xs = [g + (i - (len(labels) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values[lb], width, label=lb)
        ax.bar_label(bars, fmt="%.2f" if rewarded else "%.0f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    if rewarded:  # rewards are on the grader's scale, which may go below 0 or above 1
        ax.set_ylabel("mean reward")
        ax.axhline(0, color="grey", linewidth=0.5)
    else:
        ax.set_ylabel("%")
        ax.set_ylim(0, 105)
    ax.set_title("base vs finetuned, per evaluation split")
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, image.getvalue())
    return path


# --------------------------------------------------------------------------- the command


def inference_config(job) -> InferenceConfig:
    """How to generate: the job's `eval` section; with training.objective grpo also the sampling of training.rl
    (its max_new_tokens unless eval.max_new_tokens is set, eval.samples answers at its temperature and top_p)."""
    e = job.eval
    icfg = InferenceConfig(
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        replicas=e.replicas,
        cpus_per_replica=e.cpus_per_replica,
        use_gpu=job.scaling.use_gpu,
        dtype=e.dtype,
    )
    rl = job.training.rl if job.training.objective == "grpo" else None
    if rl is None:
        return icfg
    return dataclasses.replace(
        icfg,
        max_new_tokens=e.max_new_tokens if "max_new_tokens" in e.model_fields_set else rl.max_new_tokens,
        samples=e.samples if e.samples is not None else rl.samples_per_prompt,
        temperature=rl.temperature,
        top_p=rl.top_p,
        seed=job.training.seed,
    )


def resolve_models(job, model: str | None = None, base_only: bool = False) -> dict[str, InferenceModel]:
    """The models to compare: the job's base model, and (unless base_only) the finetuned one: `model`
    if given, else the run's final/ export. Fails early, before any inference, if one is missing."""
    from rayft.training.inference import resolve_inference_model
    from rayft.training.models import ModelError

    models = {"base": resolve_inference_model(job.model.name, revision=job.model.revision)}
    if base_only:
        return models
    target = model or job.run_dir
    if model is None and not RunDir(job.run_dir).has_final():
        raise ModelError(
            f"no finetuned model to evaluate: {job.run_dir} has no final/ export. Train first "
            "(rayft train CONFIG), pass --model PATH_OR_RUN_DIR, or evaluate the base model alone with --base"
        )
    models["finetuned"] = resolve_inference_model(target, base_model=job.model.name, revision=job.model.revision)
    return models


def run_eval(
    job,
    model: str | None = None,
    base_only: bool = False,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    models: dict[str, InferenceModel] | None = None,
) -> dict:
    """Evaluate base (reusing saved predictions when still valid) and finetuned on the same rows, then
    write the report. `progress(label, total_rows)` returns the per-batch callback for that model.
    `models` (from resolve_models) skips resolving `model` again."""
    models = models or resolve_models(job, model, base_only)
    rows = eval_rows(job, job.eval.max_rows)
    icfg = inference_config(job)
    eval_dir = RunDir(job.run_dir).eval_dir
    predictions, timings = {}, {}
    for label, m in models.items():
        t0 = time.perf_counter()
        on_rows = progress(label, len(rows)) if progress else None
        predictions[label], reused = predict(m, rows, icfg, eval_dir, label, on_rows, reuse=(label == "base"))
        if reused and on_rows:
            on_rows(len(rows))  # a progress bar for saved predictions is complete at once
        if "item" in rows[0]:  # prompt rows: graded now (a grader's code may have changed since the predictions)
            grade(job, predictions[label])
        timings[label] = {"seconds": round(time.perf_counter() - t0, 1), "reused": reused}
    sampling = None
    if icfg.samples is not None:
        sampling = {"samples": icfg.samples, "temperature": icfg.temperature, "top_p": icfg.top_p}
    report = build_report(eval_dir, predictions, {lb: m.describe() for lb, m in models.items()}, sampling)
    report["timings"] = timings
    if job.run.tracking.enabled:
        from rayft.training.tracking import log_eval

        log_eval(job, report)
    return report
