"""The Typer app and what every command shares: one red line for a `CapsxError` (never a traceback), the
float mode a command computes in, and for a picture command the process that will log its images."""

from __future__ import annotations

import contextlib
import functools
import platform
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from capsx import __version__
from capsx.errors import CapsxError

# Click's usage error, as the Click copy inside Typer defines it (typer.BadParameter is one)
UsageError: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _OneLineUsageErrors(TyperGroup):
    """Click's usage errors (an option's value out of range, an unknown option or command) as capsx's
    one red line and exit 2, like every other bad input, instead of Typer's usage line, hint and box."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare command group prints its help
                raise
            from capsx.console import print_error

            where = e.ctx.command_path if e.ctx is not None else "capsx"
            print_error(f"{e.format_message().rstrip('.')} ({where} --help lists the options)")
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="capsx",
    help="Train, evaluate and look inside Capsule Networks and the CNNs they are measured against.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals would print whole tensors
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])

_process_entry = False  # set by `main()`: the process is capsx's own (not a host running the app in-process)
_background: Any = None  # a picture command's TrackerProcess, started by `handles_errors`, taken by `take_background`


def handles_errors(fn: F) -> F:
    """Turn the project's errors into one red line and an exit code, never a traceback. In capsx's own
    process, also set the float mode a command computes in, before its first tensor (never for --help,
    which Typer answers before the command runs: importing torch alone takes seconds). For a command
    marked `logs_pictures`, first start the process that will log to MLflow, so its start-up overlaps
    torch's import (capsx/track/process.py), unless this process has imported MLflow already."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _background
        # Only where MLflow is not imported yet: a host that has it (a notebook, the tests) gains nothing.
        if getattr(fn, "logs_pictures", False) and kwargs.get("log") and "mlflow" not in sys.modules:
            from capsx.track.process import TrackerProcess

            _background = TrackerProcess()
        if _process_entry:
            from capsx.train.runtime import flush_denormals

            flush_denormals()
        try:
            return fn(*args, **kwargs)
        except CapsxError as e:
            from capsx.console import print_error

            print_error(str(e))
            raise typer.Exit(e.exit_code) from None
        finally:
            left, _background = _background, None
            if left is not None:  # the command failed before it took it
                with contextlib.suppress(CapsxError):
                    left.close()

    return wrapper  # type: ignore[return-value]


def logs_pictures(fn: F) -> F:
    """Mark a picture command (it has a `log` option): `handles_errors` starts its tracking process."""
    fn.logs_pictures = True  # type: ignore[attr-defined]
    return fn


def take_background() -> Any:
    """The tracking process `handles_errors` started for this command (None if it started none)."""
    global _background
    background, _background = _background, None
    return background


def _version(value: bool) -> None:
    if value:
        import torch

        typer.echo(f"capsx {__version__} (torch {torch.__version__}, python {platform.python_version()})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    from capsx.train.runtime import keep_large_tensors_on_heap

    keep_large_tensors_on_heap()


def main() -> None:
    """The process entry (`capsx`, `python -m capsx`, torchrun's workers). Subnormal flushing is asked
    for here, not in the app's callback, so a host that runs the app in-process keeps its own float mode;
    it happens when a command starts (`handles_errors`), so `--help` never imports torch."""
    global _process_entry
    _process_entry = True
    app()

