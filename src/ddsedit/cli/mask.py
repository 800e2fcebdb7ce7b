"""``ddsedit mask``: draw an edit's mask from the prompts alone (DiffEdit) and write it."""

from __future__ import annotations

import contextlib
import inspect
import json
import random
from pathlib import Path
from typing import Annotated, Any

import typer

from ddsedit.cli.edit import auto_mask_settings
from ddsedit.cli.errors import one_line_errors, stderr
from ddsedit.cli.options import (
    AllowPickleOption,
    DeviceOption,
    DtypeOption,
    ModelOption,
    PredictionTypeOption,
    QueryOption,
    RefOption,
    SrcOption,
    VaeOption,
    parameter,
    setting_parameter,
)
from ddsedit.settings import INPUT_PANEL, MASK_PANEL, EditConfig, declared, declared_by_name


def mask_parameters() -> list[inspect.Parameter]:
    from ddsedit.automask import AutoMaskSettings

    shared = declared_by_name(EditConfig)
    return [
        parameter("src", SrcOption, inspect.Parameter.empty),
        parameter("ref", RefOption, inspect.Parameter.empty),
        parameter("query", QueryOption, inspect.Parameter.empty),
        parameter("output", Annotated[Path | None, typer.Option(
            "-o", "--output", help="Mask file (.png, .jpg/.jpeg or .webp). Default: ./<source stem>.mask.png",
            show_default=False, rich_help_panel=INPUT_PANEL)]),
        parameter("overwrite", Annotated[bool, typer.Option(
            "--overwrite", help="Replace an existing mask file.", rich_help_panel=INPUT_PANEL)], False),
        parameter("quiet", Annotated[bool, typer.Option(
            "--quiet", "-q", help="No notes; errors only.", rich_help_panel=INPUT_PANEL)], False),
        parameter("verbose", Annotated[bool, typer.Option(
            "--verbose", help="Show library warnings and tracebacks.", rich_help_panel=INPUT_PANEL)], False),
        setting_parameter(shared["size"]),
        parameter("seed", Annotated[int | None, typer.Option(
            "--seed", help="Seed of the noise draws. Default: random, recorded in the PNG.", show_default=False,
            rich_help_panel=MASK_PANEL)]),
        *[setting_parameter(item) for item in declared(AutoMaskSettings)],
        parameter("model", ModelOption),
        parameter("vae", VaeOption),
        parameter("device", DeviceOption, "auto"),
        parameter("dtype", DtypeOption, "auto"),
        parameter("allow_pickle", AllowPickleOption, False),
        parameter("prediction_type", PredictionTypeOption),
    ]  # fmt: skip


def mask_command(**options: Any) -> None:
    """Draw the mask of an edit from the prompts alone (DiffEdit): white where --ref and --query make the model's
    predictions (noise, or velocity on SD3 and Flux) differ, at the source's size. Pass it back to masked-dds with
    --mask FILE."""
    with one_line_errors(options["verbose"]):
        _run_mask(**options)





def _run_mask(*, src: Path, ref: str, query: str, output: Path | None, model: str | None, vae: str | None,
              device: str, dtype: str,
              size: int | None, seed: int | None, overwrite: bool, allow_pickle: bool, prediction_type: str | None,
              quiet: bool, verbose: bool, **flags: Any) -> None:  # fmt: skip
    """Every cheap check, then load the model, draw the mask and write it atomically."""
    from ddsedit import __version__, imageio
    from ddsedit.checks import check_prediction_type, check_prompts

    check_prompts("masked-dds", query, ref)
    check_prediction_type(prediction_type)
    settings = auto_mask_settings("auto", ref, query, flags)
    settings = settings.replace(seed=seed if seed is not None else random.SystemRandom().randrange(2**31))
    settings.validate()
    EditConfig().replace(size=size).validate()
    source = imageio.load_image(src)
    if output is not None and output.is_dir():
        output = output / f"{src.stem}.mask.png"
    output_path = imageio.check_output_suffix(output or Path.cwd() / f"{src.stem}.mask.png", "-o")
    imageio.check_output_path(output_path, overwrite)

    from ddsedit.loading import quiet_third_party_output

    quiet_third_party_output(verbose)
    from ddsedit.editor import Editor

    with stderr.status("loading model...", spinner="dots") if not quiet else contextlib.nullcontext():
        editor = Editor.from_pretrained(
            model, device=device, dtype=dtype, allow_pickle=allow_pickle, prediction_type=prediction_type,
            keep_text_encoder=False, vae=vae,
        )  # fmt: skip
    longest_side = editor.config(size=size).size
    mask = editor.auto_mask(source, ref=ref, query=query, settings=settings, size=longest_side)
    recorded = {
        "ref": ref, "query": query, **settings.recorded(), "size": longest_side,
        "model": editor.components.identity or editor.components.source, "model_family": editor.family.name,
        **({"vae": editor.components.vae_identity} if editor.components.vae_identity else {}),
        "prediction_type": editor.components.prediction_type, "source_sha256": imageio.file_sha256(src),
        "ddsedit_version": __version__,
    }  # fmt: skip
    metadata = {**{key: str(value) for key, value in recorded.items()}, "ddsedit": json.dumps(recorded, sort_keys=True)}
    written = imageio.save_image(mask, output_path, metadata, overwrite=overwrite)
    typer.echo(str(written))
