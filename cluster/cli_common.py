"""What every `rayft` command shares: the consoles, the common options, and turning the errors a
user can fix into one clear message and an exit code instead of a traceback."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole, so file:line can be grepped

ConfigArg = Annotated[Path, typer.Argument(help="YAML job file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: --set training.lr=1e-4 (repeatable).", show_default=False),
]
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).", show_default=False),
]


# Exit status per kind of error: 2 for a job file, a command line or a cluster that cannot be used as given.
EXIT_STATUS = {"config": 2, "usage": 2, "cluster": 2, "plan": 2}


@contextmanager
def _user_errors():
    """Turn the errors users can fix (config, data, model, storage, cluster, training: every exception class with
    an `error_kind`, also when Ray wrapped it) into "<kind> error <message>" and an exit status, not a
    traceback. `rayft train` has already recorded the same kind and message in the run's status.json."""
    from rayft.training.run_dir import user_error

    try:
        yield
    except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise  # a command's own exit, its message printed already
    except Exception as e:
        cause = user_error(e)
        if cause is None:
            raise
        err.print(f"[bold red]{cause.error_kind} error[/] {escape(str(cause))}", highlight=False)
        raise typer.Exit(EXIT_STATUS.get(cause.error_kind, 1)) from None


def _load(config: Path, overrides: list[str] | None):
    from rayft.cluster.config import load_config

    return load_config(config, overrides or [])
