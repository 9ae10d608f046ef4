"""What every `rayft` command shares: the consoles, the common options, and turning the errors a
user can fix into one clear message and an exit code instead of a traceback."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

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


@contextmanager
def _user_errors():
    """Turn the errors users can fix (config, data, model, cluster) into a message and an exit code, not a traceback."""
    from rayft.cluster.config import ConfigError
    from rayft.cluster.jobs import JobsError
    from rayft.training.data import DataError
    from rayft.training.models import ModelError
    from rayft.training.storage import StorageError

    try:
        yield
    except StorageError as e:
        err.print(f"[bold red]storage error[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    except ConfigError as e:
        err.print(f"[bold red]config error[/] {escape(e.render())}", highlight=False)
        raise typer.Exit(2) from None
    except JobsError as e:
        err.print(f"[bold red]cluster error[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    except (DataError, ModelError) as e:
        kind = "data error" if isinstance(e, DataError) else "model error"
        err.print(f"[bold red]{kind}[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    except Exception as e:  # Ray wraps errors raised in data workers; unwrap ours.
        cause = _user_cause(e)
        if cause is None:
            raise
        err.print(f"[bold red]data error[/] {escape(str(cause))}", highlight=False)
        raise typer.Exit(1) from None


def _user_cause(e: BaseException):
    from rayft.training.data import DataError
    from rayft.training.models import ModelError

    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, (DataError, ModelError)):
            return e
        nxt = getattr(e, "cause", None) or e.__cause__ or e.__context__
        e, seen = nxt, seen + 1
    return None


def _load(config: Path, overrides: list[str] | None):
    from rayft.cluster.config import load_config

    return load_config(config, overrides or [])
