"""The edit commands, one per registered method, each built from the method's declaration.

A command has the shared settings (:class:`ddsedit.settings.EditConfig`), the method's own options, the mask
options when the method takes a mask, and ``--cuda-graph`` when a CUDA graph can record the method's step.
Every cheap check runs before torch is imported: prompts, each setting's type and range, options that cannot act
(one line naming the flag), files and output names. Then the model loads, the edit runs, the output is written
atomically.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from ddsedit.cli.errors import one_line_errors, stderr
from ddsedit.cli.options import (
    AllowPickleOption,
    CudaGraphOption,
    DeviceOption,
    DtypeOption,
    MaskOption,
    ModelOption,
    OverwriteOption,
    PredictionTypeOption,
    QueryOption,
    QuietOption,
    RefOption,
    SaveMaskOption,
    SrcOption,
    VaeOption,
    VerboseOption,
    from_flags,
    in_panel_order,
    parameter,
    setting_parameter,
)
from ddsedit.errors import InputError
from ddsedit.methods import MASK_NONE, MASK_REQUIRED, Method, all_methods
from ddsedit.settings import (
    INPUT_PANEL,
    MASK_PANEL,
    SPEED_PANEL,
    EditConfig,
    declared,
    declared_by_name,
    shown_default,
)

# Settings of EditConfig whose option is declared here by hand (the CLI's default differs, or it is a mask's).
_MASK_SETTINGS = ("paste_back", "feather")


def _fixed_parameters(method: Method) -> list[inspect.Parameter]:
    """The options every edit command has that are not edit settings, in the order --help lists them."""
    output_help = ("Output file: .png, .jpg/.jpeg or .webp (the parameters go in its metadata), or a folder. "
                   "Default: ./<source stem>.<method>.png")  # fmt: skip
    start_help = ("Start from this image instead of --src (e.g. an earlier result, to run more steps); same size as "
                  "--src, which stays the image the edit compares against.")  # fmt: skip
    panel = INPUT_PANEL
    noise_models = method.gradient is not None
    parameters = [
        parameter("src", SrcOption, inspect.Parameter.empty),
        parameter("query", QueryOption, inspect.Parameter.empty),
        parameter("ref", RefOption, inspect.Parameter.empty if method.needs_ref else ""),
        parameter("output", Annotated[Path | None, typer.Option(
            "-o", "--output", help=output_help, show_default=False, rich_help_panel=panel)]),
        parameter("start", Annotated[Path | None, typer.Option(
            "--start", help=start_help, show_default=False, rich_help_panel=panel)]),
        parameter("frames", Annotated[Path | None, typer.Option(
            "--frames", help="Folder for the intermediate frames (PNG).", show_default=False, rich_help_panel=panel)]),
        parameter("animation", Annotated[Path | None, typer.Option(
            "--animation", help="Write an animated GIF of the optimisation.", show_default=False,
            rich_help_panel=panel)]),
        parameter("overwrite", OverwriteOption, False),
        parameter("quiet", QuietOption, False),
        parameter("verbose", VerboseOption, False),
        parameter("model", ModelOption),
        parameter("vae", VaeOption),
        parameter("device", DeviceOption, "auto"),
        parameter("dtype", DtypeOption, "auto"),
        parameter("allow_pickle", AllowPickleOption, False),
        parameter("prediction_type", PredictionTypeOption),
        parameter("cpu_offload", Annotated[bool, typer.Option(
            "--cpu-offload", help="Keep weights in CPU memory, on the GPU only while used.",
            rich_help_panel=SPEED_PANEL)], False),
        parameter("compile_unet", Annotated[bool, typer.Option(
            "--compile", help="torch.compile the UNet: slower start, faster steps on a GPU.",
            rich_help_panel=SPEED_PANEL)], False),
    ]  # fmt: skip
    # A method of flow models only (FlowEdit) starts from the source, and flow models predict a velocity.
    unused = set() if noise_models else {"prediction_type", *(() if method.velocity is not None else ("start",))}
    return [item for item in parameters if item.name not in unused]


def _mask_parameters(method: Method) -> list[inspect.Parameter]:
    from ddsedit.automask import AutoMaskSettings

    required = method.mask == MASK_REQUIRED
    parameters = [parameter("mask", MaskOption, inspect.Parameter.empty if required else None)]
    parameters += [setting_parameter(item) for item in declared(AutoMaskSettings)]
    parameters.append(parameter("save_mask", SaveMaskOption))
    return parameters


def default_text(method: Method, name: str) -> str:
    """A setting's default as ``method``'s help shows it: the method's own (pds: t from 1), then the families'
    that differ (``200; SD3 50, Flux 28``); a method of rectified-flow models only shows theirs alone."""
    plain = None if not set(method.families) & {"sd", "sdxl"} else method.default_config()
    shown = [] if plain is None else [shown_default(getattr(plain, name))]
    by_family = [
        f"{family.upper() if family.startswith('sd') else family.capitalize()} "
        f"{shown_default(getattr(method.default_config(family), name))}"
        for family in method.family_defaults if name in method.family_defaults[family]
    ]  # fmt: skip
    return "; ".join(filter(None, [", ".join(shown), ", ".join(by_family)])) or shown_default(
        getattr(method.default_config(method.families[0]), name)
    )


def command_parameters(method: Method) -> list[inspect.Parameter]:
    """Every option of ``method``'s command, derived from its declaration."""
    parameters = _fixed_parameters(method)
    shared = [item for item in declared(EditConfig) if item.name not in _MASK_SETTINGS and method.takes(item)]
    parameters += [setting_parameter(item, default_text=default_text(method, item.name)) for item in shared]
    parameters += [setting_parameter(item, default_text=default_text(method, item.name))
                   for item in declared(method.options)]  # fmt: skip
    if method.mask != MASK_NONE:
        parameters += _mask_parameters(method)
        parameters += [setting_parameter(declared_by_name(EditConfig)[name]) for name in _MASK_SETTINGS]
    if method.graphable:
        parameters.append(parameter("cuda_graph", CudaGraphOption, False))
    return in_panel_order(parameters)


def register_edit_commands(app: typer.Typer) -> None:
    """One command per registered method."""
    for method in all_methods():
        _register(app, method)


def _register(app: typer.Typer, method: Method) -> None:
    def command(**options: Any) -> None:
        with one_line_errors(options.get("verbose", False)):
            run_edit(method, **options)

    command.__signature__ = inspect.Signature(command_parameters(method))  # type: ignore[attr-defined]
    command.__doc__ = method.summary + " Defaults: the method's, under the model's ddsedit.json."
    app.command(method.name, no_args_is_help=True, help=command.__doc__, short_help=method.summary)(command)


def run_edit(method: Method, **options: Any) -> None:
    """Check everything cheap, load the model, edit, and write the output atomically."""
    from ddsedit import imageio
    from ddsedit.checks import check_prediction_type, check_prompts
    from ddsedit.settings import resolve_config

    src, query, ref = options.pop("src"), options.pop("query"), options.pop("ref", "")
    mask, save_mask = options.pop("mask", None), options.pop("save_mask", None)
    output, start, frames, animation = (options.pop(name, None) for name in ("output", "start", "frames", "animation"))
    quiet, verbose, overwrite = options.pop("quiet"), options.pop("verbose"), options.pop("overwrite")
    check_prompts(method.name, query, ref)
    check_prediction_type(options.get("prediction_type"))
    mask_flags = {name: options.pop(name, None) for name in ("strength", "noises", "threshold", "grow")}
    auto_mask = auto_mask_settings(mask, ref, query, mask_flags)
    items = {**declared_by_name(EditConfig), **declared_by_name(method.options)}
    given = from_flags(items, {name: options.pop(name) for name in list(options) if name in items})
    if "save_every" in given and frames is None and animation is None:
        raise InputError("--save-every needs --frames DIR or --animation FILE.gif")
    refuse_idle_flags(method, given, resolve_config(method, {}, given), mask is not None, model_known=False)
    if method.name != "sds" and ref.strip() == query.strip() and not quiet:
        stderr.print("warning: --ref and --query are the same: the edit will barely change the image", markup=False)

    source = imageio.load_image(src)
    if method.mask == MASK_REQUIRED and mask is None:
        raise InputError(f"{method.name} needs --mask (white = editable)")
    if mask is not None and auto_mask is None:
        imageio.load_mask(mask, source.size)
    if start is not None:
        imageio.check_start_size(imageio.load_image(start, "start image"), source)
    if output is not None and output.is_dir():
        output = imageio.default_output_path(src, method.name, directory=output)
    output_path = imageio.check_output_suffix(output or imageio.default_output_path(src, method.name), "-o")
    imageio.check_output_path(output_path, overwrite)
    check_save_mask(save_mask, mask, output_path, overwrite)
    if animation is not None:
        if animation.suffix.lower() != ".gif":
            raise InputError(f"--animation must name a .gif file, got {animation}")
        imageio.check_output_path(animation, overwrite)
    frame_prefix = f"{src.stem}.{method.name}."
    if frames is not None:
        if frames.exists() and not frames.is_dir():
            raise InputError(f"--frames must be a folder: {frames}")
        existing = sorted(frames.glob(f"{frame_prefix}*.png")) if frames.is_dir() else []
        if existing and not overwrite:
            raise InputError(f"frames exist in {frames}: {existing[0].name} ... (use --overwrite to replace them)")

    from ddsedit.loading import quiet_third_party_output

    quiet_third_party_output(verbose)
    from ddsedit.editor import Editor, save_result

    with stderr.status("loading model...", spinner="dots") if not quiet else contextlib.nullcontext():
        editor = Editor.from_pretrained(
            options["model"], device=options["device"], dtype=options["dtype"], allow_pickle=options["allow_pickle"],
            prediction_type=options.get("prediction_type"), keep_text_encoder=False, cpu_offload=options["cpu_offload"],
            compile_unet=options["compile_unet"], cuda_graph=options.get("cuda_graph", False), vae=options["vae"],
        )  # fmt: skip
    config = editor.config(method.name, **given)
    refuse_idle_flags(method, given, config, mask is not None, model_known=True,
                      family=editor.family)  # with the model's defaults  # fmt: skip
    if (frames is not None or animation is not None) and "save_every" not in given:
        config = config.replace(save_every=max(1, config.steps // 25))  # the model's steps, not the paper's
    if frames is not None:
        frames.mkdir(parents=True, exist_ok=True)
    with _progress(quiet, method.name) as on_progress:
        result = editor.edit(src, method.name, query=query, ref=ref, mask=auto_mask or mask, config=config,
                             on_progress=on_progress, start=start)  # fmt: skip
    if result.nonfinite_steps:
        stderr.print(
            f"warning: the model returned NaN or infinite values in {result.nonfinite_steps} of "
            f"{config.steps} steps; those gradient elements were treated as 0",
            markup=False,
        )
    if frames is not None:
        for step, frame in result.frames:
            imageio.save_image(frame, frames / f"{frame_prefix}{step:04d}.png", {}, overwrite=overwrite)
    if animation is not None:
        imageio.save_gif([frame for _, frame in result.frames], animation, overwrite=overwrite)
    written = save_result(result, output_path, overwrite=overwrite)
    if save_mask is not None and result.mask is not None:
        imageio.save_image(result.mask, save_mask, mask_metadata(result.parameters), overwrite=overwrite)
        if not quiet:
            stderr.print(f"mask: {save_mask}", markup=False)
    typer.echo(str(written))


def refuse_idle_flags(method: Method, given: dict[str, Any], config: EditConfig, masked: bool,
                      model_known: bool, family: Any = None) -> None:  # fmt: skip
    """Refuse, in one line, a flag that cannot act: a mask setting without a mask, a setting whose declared ``needs``
    is off, a setting of the other kind of model than ``family``'s (``--eta`` on SD, ``--t-min`` on SD3), settings
    the method cannot run with (its declaration's check). Before the model loads (``model_known`` False),
    ``config`` holds only the flags, and a check that reads a setting not given waits until the model's defaults
    are in."""
    from ddsedit.settings import misapplied

    items = {**declared_by_name(EditConfig), **declared_by_name(method.options)}
    for name in given:
        item = items[name]
        if family is not None and (problem := misapplied(item, family)):
            raise InputError(problem)
        if item.info.panel == MASK_PANEL and not masked:
            flag = ("--paste-back" if given[name] else "--no-paste-back") if name == "paste_back" else item.flag
            raise InputError(f"{flag} acts only on a masked edit: it needs --mask")
        needed = item.info.needs
        holder = config.options if needed in declared_by_name(method.options) else config
        if needed is not None and (model_known or needed in given) and not getattr(holder, needed):
            needed_flag = items[needed].flag if needed != "paste_back" else "--paste-back"
            state = "--no-paste-back" if needed == "paste_back" else f"{needed_flag} {getattr(holder, needed)}"
            raise InputError(f"{item.flag} cannot act with {state}: it needs {needed_flag} on")
    config.validate()
    problem = method.problem(config, given=None if model_known else set(given))
    if problem:
        raise InputError(problem)


def auto_mask_settings(mask: str | None, ref: str, query: str, flags: dict[str, Any]):
    """The checked settings of ``--mask auto`` (an AutoMaskSettings), or None for a mask file (or none).

    The --mask-* flags need --mask auto, and the prompts must differ: otherwise no mask can be drawn.
    """
    from ddsedit.automask import AUTO_MASK, SAME_PROMPTS_MESSAGE, AutoMaskSettings

    if mask != AUTO_MASK:
        given = [f"--mask-{name}" for name, value in flags.items() if value is not None]
        if given:
            raise InputError(f"{given[0]} sets the automatic mask: it needs --mask auto")
        return None
    settings = AutoMaskSettings().replace(**flags)
    settings.validate()
    if ref.strip() == query.strip():
        raise InputError(SAME_PROMPTS_MESSAGE)
    return settings


def check_save_mask(save_mask: Path | None, mask: str | None, output_path: Path, overwrite: bool) -> None:
    """``--save-mask``: a mask to save, a format ddsedit writes, not the edit's own output, writable."""
    from ddsedit import imageio

    if save_mask is None:
        return
    if mask is None:
        raise InputError("--save-mask needs --mask (a file, or auto)")
    imageio.check_output_suffix(save_mask, "--save-mask")
    if save_mask.resolve() == output_path.resolve():
        raise InputError(f"--save-mask and -o name the same file: {save_mask}")
    imageio.check_output_path(save_mask, overwrite)


def mask_metadata(parameters: dict) -> dict[str, str]:
    """Text for a saved mask: how it was drawn (an automatic mask's settings) and for which edit."""
    import json

    keys = ("ref", "query", "mask", "mask_strength", "mask_noises", "mask_threshold", "mask_grow", "mask_seed",
            "working_size", "model", "model_family", "vae", "prediction_type", "source_sha256", "mask_sha256",
            "ddsedit_version")  # fmt: skip
    recorded = {key: parameters[key] for key in keys if key in parameters}
    return {**{key: str(value) for key, value in recorded.items()}, "ddsedit": json.dumps(recorded, sort_keys=True)}


class _progress:
    """A rich progress bar on stderr (step, it/s, ETA), or nothing when quiet."""

    def __init__(self, quiet: bool, method: str) -> None:
        self.quiet = quiet
        self.method = method
        self.bar = None

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn(f"{self.method}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=stderr, transient=False,
        )  # fmt: skip
        self.bar.__enter__()
        task = self.bar.add_task(self.method, total=None, rate="")

        def on_progress(step: int, steps: int) -> None:
            speed = self.bar.tasks[0].speed
            self.bar.update(task, completed=step, total=steps, rate=f"{speed:.1f} it/s" if speed else "")

        return on_progress

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)
