"""`rayft submit` and `rayft jobs`: run finetunes and sweeps on a remote Ray cluster through the Jobs API."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from rayft.cluster.cli_common import ConfigArg, SetOpt, _user_errors, err

out = Console(soft_wrap=True)  # job ids and run paths stay on one line, whole, in logs and pipes

JobsAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="The cluster's dashboard, e.g. http://HEAD:8265 (default: RAY_ADDRESS, else http://127.0.0.1:8265).",
        show_default=False,
    ),
]
JobArg = Annotated[str, typer.Argument(help="Job id (or a run name: its newest job).", show_default=False)]
EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


def submit(
    config: ConfigArg,
    set_: SetOpt = None,
    address: JobsAddressOpt = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Submit `rayft sweep` instead of `rayft train`.")] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="Run name (sweep name with --sweep); the same name resumes.")
    ] = None,
    follow_: Annotated[
        bool,
        typer.Option("--follow", help="Stream the job's logs until it ends; exit 0 succeeded, 1 failed, 3 stopped."),  # noqa: E501
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check and package the job, print what would be sent, submit nothing."),
    ] = False,
) -> None:
    """Run a finetune (or a sweep) on a Ray cluster: the job file is checked here, shipped with its small local
    data files and rayft's code, and submitted through Ray's Jobs API. The laptop can then walk away."""
    from rayft.cluster import jobs

    command = "sweep" if sweep else "train"
    with _user_errors():
        pkg = jobs.package(config, set_ or [], command, name)
        if dry_run:
            try:
                _print_plan(pkg)
            finally:
                pkg.cleanup()
            return
        try:
            with err.status("submitting", spinner="dots"):
                job_id, dashboard = jobs.submit(address, pkg)
        finally:
            pkg.cleanup()
    shipped = sum(size for _, _, size in pkg.shipped)
    out.print(f"[bold green]submitted[/] {job_id}", highlight=False)
    out.print(f"  run        {pkg.run_dir}")
    if pkg.shipped:
        out.print(f"  shipped    {len(pkg.shipped)} local path(s), {jobs.fmt_size(shipped)}")
    out.print(f"  dashboard  {dashboard}/#/jobs/{job_id}")
    out.print(f"  follow     rayft jobs logs {job_id} --follow" + _addr_hint(address))
    if follow_:
        _follow(address, job_id)


def _print_plan(pkg) -> None:
    """What `rayft submit` would send: the entrypoint, the environment, the local files and the job file as the
    cluster gets it, every credential shown as *** (the job's environment alone would hold them)."""
    from rayft.cluster import jobs
    from rayft.training import launch
    from rayft.training.redact import redacted

    env = redacted(pkg.runtime_env)
    say = lambda text: out.print(text, markup=False, highlight=False)  # noqa: E731 - paths and values as they are
    out.print("[bold]dry run[/]: nothing submitted; the cluster would get")
    say(f"  run         {pkg.run_dir}")
    if env.get("image_uri"):
        say(f"  image       {env['image_uri']}")
        runs = launch.entrypoint(pkg.command, jobs.IMAGE_JOB_FILE)
        say(f"  entrypoint  {runs} (the job file below travels inside it)")
    else:
        say(f"  entrypoint  {pkg.entrypoint}")
    say("  env_vars    " + ", ".join(f"{k}={v}" for k, v in env.get("env_vars", {}).items()))
    if env.get("pip"):
        say("  pip         " + " ".join(env["pip"]))
    for key, path, size in pkg.shipped:
        say(f"  ships       {key}: {path} ({jobs.fmt_size(size)})")
    say(f"  job file    {jobs.JOB_FILE}:")
    say(pkg.job_text.rstrip("\n"))


def _addr_hint(address: str | None) -> str:
    return f" --address {address}" if address else ""


def _follow(address: str | None, job_id: str) -> None:
    from rayft.cluster import jobs

    with _user_errors():
        c = jobs.client(address)
        info = jobs.resolve_job(c, job_id)
        try:
            status = jobs.follow(c, jobs.job_id_of(info), _write)
        except KeyboardInterrupt:
            err.print(
                f"\nstopped following; the job goes on. Stop it with: rayft jobs stop {jobs.job_id_of(info)}"
                + _addr_hint(address)
            )
            raise typer.Exit(130) from None
        info = jobs.resolve_job(c, jobs.job_id_of(info))
    _print_end(info, status)
    raise typer.Exit(EXIT.get(status, 1))


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def _print_end(info, status: str) -> None:
    from rayft.cluster import jobs

    style = "bold green" if status == "SUCCEEDED" else "bold red"
    line = f"[{style}]{escape(status)}[/] {escape(jobs.job_id_of(info))}"
    if status != "SUCCEEDED" and info.message:
        line += f": {escape(info.message.strip().splitlines()[-1][:500])}"
    out.print(line, highlight=False)
    run_dir = jobs.run_dir_of(info.metadata or {})
    if not run_dir:
        return
    if (info.metadata or {}).get("rayft_command") == "sweep":
        out.print(f"  sweep dir  {run_dir}  (results.md leaderboard, best.yaml, best/ model)")
        return
    summary = jobs.run_summary(run_dir)
    if summary is None:
        out.print(f"  run dir    {run_dir} (on the cluster's storage; not readable from here)")
        return
    out.print(
        f"  run dir    {run_dir}  step {summary['step']}"
        + (f"  loss {summary['loss']:.4f}" if summary["loss"] is not None else "")
        + (f"  eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "")
    )
    if summary["final"]:
        out.print(f"  model      {summary['final']}  (rayft serve / rayft eval take it)")
    ended = summary["status"] or {}
    if ended.get("state") == "failed" and ended.get("error_kind"):  # the run's own word on why (its status.json)
        why = (ended.get("message") or "").strip().splitlines()
        out.print(f"  run failed {ended['error_kind']} error: {escape(why[0][:500] if why else '')}", highlight=False)


def jobs_list(address: JobsAddressOpt = None) -> None:
    """Every job on the cluster, newest last."""
    from rich.table import Table

    from rayft.cluster import jobs

    with _user_errors():
        c = jobs.client(address)
        rows = sorted(c.list_jobs(), key=lambda j: j.start_time or 0)
    table = Table(title=f"jobs on {c.get_address()}", title_justify="left")
    for col in ("job", "status", "command", "run", "started", "took"):
        table.add_column(col)
    for j in rows:
        md = j.metadata or {}
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        took = (((j.end_time or time.time() * 1000) - j.start_time) / 1000) if j.start_time else None
        table.add_row(
            j.submission_id or j.job_id or "-",
            str(j.status),
            md.get("rayft_command", "-"),
            md.get("rayft_run", (j.entrypoint or "")[:40]),
            started,
            f"{took:,.0f} s" if took is not None else "-",
        )
    out.print(table)
    if not rows:
        out.print("no jobs yet: rayft submit JOB.yaml --address ...")


def jobs_status(job: JobArg, address: JobsAddressOpt = None) -> None:
    """A job's status, its run dir and (when readable from here) its latest metrics and model."""
    from rayft.cluster import jobs

    with _user_errors():
        c = jobs.client(address)
        info = jobs.resolve_job(c, job)
    status = str(info.status)
    if status in jobs.LIVE:
        out.print(f"[bold]{status}[/] {escape(jobs.job_id_of(info))}", highlight=False)
        run_dir = jobs.run_dir_of(info.metadata or {})
        summary = jobs.run_summary(run_dir) if run_dir else None
        if run_dir:
            out.print(f"  run dir    {run_dir}" + (f"  step {summary['step']}" if summary else ""))
        return
    _print_end(info, status)
    raise typer.Exit(EXIT.get(status, 1))


def jobs_logs(
    job: JobArg,
    address: JobsAddressOpt = None,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")] = False,
) -> None:
    """A job's logs (the driver's output: rayft's progress lines and errors)."""
    from rayft.cluster import jobs

    if follow_:
        _follow(address, job)
        return
    with _user_errors():
        c = jobs.client(address)
        info = jobs.resolve_job(c, job)
        _write(c.get_job_logs(jobs.job_id_of(info)))


def jobs_stop(job: JobArg, address: JobsAddressOpt = None) -> None:
    """Stop a job (its workers end; a train run resumes from its last checkpoint when submitted again)."""
    from rayft.cluster import jobs

    with _user_errors():
        c = jobs.client(address)
        info = jobs.resolve_job(c, job)
        job_id = jobs.job_id_of(info)
        if str(info.status) not in jobs.LIVE:
            out.print(f"{job_id} already ended: {info.status}")
            return
        with err.status(f"stopping {job_id}", spinner="dots"):
            status = jobs.stop(c, job_id)
    out.print(f"{escape(job_id)}: {status}", highlight=False)
    if status in jobs.LIVE:
        err.print("the job has not ended yet; `rayft jobs status` shows when it has")
        raise typer.Exit(1)
