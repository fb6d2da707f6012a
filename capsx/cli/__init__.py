"""The `capsx` command line: thin Typer commands that parse options into a `Context`, call one job
(`capsx.jobs`) and exit with its code. A `CapsxError` becomes one red line.

app (the Typer app, error handling) · options (shared options) · train · evaluate · tools (summary, sync,
bench) · pictures · ui (ui, server)
"""

# Each registers its commands, in the order `capsx --help` lists them.
from capsx.cli import train  # noqa: F401, I001
from capsx.cli import evaluate, tools  # noqa: F401
from capsx.cli import pictures, ui  # noqa: F401
from capsx.cli.app import app, main

__all__ = ["app", "main"]
