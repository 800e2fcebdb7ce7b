"""The commands' options: those derived from the settings' declarations, and the few that are the CLI's own.

A declared setting (:func:`ddsedit.settings.setting`) becomes a Typer option whose default is ``None`` (not
given: the model's or the method's default applies), whose help shows the declared default, and which sits in
its declared help panel. Commands are built from lists of :class:`inspect.Parameter` so that a method's
declaration alone decides which options its command has.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ddsedit.errors import InputError
from ddsedit.settings import (
    EDIT_PANEL,
    INPUT_PANEL,
    MASK_PANEL,
    METHOD_PANEL,
    MODEL_PANEL,
    SPEED_PANEL,
    Declared,
    base_kind,
    parse_text,
    shown_default,
)

PANELS = (INPUT_PANEL, EDIT_PANEL, METHOD_PANEL, MASK_PANEL, MODEL_PANEL, SPEED_PANEL)


def in_panel_order(parameters: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """``parameters`` grouped by help panel in the order of :data:`PANELS` (--help shows panels as first met)."""

    def rank(item: inspect.Parameter) -> int:
        if item.kind is not inspect.Parameter.KEYWORD_ONLY:
            return -1  # arguments keep their place, first
        panel = getattr(typing.get_args(item.annotation)[1], "rich_help_panel", None)
        return PANELS.index(panel) if panel in PANELS else len(PANELS)

    return sorted(parameters, key=rank)


def parameter(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def setting_parameter(item: Declared, default_text: str | None = None, prefix: str = "",
                      panel: str | None = None) -> inspect.Parameter:  # fmt: skip
    """The option of a declared setting; ``default_text`` overrides the declared default in the help."""
    base, _ = base_kind(item.kind)
    cli_type: Any = {tuple: str, bool: bool}.get(base, base)
    shown = default_text if default_text is not None else item.default_text()
    help_text = prefix + item.info.help
    if shown and item.default is not None and item.default is not False and "default" not in help_text:
        help_text += escape(f" [default: {shown}]")  # rich markup would take the brackets for a style
    option = typer.Option(*item.flags, help=help_text, show_default=False, rich_help_panel=panel or item.info.panel)
    return parameter(item.name, Annotated[cli_type | None, option])


def default_per_method(name: str) -> str:
    """A shared setting's default over the registered methods: one value, or the most common and the exceptions."""
    from ddsedit.methods import all_methods

    values = {method.name: shown_default(getattr(method.default_config(), name)) for method in all_methods()}
    common = max(set(values.values()), key=list(values.values()).count)
    others = [f"{method} {value}" for method, value in values.items() if value != common]
    return "; ".join([common, *others])


def from_flags(items: dict[str, Declared], values: dict[str, Any]) -> dict[str, Any]:
    """The given flags (not None) as settings: comma-separated lists parsed and checked (one-line errors)."""
    given = {}
    for name, value in values.items():
        if value is None:
            continue
        item = items[name]
        if isinstance(value, str) and base_kind(item.kind)[0] is tuple:
            parsed = parse_text(item, value)
            if parsed is None or not parsed:
                raise InputError(f"{item.flag} must be comma-separated integers, got {value!r}")
            value = parsed
        given[name] = value
    return given


# The options that are the CLI's own (not edit settings), declared once for every command that has them.
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Bundled name (shapes), diffusers folder, .safetensors file or hub id. "
        "Default: $DDSEDIT_MODEL or stable-diffusion-v1-5/stable-diffusion-v1-5.",
        show_default=False, rich_help_panel=MODEL_PANEL,
    ),
]  # fmt: skip
VaeOption = Annotated[
    str | None,
    typer.Option(
        "--vae", help="Use this VAE instead of the model's: a folder, .safetensors file or hub id "
        "(e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16).", show_default=False, rich_help_panel=MODEL_PANEL,
    ),
]  # fmt: skip
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=MODEL_PANEL)
]
DtypeOption = Annotated[
    str,
    typer.Option("--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp16, bf16 or fp32.", rich_help_panel=MODEL_PANEL),
]
AllowPickleOption = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", help="Allow .ckpt/.pt pickle checkpoints (they can run code).", rich_help_panel=MODEL_PANEL
    ),
]
PredictionTypeOption = Annotated[
    str | None,
    typer.Option(
        "--prediction-type", help="Override the model's: epsilon or v_prediction.", show_default=False,
        rich_help_panel=MODEL_PANEL,
    ),
]  # fmt: skip
CudaGraphOption = Annotated[
    bool,
    typer.Option(
        "--cuda-graph", help="Record one step as a CUDA graph and replay it (CUDA only).", rich_help_panel=SPEED_PANEL
    ),
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace existing output files.", rich_help_panel=INPUT_PANEL)
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar or notes; errors only.", rich_help_panel=INPUT_PANEL)
]
VerboseOption = Annotated[
    bool,
    typer.Option("--verbose", help="Show library warnings, loading bars and tracebacks.", rich_help_panel=INPUT_PANEL),
]
SrcOption = Annotated[
    Path, typer.Option("--src", help="Source image.", show_default=False, rich_help_panel=INPUT_PANEL)
]
RefOption = Annotated[
    str, typer.Option("--ref", help="What the source image shows.", show_default=False, rich_help_panel=EDIT_PANEL)
]
QueryOption = Annotated[
    str,
    typer.Option("--query", help="What the edited image should show.", show_default=False, rich_help_panel=EDIT_PANEL),
]
MaskOption = Annotated[
    str | None,
    typer.Option(
        "--mask", help="Mask image: white = editable, black = kept; or auto: drawn from --ref and --query (DiffEdit).",
        show_default=False, rich_help_panel=MASK_PANEL,
    ),
]  # fmt: skip
SaveMaskOption = Annotated[
    Path | None,
    typer.Option(
        "--save-mask", help="Also write the mask the edit used (e.g. --mask auto's).", show_default=False,
        rich_help_panel=MASK_PANEL,
    ),
]  # fmt: skip
