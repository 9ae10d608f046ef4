"""The `rayft` command line. Heavy libraries (torch, ray, transformers) load inside commands,
so `rayft --help` and config validation stay fast on a CPU head node."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from rayft.cluster.cli_common import AddressOpt, ConfigArg, SetOpt, _load, _user_errors, err, out
from rayft.cluster.generate_cmd import generate
from rayft.cluster.jobs_cmd import jobs_list, jobs_logs, jobs_status, jobs_stop, submit
from rayft.cluster.serve_cmd import serve
from rayft.cluster.sweep_cmd import sweep
from rayft.training.run import plan_line, step_line


def config_show(
    config: ConfigArg,
    set_: SetOpt = None,
    describe: Annotated[bool, typer.Option("--describe", help="List every key with its default and meaning.")] = False,
) -> None:
    """Validate a job file and print the resolved config (defaults < YAML < --set), credentials shown as ***."""
    import yaml

    from rayft.training.redact import redacted

    if describe:
        from rayft.cluster.config import config_reference

        table = Table("key", "default", "meaning", show_lines=False)
        for key, default, desc in config_reference():
            table.add_row(key, escape(default), escape(desc))
        out.print(table)
        return
    with _user_errors():
        cfg = _load(config, set_)
    shown = redacted(cfg.model_dump(mode="json"))
    out.print(yaml.safe_dump(shown, sort_keys=False), end="", markup=False, highlight=False, soft_wrap=True)


def data_inspect(
    config: ConfigArg,
    set_: SetOpt = None,
    address: AddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (for scripts).")] = False,
    examples: Annotated[int, typer.Option(help="Rendered examples to show.")] = 2,
) -> None:
    """Run the data pipeline and report rows, token counts, lengths, truncation and packing."""
    with _user_errors():
        cfg = _load(config, set_)
        report = _inspect(cfg, address, examples, quiet=as_json)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_inspect_report(report)


def _inspect(cfg, address: str | None, examples: int, quiet: bool) -> dict:
    from rayft.cluster.runtime import connect
    from rayft.training.data import inspect_data

    t0 = time.perf_counter()
    with err.status("starting Ray", spinner="dots") if not quiet else _nullcontext() as status:
        connect(address)
        if status is not None:
            status.update("reading, validating and tokenizing the data")
        objective = cfg.training.objective
        report = inspect_data(
            cfg.model, cfg.data, cfg.training.micro_batch_size, examples, objective == "dpo", objective == "grpo"
        )
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    return report


@contextmanager
def _nullcontext():
    yield None


def print_inspect_report(report: dict) -> None:
    table = Table(title=f"data ({report['model']}, max_seq_len {report['max_seq_len']})")
    splits = list(report["splits"])
    table.add_column("")
    for s in splits:
        table.add_column(s, justify="right")

    def row(label: str, fn) -> None:
        table.add_row(label, *(fn(report["splits"][s]) for s in splits))

    row("rows read", lambda r: f"{r['rows']:,}")
    row("bad rows (skipped)", lambda r: f"{r['bad_rows']:,}")
    row("examples", lambda r: f"{r['examples']:,}")
    row("truncated", lambda r: f"{r['truncated']:,}")
    row("dropped", lambda r: f"{r['dropped']:,}")
    row("tokens", lambda r: f"{r['tokens']:,}")
    row("  prompt (masked)", lambda r: f"{r['prompt_tokens']:,}")
    row("  response (trained)", lambda r: f"{r['response_tokens']:,}")
    row("length min / mean / max", lambda r: f"{r['length']['min']} / {r['length']['mean']:.0f} / {r['length']['max']}")
    row(
        "length p50 / p90 / p99",
        lambda r: f"{r['length'].get('p50', 0)} / {r['length'].get('p90', 0)} / {r['length'].get('p99', 0)}",
    )
    row("padding efficiency", lambda r: f"{r['padding_efficiency']:.1%}")
    row("packed rows", lambda r: f"{r['packed_rows']:,}")
    row("packing efficiency", lambda r: f"{r['packing_efficiency']:.1%}")
    if "pairs" in report["splits"][splits[0]]:

        def answer(kind: str):
            return lambda r: "{min} / {mean:.0f} / {max}".format(**r["pairs"][f"{kind}_answer_tokens"])

        row("preference pairs", lambda r: f"{r['pairs']['pairs']:,}")
        row("  chosen answer min / mean / max", answer("chosen"))
        row("  rejected answer min / mean / max", answer("rejected"))
    if "prompt_fields" in report["splits"][splits[0]]:
        row(
            "fields for the grader",
            lambda r: ", ".join(f"{k} ({n:,})" for k, n in r["prompt_fields"].items()) or "none",
        )
    out.print(table)
    first = report["splits"][splits[0]]
    if first["rendered_examples"]:
        out.print("[dim]Rendered examples: [green]green[/] = trained (loss), dim = masked (no loss).[/]")
    for i, segs in enumerate(first["rendered_examples"], 1):
        out.rule(f"example {i}")
        text = "".join(
            f"[bold green]{escape(s['text'])}[/]" if s["trained"] else f"[dim]{escape(s['text'])}[/]" for s in segs
        )
        out.print(text, highlight=False)
        for s in segs:
            if "fields" in s:
                out.print(f"[dim]fields:[/] {escape(json.dumps(s['fields'], ensure_ascii=False))}", highlight=False)
    if "wall_s" in report:
        out.print(f"[dim]inspected in {report['wall_s']:.1f} s[/]")


def train(
    config: ConfigArg,
    set_: SetOpt = None,
    address: AddressOpt = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Start over: move an earlier run of the same name aside.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the memory plan (per GPU and per node) and exit; starts nothing.")
    ] = False,
    gpu_memory: Annotated[
        float | None,
        typer.Option(
            "--gpu-memory",
            metavar="GiB",
            help="With --dry-run: memory per GPU (default: the GPUs of the --address cluster, else this machine's).",
            show_default=False,
        ),
    ] = None,
    host_memory: Annotated[
        float | None,
        typer.Option(
            "--host-memory",
            metavar="GiB",
            help="With --dry-run: host RAM per node (default: the --address cluster's nodes, else this machine's).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Finetune with Ray Train + DeepSpeed; resumes an interrupted run of the same name."""
    with _user_errors():
        cfg = _load(config, set_)
        if dry_run:
            _dry_run(cfg, address, gpu_memory, host_memory)
            return
        if gpu_memory is not None or host_memory is not None:
            err.print("[bold red]usage error[/] --gpu-memory and --host-memory go with --dry-run (the memory plan)")
            raise typer.Exit(2)
        result = _train(cfg, address, restart)
    _print_train_summary(result)


def _dry_run(cfg, address: str | None, gpu_memory: float | None, host_memory: float | None) -> None:
    """Print the job's memory plan; exit 1 when it will not fit. Ray is joined only with --address (to read the
    cluster's GPUs and RAM), never started."""
    from rayft.training.memory_plan import PlanError, estimate

    if address:
        from rayft.cluster.runtime import connect

        with err.status("joining the Ray cluster to read its resources", spinner="dots"):
            connect(address)  # with an address, ray.init joins that cluster and starts none
    with err.status("estimating memory from the model's config", spinner="dots"):
        try:
            plan = estimate(cfg, gpu_memory_gib=gpu_memory, host_memory_gib=host_memory)
        except PlanError as e:
            err.print(f"[bold red]plan error[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(2) from None
    out.print(plan.render(), markup=False, highlight=False, soft_wrap=True)
    if plan.fits is False:
        raise typer.Exit(1)


def _train(cfg, address: str | None, restart: bool):

    from rayft.cluster.runtime import connect
    from rayft.training.trainer import required_cpus, run_training

    with err.status("starting Ray", spinner="dots"):
        joined = connect(address, need_cpus=required_cpus(cfg))
    # run_training records how the run ended in its status.json; its errors (TrainError's "training error",
    # data, model, storage) are printed by _user_errors
    with TrainProgress(cfg.training.log_every_steps) as progress:
        return run_training(cfg, restart=restart, on_event=progress.on_event, cluster_can_grow=joined)


class TrainProgress:
    """One driver-side progress bar fed by rank 0's metrics (step/total, loss, tokens/s, ETA). Without a
    terminal (a cluster job's log, a pipe) it prints one line every `log_every` steps instead."""

    def __init__(self, log_every: int = 10):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[main]}  eval {task.fields[eval]}  {task.fields[speed]}"),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )
        self.task = None
        self.log_every = log_every
        self.lines = not err.is_terminal
        self.total = None

    def __enter__(self):
        self.progress.start()
        self.task = self.progress.add_task("train", total=None, main="loss -", eval="-", speed="- tok/s")
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def on_event(self, r: dict) -> None:
        from rayft.training.run import eval_figure, step_figures

        assert self.task is not None, "on_event runs inside `with TrainProgress()`"
        if self.lines:
            self._line(r)
        if r.get("event") == "warning":
            self.progress.console.print(f"[yellow]warning[/] {escape(r['message'])}", highlight=False)
        if r.get("event") == "planned":
            self.total = r["total_steps"]
            self.progress.update(self.task, total=r["total_steps"])
            self.progress.console.print(plan_line(r))
        elif r.get("event") == "start" and r.get("resumed"):
            self.progress.console.print(f"resumed from the checkpoint at step {r['step']}")
            self.progress.update(self.task, completed=r["step"])
        elif "step" in r and "loss" in r:
            main, speed = step_figures(r)
            self.progress.update(self.task, completed=r["step"], main=main, speed=speed)
        evaluated = eval_figure(r)
        if evaluated:
            self.progress.update(self.task, eval=evaluated)

    def _line(self, r: dict) -> None:
        line = step_line(r, self.total, self.log_every)
        if line:
            self.progress.console.print(line, highlight=False)


def _print_train_summary(result) -> None:
    from rayft.training.run import summary_lines

    out.print(f"[bold green]done[/]: {result.steps} steps", highlight=False)
    for line in summary_lines(result):
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def eval_cmd(
    config: ConfigArg,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Finetuned model: run dir, model dir or adapter dir (default: the run's final/)."),
    ] = None,
    base: Annotated[bool, typer.Option("--base", help="Evaluate only the base model (e.g. before training).")] = False,
    set_: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Base vs finetuned on the evaluation split, by Ray Data batch inference; writes RUN_DIR/eval/report.*"""
    with _user_errors():
        cfg = _load(config, set_)
        report = _eval(cfg, address, model, base)
    print_eval_report(report)


def _eval_cpus(cfg) -> float:
    return cfg.eval.replicas * cfg.eval.cpus_per_replica  # the model replicas


def _eval(cfg, address: str | None, model: str | None, base_only: bool) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rayft.cluster.runtime import connect
    from rayft.training.evaluate import resolve_models, run_eval

    models = resolve_models(cfg, model, base_only)  # a missing model fails here, before Ray starts
    with err.status("starting Ray", spinner="dots"):
        connect(address, need_cpus=_eval_cpus(cfg))
    progress = Progress(
        TextColumn("[bold]eval {task.description}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeRemainingColumn(),
        console=err,
    )

    def start(label: str, total: int):
        task = progress.add_task(label, total=total)
        return lambda n: progress.advance(task, n)

    with progress:
        return run_eval(cfg, progress=start, models=models)


def print_eval_report(report: dict) -> None:
    from rayft.training.evaluate import format_change, format_metric, metric_keys, metric_title

    labels = list(report["models"])
    for lb in labels:
        t = report.get("timings", {}).get(lb, {})
        how = "saved predictions reused" if t.get("reused") else f"{t.get('seconds', 0):.0f} s"
        out.print(f"{lb:<10} {escape(report['models'][lb])}  ({how})", highlight=False)
    for split, per_label in report["splits"].items():
        n = next(iter(per_label.values()))["rows"]
        table = Table(title=f"{split} ({n} rows)", title_justify="left")
        table.add_column("metric")
        for lb in labels:
            table.add_column(lb, justify="right")
        if len(labels) == 2:
            table.add_column("change", justify="right")
        for m in metric_keys(per_label):
            values = [per_label.get(lb, {}).get(m) for lb in labels]
            cells = [format_metric(m, v) for v in values]
            if len(labels) == 2:
                cells.append(format_change(m, values[0], values[1]) if None not in values else "")
            table.add_row(metric_title(m), *cells)
        out.print(table)
    sampling = report.get("sampling")
    if sampling:
        out.print(
            f"rewards: the greedy answer and {sampling['samples']} sampled answers per prompt (temperature "
            f"{sampling['temperature']}, top_p {sampling['top_p']}), graded by training.rl's reward",
            highlight=False,
        )
    files = report.get("files", {})
    out.print(  # one unbroken line, so the paths can be copied
        f"report: {files.get('markdown')}  (and {files.get('json')}, {files.get('plot')})",
        highlight=False,
        soft_wrap=True,
    )


def export_cmd(
    run_dir: Annotated[str, typer.Argument(help="A run directory written by rayft train (local or s3://, gs://).")],
    checkpoint: Annotated[
        int | None, typer.Option("--checkpoint", help="Step of the kept checkpoint to export (default: latest).")
    ] = None,
    out_dir: Annotated[str | None, typer.Option("--out", help="Output directory (default: RUN_DIR/final).")] = None,
) -> None:
    """Re-export a run's model (LoRA adapter + merged model, or full model) from a kept checkpoint."""
    from rayft.training import storage
    from rayft.training.export import ExportError, export_checkpoint
    from rayft.training.run_dir import JOB_FILE, RunDir

    run = RunDir(run_dir)
    with _user_errors():
        if not storage.exists(run.job_file):
            err.print(f"[bold red]export error[/] {run_dir} has no {JOB_FILE}; is it a rayft run directory?")
            raise typer.Exit(2)
        with storage.local_copy(run.job_file) as local_job:
            cfg = _load(Path(local_job), None)
        kept = run.checkpoints()
        if not kept:
            err.print(f"[bold red]export error[/] {run_dir} has no checkpoints")
            raise typer.Exit(1)
        if checkpoint is None:
            step, path = kept[-1]
        else:
            match = [k for k in kept if k[0] == checkpoint]
            if not match:
                steps = ", ".join(str(s) for s, _ in kept)
                err.print(f"[bold red]export error[/] no checkpoint at step {checkpoint}; kept steps: {steps}")
                raise typer.Exit(2)
            step, path = match[0]
        target = out_dir or run.final
        try:
            export_checkpoint(path, cfg, target)
        except ExportError as e:
            err.print(f"[bold red]export error[/] {escape(str(e))}")
            raise typer.Exit(1) from None
    out.print(f"exported step {step} to {target}")


def demo(
    config: Annotated[Path, typer.Argument(help="Job file of the quickstart.")] = Path("configs/quickstart.yaml"),
    set_: SetOpt = None,
    address: AddressOpt = None,
    keep_serving: Annotated[
        bool | None,
        typer.Option(
            "--keep-serving/--no-keep-serving",
            help="After the demo, keep the endpoint up until Ctrl-C (default: only when run from a terminal).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """The quickstart end to end: inspect the data, evaluate the base model, finetune, evaluate again, compare,
    and serve the finetuned model over the OpenAI API."""

    from rayft.cluster.runtime import connect
    from rayft.training.trainer import required_cpus

    stages: list[tuple[str, float]] = []
    t_all = time.perf_counter()

    def stage(name: str, t0: float) -> None:
        stages.append((name, time.perf_counter() - t0))
        out.print(f"[dim]{name}: {stages[-1][1]:.0f} s[/]")

    with _user_errors():
        cfg = _load(config, set_)
        out.print(f"[bold]rayft demo[/] — job file {config}, model {cfg.model.name}, run dir {cfg.run_dir}")
        t0 = time.perf_counter()
        with err.status("starting Ray", spinner="dots"):
            # one local Ray for every stage: room for the training workers and data, or the eval replicas
            connect(address, need_cpus=max(required_cpus(cfg), _eval_cpus(cfg)))
        out.rule("1. data inspect")
        print_inspect_report(_inspect(cfg, address, examples=1, quiet=True))
        stage("data inspect", t0)

        t0 = time.perf_counter()
        out.rule("2. evaluate the base model")
        _fresh_demo_run(cfg.run_dir)
        print_eval_report(_eval(cfg, address, None, base_only=True))
        stage("base eval", t0)

        t0 = time.perf_counter()
        out.rule("3. finetune")
        _print_train_summary(_train(cfg, address, restart=False))
        stage("train", t0)

        t0 = time.perf_counter()
        out.rule("4. evaluate the finetuned model against the base")
        print_eval_report(_eval(cfg, address, None, base_only=False))
        stage("finetuned eval", t0)

        t0 = time.perf_counter()
        out.rule("5. serve the finetuned model")
        base = _demo_serve(cfg, config, set_, address)
        stage("serve", t0)
    out.rule("stage times")
    for name, secs in stages:
        out.print(f"  {name:<16} {secs:6.1f} s")
    out.print(f"  {'total':<16} {time.perf_counter() - t_all:6.1f} s")
    from rayft.cluster.serve_cmd import serve_until_interrupted, stop_app

    if keep_serving is None:  # CI, a script or nohup: end after the last stage instead of waiting for a Ctrl-C
        keep_serving = sys.stdin.isatty() and sys.stdout.isatty()
    if keep_serving:
        out.print(f"[bold]and now it is served at {base}/v1[/] (the examples above work while it runs)")
        serve_until_interrupted()
    else:
        stop_app()


def _demo_serve(cfg, config: Path, overrides, address: str | None) -> str:
    """Serve the run's final/ model, ask it one held-out question over HTTP, print how to call it."""
    from rayft.cluster.serve_cmd import _spec, ask, print_usage, start_app

    spec = _spec(str(config), overrides, None, None, None, None)
    base = start_app(spec, address)
    first = cfg.data.eval[0] if isinstance(cfg.data.eval, list) else cfg.data.eval
    row = None
    if first and str(first).endswith(".jsonl") and Path(first).is_file():
        with open(first) as f:
            row = json.loads(f.readline() or "{}")
    if row and isinstance(row.get("messages"), list):
        messages = [m for m in row["messages"] if m["role"] != "assistant"]
        t0 = time.perf_counter()
        reply = ask(base, spec.model_name, messages, cfg.eval.max_new_tokens)
        out.print(f"asked over HTTP ({time.perf_counter() - t0:.1f} s): {escape(messages[-1]['content'])}")
        out.print(f"  reply: {escape(reply)}", highlight=False)
    print_usage(base, spec)
    return base


DEMO_MARK = ".rayft-demo"


def _fresh_demo_run(run_dir: str) -> None:
    """The demo starts from scratch. A run dir an earlier demo made is replaced; any other is moved aside."""
    import os
    import shutil

    if os.path.isdir(run_dir) and any(os.scandir(run_dir)):
        if os.path.exists(os.path.join(run_dir, DEMO_MARK)):
            shutil.rmtree(run_dir)
        else:
            aside = f"{run_dir}.prev-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(run_dir, aside)
            out.print(f"moved the earlier run aside to {aside}")
    os.makedirs(run_dir, exist_ok=True)
    Path(run_dir, DEMO_MARK).write_text("made by rayft demo; the next demo replaces this run directory\n")


# The command tree, in one place. Every command is a plain function (here or in a *_cmd module); a group
# is (help, {name: command}).
COMMANDS = {
    "config": ("Job file commands.", {"show": config_show}),
    "data": ("Data pipeline commands.", {"inspect": data_inspect}),
    "generate": generate,
    "train": train,
    "eval": eval_cmd,
    "export": export_cmd,
    "sweep": sweep,
    "serve": serve,
    "demo": demo,
    "submit": submit,
    "jobs": (
        "Jobs on a Ray cluster: list, status, logs, stop.",
        {"list": jobs_list, "status": jobs_status, "logs": jobs_logs, "stop": jobs_stop},
    ),
}


def build_app(commands: dict = COMMANDS, **settings) -> typer.Typer:
    group = typer.Typer(no_args_is_help=True, **settings)
    for name, command in commands.items():
        if isinstance(command, tuple):
            help_text, sub = command
            group.add_typer(build_app(sub, help=help_text), name=name)
        else:
            group.command(name)(command)
    return group


app = build_app(
    name="rayft",
    help="Finetune open LLMs on Ray (Ray Data -> Ray Train + DeepSpeed) and serve them.",
    pretty_exceptions_enable=False,
    add_completion=False,
)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
