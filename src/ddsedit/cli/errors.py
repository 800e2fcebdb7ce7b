"""The one error wrapper of every command: one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

from ddsedit.errors import DDSEditError

# soft_wrap: without a terminal rich would hard-wrap at 80 columns, splitting messages mid-word.
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(error: BaseException, verbose: bool) -> typer.Exit:
    """Print one line for ``error`` on stderr and return the Exit to raise (2 bad input, 1 anything else)."""
    if isinstance(error, DDSEditError):
        stderr.print(f"error: {error}", markup=False)
        return typer.Exit(error.exit_code)
    if verbose:
        stderr.print_exception()
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    stderr.print(f"error: {type(error).__name__}: {first_line} (run with --verbose for details)", markup=False)
    return typer.Exit(1)


@contextlib.contextmanager
def one_line_errors(verbose: bool = False, interrupted: str = "interrupted: no output written") -> Iterator[None]:
    """Run a command's body: errors become one line and an exit code; Ctrl-C prints ``interrupted``, exits 130."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        stderr.print(interrupted, markup=False)
        raise typer.Exit(130) from None
    except Exception as error:  # noqa: BLE001 - the CLI's contract is one line, never a traceback
        raise fail(error, verbose) from None
