"""`rayft sweep`: a hyperparameter search over `rayft train` runs with Ray Tune."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from rayft.cluster.cli_common import AddressOpt, ConfigArg, SetOpt, _load, _user_errors, err, out


def sweep(
    config: ConfigArg,
    set_: SetOpt = None,
    address: AddressOpt = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Sweep name (sets sweep.name; the same name resumes).")
    ] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Start over: move an earlier sweep of the same name aside.")
    ] = False,
) -> None:
    """Search hyperparameters: many finetunes scheduled by Ray Tune, hopeless ones stopped early (ASHA).
    Writes a leaderboard, a plot, the best trial's job file (best.yaml) and its model (best/)."""
    from rayft.cluster.runtime import connect
    from rayft.tuning.sweep import SweepError, check_sweep, run_sweep, sweep_cpus

    with _user_errors():
        cfg = _load(config, (set_ or []) + ([f"sweep.name={name}"] if name else []))
        problems = check_sweep(cfg)
        if problems:
            err.print(
                "[bold red]sweep error[/] the sweep cannot start:\n  " + "\n  ".join(escape(p) for p in problems),
                highlight=False,
            )
            raise typer.Exit(2)
        with err.status("starting Ray", spinner="dots"):
            connect(address, need_cpus=sweep_cpus(cfg), dashboard=True)
        try:
            result = run_sweep(cfg, restart=restart)
        except SweepError as e:
            err.print(f"[bold red]sweep error[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(2) from None  # raised before any trial starts
    print_leaderboard(result)
    if result.interrupted:
        err.print(f"interrupted: the same command resumes the sweep ({result.sweep_dir})")
        raise typer.Exit(130)
    if result.best is None:
        raise typer.Exit(1)


def print_leaderboard(result) -> None:
    from rich.table import Table

    from rayft.tuning.sweep import fmt_value as _fmt

    params = list(result.rows[0].params) if result.rows else []
    table = Table(title=f"sweep {result.sweep_dir}", title_justify="left")
    for col in ("#", "trial", *params, result.metric, "steps", "status", "wall s"):
        table.add_column(col, justify="right" if col not in ("trial", "status") else "left")
    for i, r in enumerate(result.rows):
        cells = [
            str(i + 1),
            r.trial,
            *(_fmt(r.params.get(p)) for p in params),
            _fmt(r.metric),
            str(r.steps),
            r.status,
            f"{r.wall_s:.0f}",
        ]
        style = "bold green" if result.best is not None and r is result.best else None
        table.add_row(*cells, style=style)
    out.print(table)
    d = result.sweep_dir
    out.print(f"  leaderboard  {d}/results.md, results.csv, results.png")
    if result.best is None and not result.interrupted:
        out.print(
            f"[bold red]no trial completed[/]: see each trial's error in the table and its run dir under {d}/runs/"
        )
        return
    if result.best is None:
        return
    out.print(f"  best         {result.best.trial}: {result.metric} {_fmt(result.best.metric)}")
    out.print(f"  rerun it     rayft train {d}/best.yaml")
    from rayft.tuning.sweep import best_model

    out.print(f"  serve it     rayft serve {best_model(d, result.best)}")
