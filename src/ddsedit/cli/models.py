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
    sd3: Annotated[bool, typer.Option("--sd3", help="Make it in SD3's layout (rectified flow, three text "
                                      "encoders).")] = False,  # fmt: skip
    flux: Annotated[bool, typer.Option("--flux", help="Make it in Flux.1 dev's layout (rectified flow, guidance "
                                       "embedding).")] = False,  # fmt: skip
) -> None:
    """Write a tiny RANDOM model (edits nothing meaningful) for smoke tests of the pipeline."""
    with one_line_errors():
        layouts = [flag for flag, chosen in (("--sdxl", sdxl), ("--sd3", sd3), ("--flux", flux)) if chosen]
        if len(layouts) > 1:
            raise InputError(f"choose one layout, got {' and '.join(layouts)}")
        if v_prediction and (sd3 or flux):
            raise InputError(f"--v-prediction does not apply to {layouts[0]}: rectified-flow models predict a velocity")
        from ddsedit.loading import quiet_third_party_output

        quiet_third_party_output()
        from ddsedit import tiny

        if folder.exists() and any(folder.iterdir()):
            raise InputError(f"{folder} exists and is not empty")
        if sd3:
            tiny.build_tiny_sd3_pipeline(folder)
        elif flux:
            tiny.build_tiny_flux_pipeline(folder)
        else:
            build = tiny.build_tiny_sdxl_pipeline if sdxl else tiny.build_tiny_pipeline
            build(folder, prediction_type="v_prediction" if v_prediction else "epsilon")
    typer.echo(str(folder))
