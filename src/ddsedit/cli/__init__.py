"""The ``ddsedit`` command line: a thin layer over :class:`ddsedit.editor.Editor`, built from the declarations.

stdout carries only the output path (for shell scripts); progress, warnings and errors
go to stderr. Exit codes: 0 done, 1 runtime failure, 2 bad input, 130 interrupted.
torch, diffusers and transformers are imported only when an edit runs, so ``--help``
and ``--version`` answer at once.

Modules: :mod:`~ddsedit.cli.options` (options derived from the settings' declarations),
:mod:`~ddsedit.cli.edit` (one command per registered method), :mod:`~ddsedit.cli.mask`,
:mod:`~ddsedit.cli.batch`, :mod:`~ddsedit.cli.evaluate`, :mod:`~ddsedit.cli.models` and
:mod:`~ddsedit.cli.errors` (the one error wrapper). :func:`build_app` builds the Typer app from the
methods registered when it is called; ``app`` is the one built at import.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ddsedit import __version__
from ddsedit.cli.batch import batch_command, batch_parameters
from ddsedit.cli.edit import register_edit_commands
from ddsedit.cli.errors import stderr
from ddsedit.cli.evaluate import eval_parameters, eval_runs, eval_shapes_command
from ddsedit.cli.mask import mask_command, mask_parameters
from ddsedit.cli.models import make_tiny_model_command, models_command
from ddsedit.cli.options import in_panel_order
from ddsedit.cli.ui import ui_command

__all__ = ["app", "build_app", "eval_runs", "main"]

SUMMARY = ("Edit images with text through score distillation (SDS, DDS, masked DDS, CDS, PDS, IDS, FlowEdit) on "
           "Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux.1.")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ddsedit {__version__}")
        raise typer.Exit()


def _main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Edit images with text: ddsedit dds --src photo.png --ref "what it shows" --query "what it should"."""


def _built(function: Callable[..., None], parameters: list[inspect.Parameter]) -> Callable[..., None]:
    """``function`` under a signature built now (from the methods registered now)."""

    def command(**options: Any) -> None:
        function(**options)

    command.__signature__ = inspect.Signature(in_panel_order(parameters))  # type: ignore[attr-defined]
    command.__doc__ = function.__doc__
    return command


def _summary(function: Callable[..., None]) -> str:
    """A command's whole first paragraph, as ``ddsedit --help`` lists it (click would cut it at the first period)."""
    return " ".join((function.__doc__ or "").strip().split("\n\n")[0].split())


def build_app() -> typer.Typer:
    """The Typer app: one edit command per registered method, then mask, batch, eval-shapes and the model tools."""
    app = typer.Typer(
        name="ddsedit", help=SUMMARY, no_args_is_help=True, add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]}, pretty_exceptions_enable=False,
        rich_markup_mode="rich",
    )  # fmt: skip
    app.callback()(_main_callback)
    register_edit_commands(app)
    for name, function, parameters in (
        ("mask", mask_command, mask_parameters()),
        ("batch", batch_command, batch_parameters()),
        ("eval-shapes", eval_shapes_command, eval_parameters()),
    ):
        app.command(name, no_args_is_help=name != "eval-shapes", short_help=_summary(function))(
            _built(function, parameters)
        )
    app.command("models", short_help=_summary(models_command))(models_command)
    app.command("ui", short_help=_summary(ui_command))(ui_command)
    app.command("make-tiny-model", no_args_is_help=True, short_help=_summary(make_tiny_model_command))(
        make_tiny_model_command
    )
    return app


app = build_app()


def main(typer_app: typer.Typer | None = None) -> None:
    """Console-script entry point (``typer_app``: another app, e.g. one built with more methods registered):
    usage errors (a missing or unknown option) are one line too."""
    # The click that typer runs on (typer >= 0.17 vendors its own copy): found through a public name (its Abort is
    # typer.Abort, which the vendored exceptions module does not hold).
    click_errors = sys.modules[typer.BadParameter.__module__]
    command = typer.main.get_command(typer_app or app)
    try:
        code = command.main(prog_name="ddsedit", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as shown:
        shown.show()  # a command given without arguments prints its help
        sys.exit(2)
    except click_errors.UsageError as error:
        where = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
        stderr.print(f"error: {error.format_message()}{where}", markup=False)
        sys.exit(2)
    except click_errors.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
