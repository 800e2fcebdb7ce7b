"""``ddsedit models`` and ``ddsedit make-tiny-model``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddsedit.cli.errors import one_line_errors, stderr
from ddsedit.errors import InputError


def models_command() -> None:
    """List the bundled models and the default model."""
    from ddsedit.loading import MODEL_ENVIRONMENT_VARIABLE, bundled_models, default_model

    bundled = bundled_models()
    if not bundled:
        typer.echo("no bundled models installed")
    for name, folder in bundled.items():
        typer.echo(f"{name}\t{folder}")
    stderr.print(f"default model: {default_model()} (set ${MODEL_ENVIRONMENT_VARIABLE} to change it)", markup=False)


def make_tiny_model_command(
    folder: Annotated[Path, typer.Argument(help="Folder to write the model to.")],
    v_prediction: Annotated[bool, typer.Option("--v-prediction", help="Make it a v-prediction model.")] = False,
    sdxl: Annotated[bool, typer.Option("--sdxl", help="Make it in SDXL's layout (two text encoders).")] = False,
) -> None:
    """Write a tiny RANDOM model (edits nothing meaningful) for smoke tests of the pipeline."""
    with one_line_errors():
        from ddsedit.loading import quiet_third_party_output

        quiet_third_party_output()
        from ddsedit.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline

        if folder.exists() and any(folder.iterdir()):
            raise InputError(f"{folder} exists and is not empty")
        build = build_tiny_sdxl_pipeline if sdxl else build_tiny_pipeline
        build(folder, prediction_type="v_prediction" if v_prediction else "epsilon")
    typer.echo(str(folder))
