"""The ``ddsedit`` command line: a thin layer over :class:`ddsedit.editor.Editor`.

stdout carries only the output path (for shell scripts); progress, warnings and errors
go to stderr. Exit codes: 0 done, 1 runtime failure, 2 bad input, 130 interrupted.
torch, diffusers and transformers are imported only when an edit runs, so ``--help``
and ``--version`` answer at once.
"""

import contextlib
import inspect
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ddsedit import __version__
from ddsedit.errors import DDSEditError, InputError
from ddsedit.names import MASKED_METHOD, METHODS

app = typer.Typer(
    name="ddsedit",
    help="Edit images with text through score distillation (SDS, DDS, masked DDS, CDS, PDS, IDS) on Stable Diffusion.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# soft_wrap: without a terminal rich would hard-wrap at 80 columns, splitting messages mid-word.
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

METHOD_HELP = {
    "sds": "SDS edit: pull the image toward --query (no --ref needed; tends to lose detail).",
    "dds": "DDS edit: change what --ref describes into what --query describes, keeping the rest.",
    "masked-dds": "DDS confined to --mask (white = editable); outside it the source pixels are kept.",
    "cds": "CDS edit (Nam et al. 2024): DDS plus a contrastive term on the UNet's self-attention features "
    "that keeps the source's structure patch by patch. --mask optional.",
    "pds": "PDS edit (Koo et al. 2024): match the target's posterior samples to the source's. --mask optional.",
    "ids": "IDS edit (Kim et al. 2025): DDS whose source branch is first corrected to predict the source "
    "again. --mask optional.",
}
# The options each method does not take (beyond DDS's own set).
METHOD_OPTIONS = ("dds_weight", "cut_weight", "cut_patches", "cut_patch_sizes", "cut_temperature", "pds_grid",
                  "identity_steps", "identity_weight")  # fmt: skip

# Options that the edit commands and `batch` share, declared once so that their help stays the same.
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Bundled name (shapes), diffusers folder, .safetensors file or hub id. "
        "Default: $DDSEDIT_MODEL or stable-diffusion-v1-5/stable-diffusion-v1-5.",
        show_default=False,
    ),
]
DtypeOption = Annotated[str, typer.Option("--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp16, bf16 or fp32.")]
StepsOption = Annotated[
    int | None,
    typer.Option("--steps", "--iterations", help="Optimisation steps [default: 200].", show_default=False),
]
GuidanceOption = Annotated[
    float | None,
    typer.Option("--guidance", help="Classifier-free guidance scale [default: 7.5].", show_default=False),
]
LrOption = Annotated[
    float | None,
    typer.Option(
        "--lr",
        help="SGD learning rate: a step moves the latents by lr * 2000/4096 * gradient [default: 0.1].",
        show_default=False,
    ),
]
TMinOption = Annotated[
    int | None, typer.Option("--t-min", help="Lowest timestep drawn [default: 50].", show_default=False)
]
TMaxOption = Annotated[
    int | None, typer.Option("--t-max", help="Timesteps are drawn below this [default: 950].", show_default=False)
]
SizeOption = Annotated[
    int | None,
    typer.Option(
        "--size", help="Longest side of the working image [default: 512, or the model's].", show_default=False
    ),
]
AllowPickleOption = Annotated[
    bool, typer.Option("--allow-pickle", help="Allow .ckpt/.pt pickle checkpoints (they can run code).")
]
PredictionTypeOption = Annotated[
    str | None,
    typer.Option("--prediction-type", help="Override the model's: epsilon or v_prediction.", show_default=False),
]
# The options of the methods beyond DDS that the edit commands, batch and eval-shapes share.
DdsWeightOption = Annotated[
    float | None,
    typer.Option("--dds-weight", help="cds, ids: weight of the DDS gradient [default: 1].", show_default=False),
]
CutPatchesOption = Annotated[
    int | None,
    typer.Option(
        "--cut-patches", help="cds, ids: positions drawn per layer and patch size [default: 256].", show_default=False
    ),
]
CutPatchSizesOption = Annotated[
    str | None,
    typer.Option("--cut-patch-sizes", help="cds, ids: comma-separated patch sizes [default: 1,2].",
                 show_default=False),
]
CutTemperatureOption = Annotated[
    float | None,
    typer.Option("--cut-temperature", help="cds, ids: PatchNCE temperature [default: 0.07].", show_default=False),
]
CutWeightOption = Annotated[
    float | None,
    typer.Option(
        "--cut-weight",
        help="cds, ids: weight of the contrastive (CUT) term [default: the model's; else cds 3, ids 0 (off)].",
        show_default=False,
    ),
]
PdsGridOption = Annotated[
    int | None,
    typer.Option("--pds-grid", help="pds: steps of the DDIM grid t and t_prev come from [default: 50].",
                 show_default=False),
]
IdentityStepsOption = Annotated[
    int | None,
    typer.Option("--identity-steps", help="ids: corrections of the source branch per step [default: 3].",
                 show_default=False),
]
IdentityWeightOption = Annotated[
    float | None,
    typer.Option("--identity-weight", help="ids: step size of each correction [default: 1].", show_default=False),
]
CudaGraphOption = Annotated[
    bool, typer.Option("--cuda-graph", help="Record one step as a CUDA graph and replay it (CUDA only).")
]
# The automatic mask's settings (--mask auto, `ddsedit mask`, batch rows whose mask is auto, eval-shapes).
MaskStrengthOption = Annotated[
    float | None,
    typer.Option(
        "--mask-strength",
        help="Automatic mask: how far the source is noised, as a fraction of a 50-step DDIM grid [default: 0.5].",
        show_default=False,
    ),
]
MaskNoisesOption = Annotated[
    int | None,
    typer.Option("--mask-noises", help="Automatic mask: noise draws averaged [default: 10].", show_default=False),
]
MaskThresholdOption = Annotated[
    float | None,
    typer.Option(
        "--mask-threshold",
        help="Automatic mask: editable where the prediction difference exceeds this times its mean [default: 1.5].",
        show_default=False,
    ),
]
MaskGrowOption = Annotated[
    int | None,
    typer.Option(
        "--mask-grow", help="Automatic mask: pixels to grow it by, at the source's size [default: 2].",
        show_default=False,
    ),
]  # fmt: skip
# What eval-shapes --methods may name: ddsedit.shapes.evaluate.RUNS, without importing torch.
EVAL_RUNS = (*METHODS, f"{MASKED_METHOD}-auto")
# Parameters of the edit template that only make sense with --mask (left out with it).
MASK_ONLY_PARAMETERS = ("mask_strength", "mask_noises", "mask_threshold", "mask_grow", "save_mask")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ddsedit {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Edit images with text: ddsedit dds --src photo.png --ref "what it shows" --query "what it should"."""


def _fail(error: BaseException, verbose: bool) -> typer.Exit:
    """Print one line for ``error`` on stderr and return the Exit to raise."""
    if isinstance(error, DDSEditError):
        stderr.print(f"[bold red]error:[/] {error}", markup=True, soft_wrap=True)
        return typer.Exit(error.exit_code)
    if verbose:
        stderr.print_exception()
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    stderr.print(
        f"[bold red]error:[/] {type(error).__name__}: {first_line} (run with --verbose for details)",
        markup=True,
        soft_wrap=True,
    )
    return typer.Exit(1)


def _edit_template(
    src: Annotated[Path, typer.Option("--src", help="Source image to edit.", show_default=False)],
    query: Annotated[
        str, typer.Option("--query", help="What the edited image should show.", show_default=False)
    ],
    ref: Annotated[str, typer.Option("--ref", help="What the source image shows.", show_default=False)] = "",
    mask: Annotated[
        str | None,
        typer.Option(
            "--mask",
            help="Mask image: white = editable, black = kept; or auto: drawn from --ref and --query (DiffEdit).",
            show_default=False,
        ),
    ] = None,
    mask_strength: MaskStrengthOption = None,
    mask_noises: MaskNoisesOption = None,
    mask_threshold: MaskThresholdOption = None,
    mask_grow: MaskGrowOption = None,
    save_mask: Annotated[
        Path | None,
        typer.Option("--save-mask", help="Also write the mask the edit used (e.g. --mask auto's).", show_default=False),
    ] = None,
    start: Annotated[
        Path | None,
        typer.Option(
            "--start",
            help="Start from this image instead of --src (e.g. an earlier result, to run more steps); "
            "same size as --src, which stays the image the edit compares against.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Output file: .png, .jpg/.jpeg or .webp (the parameters go in its metadata), or a folder. "
            "Default: ./<source stem>.<method>.png",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: DtypeOption = "auto",
    steps: StepsOption = None,
    guidance: GuidanceOption = None,
    lr: LrOption = None,
    t_min: TMinOption = None,
    t_max: TMaxOption = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Seed: same seed, same result. Default: random, recorded in the PNG.",
            show_default=False,
        ),
    ] = None,
    negative: Annotated[
        str | None,
        typer.Option(
            "--negative",
            help="Negative prompt (replaces the empty unconditional prompt).",
            show_default=False,
        ),
    ] = None,
    size: SizeOption = None,
    keep_working_size: Annotated[
        bool,
        typer.Option("--keep-working-size", help="Write the result at the working size, not the source's."),
    ] = False,
    paste_back: Annotated[
        bool, typer.Option("--paste-back/--no-paste-back", help="Keep the source's pixels outside the mask.")
    ] = True,
    feather: Annotated[
        float | None,
        typer.Option(
            "--feather", help="Seam blend width in pixels, inside the mask [default: 2].", show_default=False
        ),
    ] = None,
    dds_weight: DdsWeightOption = None,
    cut_weight: CutWeightOption = None,
    cut_patches: CutPatchesOption = None,
    cut_patch_sizes: CutPatchSizesOption = None,
    cut_temperature: CutTemperatureOption = None,
    pds_grid: PdsGridOption = None,
    identity_steps: IdentityStepsOption = None,
    identity_weight: IdentityWeightOption = None,
    save_every: Annotated[
        int | None,
        typer.Option(
            "--save-every",
            help="Keep a decoded frame every N steps [default: steps / 25].",
            show_default=False,
        ),
    ] = None,
    frames: Annotated[
        Path | None,
        typer.Option("--frames", help="Folder for the intermediate frames (PNG).", show_default=False),
    ] = None,
    animation: Annotated[
        Path | None,
        typer.Option("--animation", help="Write an animated GIF of the optimisation.", show_default=False),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
    allow_pickle: AllowPickleOption = False,
    prediction_type: PredictionTypeOption = None,
    cpu_offload: Annotated[
        bool, typer.Option("--cpu-offload", help="Keep weights in CPU memory, on the GPU only while used.")
    ] = False,
    compile_unet: Annotated[
        bool, typer.Option("--compile", help="torch.compile the UNet: slower start, faster steps on a GPU.")
    ] = False,
    cuda_graph: CudaGraphOption = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or notes; errors only.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show library warnings, loading bars and tracebacks.")
    ] = False,
) -> None:
    """Template whose signature each edit command shares (minus the options it does not take)."""


def run_edit(method: str, **options) -> None:
    """Validate everything cheap, load the model, edit, and write the output atomically."""
    verbose = options["verbose"]
    try:
        _run_edit(method, **options)
    except KeyboardInterrupt:
        stderr.print("interrupted: no output written")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as error:  # noqa: BLE001 - the CLI's contract is one line, never a traceback
        raise _fail(error, verbose) from None


def _run_edit(
    method: str, *, src: Path, query: str, ref: str = "", mask: str | None = None,
    mask_strength: float | None = None, mask_noises: int | None = None, mask_threshold: float | None = None,
    mask_grow: int | None = None, save_mask: Path | None = None,
    start: Path | None = None, output: Path | None = None,
    model: str | None, device: str, dtype: str, steps: int | None, guidance: float | None, lr: float | None,
    t_min: int | None, t_max: int | None, seed: int | None, negative: str | None, size: int | None,
    keep_working_size: bool, paste_back: bool = True, feather: float | None = None, save_every: int | None,
    frames: Path | None, animation: Path | None, overwrite: bool, allow_pickle: bool,
    prediction_type: str | None, cpu_offload: bool, compile_unet: bool, cuda_graph: bool, quiet: bool,
    verbose: bool, **method_options: object,
) -> None:  # fmt: skip
    # Every cheap check first (prompts, numbers, files, output names), before torch is imported.
    from ddsedit import imageio
    from ddsedit.checks import check_prediction_type, check_prompts
    from ddsedit.names import MASK_OPTIONAL_METHODS, MASKED_METHOD
    from ddsedit.settings import resolve_config

    check_prompts(method, query, ref)
    check_prediction_type(prediction_type)
    if save_every is not None and frames is None and animation is None:
        raise InputError("--save-every needs --frames DIR or --animation FILE.gif")
    auto_mask = _auto_mask_settings(mask, ref, query, mask_strength, mask_noises, mask_threshold, mask_grow)
    if method != "sds" and ref.strip() == query.strip() and not quiet:
        stderr.print("[yellow]warning:[/] --ref and --query are the same: the edit will barely change the image")
    overrides = dict(
        steps=steps, guidance=guidance, lr=lr, t_min=t_min, t_max=t_max, seed=seed, negative=negative,
        size=size, feather=feather, keep_working_size=keep_working_size, paste_back=paste_back,
        save_every=save_every, **_method_overrides(method_options),
    )  # fmt: skip
    resolve_config(method, {}, overrides).validate_for(method)  # the flags, before the slow model load

    imageio.load_image(src)
    if method == MASKED_METHOD and mask is None:
        raise InputError("masked-dds needs --mask (white = editable)")
    if mask is not None and method in (MASKED_METHOD, *MASK_OPTIONAL_METHODS) and auto_mask is None:
        imageio.load_mask(mask, imageio.load_image(src).size)
    if start is not None:
        imageio.check_start_size(imageio.load_image(start, "start image"), imageio.load_image(src))
    if output is not None and output.is_dir():
        output = imageio.default_output_path(src, method, directory=output)
    output_path = imageio.check_output_suffix(output or imageio.default_output_path(src, method), "-o")
    imageio.check_output_path(output_path, overwrite)
    _check_save_mask(save_mask, mask, output_path, overwrite)
    if animation is not None:
        if animation.suffix.lower() != ".gif":
            raise InputError(f"--animation must name a .gif file, got {animation}")
        imageio.check_output_path(animation, overwrite)
    frame_prefix = f"{src.stem}.{method}."
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
            model, device=device, dtype=dtype, allow_pickle=allow_pickle,
            prediction_type=prediction_type, keep_text_encoder=False, cpu_offload=cpu_offload,
            compile_unet=compile_unet, cuda_graph=cuda_graph,
        )  # fmt: skip
    config = editor.config(method, **overrides)
    if (frames is not None or animation is not None) and save_every is None:
        config = config.replace(save_every=max(1, config.steps // 25))  # the model's steps, not the paper's
    if frames is not None:
        frames.mkdir(parents=True, exist_ok=True)
    with _progress(quiet, method) as on_progress:
        result = editor.edit(src, method, query=query, ref=ref, mask=auto_mask or mask, config=config,
                             on_progress=on_progress, start=start)  # fmt: skip
    if result.nonfinite_steps:
        stderr.print(
            f"[yellow]warning:[/] the model returned NaN or infinite values in {result.nonfinite_steps} of "
            f"{config.steps} steps; those gradient elements were treated as 0",
            markup=True,
        )
    if frames is not None:
        for step, frame in result.frames:
            imageio.save_image(frame, frames / f"{frame_prefix}{step:04d}.png", {}, overwrite=overwrite)
    if animation is not None:
        imageio.save_gif([frame for _, frame in result.frames], animation, overwrite=overwrite)
    written = save_result(result, output_path, overwrite=overwrite)
    if save_mask is not None and result.mask is not None:
        imageio.save_image(result.mask, save_mask, _mask_metadata(result.parameters), overwrite=overwrite)
        if not quiet:
            stderr.print(f"mask: {save_mask}", markup=False)
    typer.echo(str(written))


def _auto_mask_settings(
    mask: str | None, ref: str, query: str, strength: float | None, noises: int | None, threshold: float | None,
    grow: int | None,
):  # fmt: skip
    """The checked settings of ``--mask auto`` (an AutoMaskSettings), or None for a mask file.

    The --mask-* flags need --mask auto, and the prompts must differ: otherwise no mask can be drawn.
    """
    from ddsedit.automask import AUTO_MASK, SAME_PROMPTS_MESSAGE, AutoMaskSettings

    flags = {"--mask-strength": strength, "--mask-noises": noises, "--mask-threshold": threshold, "--mask-grow": grow}
    if mask != AUTO_MASK:
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise InputError(f"{given[0]} sets the automatic mask: it needs --mask auto")
        return None
    settings = AutoMaskSettings().replace(strength=strength, noises=noises, threshold=threshold, grow=grow)
    settings.validate()
    if ref.strip() == query.strip():
        raise InputError(SAME_PROMPTS_MESSAGE)
    return settings


def _check_save_mask(save_mask: Path | None, mask: str | None, output_path: Path, overwrite: bool) -> None:
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


def _mask_metadata(parameters: dict) -> dict[str, str]:
    """Text for a saved mask: how it was drawn (an automatic mask's settings) and for which edit."""
    import json

    keys = ("ref", "query", "mask", "mask_strength", "mask_noises", "mask_threshold", "mask_grow", "mask_seed",
            "working_size", "model", "prediction_type", "source_sha256", "mask_sha256", "ddsedit_version")  # fmt: skip
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


def _register(method: str, without: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    """Add an edit command whose options are the template's minus ``without``; ``required`` lose their default."""

    def command(**options) -> None:
        run_edit(method, **options)

    template = inspect.signature(_edit_template)
    if "mask" in without:
        without = (*without, *MASK_ONLY_PARAMETERS)  # a command without --mask has no mask to draw or save
    command.__signature__ = template.replace(  # type: ignore[attr-defined]
        parameters=[
            p.replace(default=inspect.Parameter.empty) if p.name in required else p
            for p in template.parameters.values()
            if p.name not in without
        ]
    )
    command.__doc__ = METHOD_HELP[method]
    app.command(method, no_args_is_help=True)(command)


_CUT_OPTIONS = ("dds_weight", "cut_weight", "cut_patches", "cut_patch_sizes", "cut_temperature")
_register("sds", without=("ref", "mask", "paste_back", "feather", *METHOD_OPTIONS))
_register("dds", without=("mask", "paste_back", "feather", *METHOD_OPTIONS), required=("ref",))
_register("masked-dds", without=METHOD_OPTIONS, required=("ref", "mask"))
_register("cds", without=("pds_grid", "identity_steps", "identity_weight"), required=("ref",))
_register("pds", without=(*_CUT_OPTIONS, "identity_steps", "identity_weight"), required=("ref",))
_register("ids", without=("pds_grid",), required=("ref",))


def _method_overrides(options: dict[str, object]) -> dict[str, object]:
    """The method flags as EditConfig overrides (``--cut-patch-sizes 1,2`` -> (1, 2))."""
    overrides = dict(options)
    sizes = overrides.get("cut_patch_sizes")
    if isinstance(sizes, str):
        try:
            overrides["cut_patch_sizes"] = tuple(int(part) for part in sizes.split(",") if part.strip())
        except ValueError:
            raise InputError(f"--cut-patch-sizes must be comma-separated integers, got {sizes!r}") from None
    return overrides


@app.command("mask", no_args_is_help=True)
def mask_command(
    src: Annotated[Path, typer.Option("--src", help="Source image.", show_default=False)],
    ref: Annotated[str, typer.Option("--ref", help="What the source image shows.", show_default=False)],
    query: Annotated[str, typer.Option("--query", help="What the edited image should show.", show_default=False)],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Mask file (.png, .jpg/.jpeg or .webp). Default: ./<source stem>.mask.png",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: DtypeOption = "auto",
    size: SizeOption = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", help="Seed of the noise draws. Default: random, recorded in the PNG.", show_default=False
        ),
    ] = None,
    mask_strength: MaskStrengthOption = None,
    mask_noises: MaskNoisesOption = None,
    mask_threshold: MaskThresholdOption = None,
    mask_grow: MaskGrowOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing mask file.")] = False,
    allow_pickle: AllowPickleOption = False,
    prediction_type: PredictionTypeOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No notes; errors only.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show library warnings and tracebacks.")] = False,
) -> None:  # fmt: skip
    """Draw the mask of an edit from the prompts alone (DiffEdit): white where --ref and --query make the model's
    noise predictions differ, at the source's size. Pass it back to masked-dds with --mask FILE."""
    try:
        _run_mask(src, ref, query, output, model, device, dtype, size, seed,
                  dict(strength=mask_strength, noises=mask_noises, threshold=mask_threshold, grow=mask_grow),
                  overwrite, allow_pickle, prediction_type, quiet, verbose)  # fmt: skip
    except KeyboardInterrupt:
        stderr.print("interrupted: no output written")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as error:  # noqa: BLE001 - the CLI's contract is one line, never a traceback
        raise _fail(error, verbose) from None


def _run_mask(
    src: Path, ref: str, query: str, output: Path | None, model: str | None, device: str, dtype: str,
    size: int | None, seed: int | None, flags: dict, overwrite: bool, allow_pickle: bool,
    prediction_type: str | None, quiet: bool, verbose: bool,
) -> None:  # fmt: skip
    """``ddsedit mask``: every cheap check, then load the model, draw the mask and write it atomically."""
    import json
    import random

    from ddsedit import __version__, imageio
    from ddsedit.checks import check_prediction_type, check_prompts
    from ddsedit.names import MASKED_METHOD
    from ddsedit.settings import EditConfig

    check_prompts(MASKED_METHOD, query, ref)
    check_prediction_type(prediction_type)
    settings = _auto_mask_settings("auto", ref, query, **flags)
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
            keep_text_encoder=False,
        )  # fmt: skip
    longest_side = editor.config(size=size).size
    mask = editor.auto_mask(source, ref=ref, query=query, settings=settings, size=longest_side)
    recorded = {
        "ref": ref, "query": query, **settings.recorded(), "size": longest_side,
        "model": editor.components.identity or editor.components.source,
        "prediction_type": editor.components.prediction_type, "source_sha256": imageio.file_sha256(src),
        "ddsedit_version": __version__,
    }  # fmt: skip
    metadata = {**{key: str(value) for key, value in recorded.items()}, "ddsedit": json.dumps(recorded, sort_keys=True)}
    written = imageio.save_image(mask, output_path, metadata, overwrite=overwrite)
    typer.echo(str(written))


@app.command("models")
def models_command() -> None:
    """List the bundled models and the default model."""
    from ddsedit.loading import MODEL_ENVIRONMENT_VARIABLE, bundled_models, default_model

    bundled = bundled_models()
    if not bundled:
        typer.echo("no bundled models installed")
    for name, folder in bundled.items():
        typer.echo(f"{name}\t{folder}")
    stderr.print(f"default model: {default_model()} (set ${MODEL_ENVIRONMENT_VARIABLE} to change it)")


@app.command("eval-shapes")
def eval_shapes_command(
    model: Annotated[str, typer.Option("--model", help="Model to evaluate (a shapes-world model).")] = "shapes",
    cases: Annotated[
        int,
        typer.Option(
            "--cases",
            help="Recolour cases (half white, half black). Each runs every method and the held DDS run: "
            "40 cases take about 1.5 hours on 2 CPU cores (ids's step is 6-8x DDS's); --methods dds about 6 minutes.",
        ),
    ] = 40,
    swaps: Annotated[int, typer.Option("--swaps", help="Background swaps and shape swaps, each.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the cases and of the edits.")] = 0,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Steps per edit [default: the model's].", show_default=False)
    ] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="Guidance scale [default: the model's].", show_default=False)
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate [default: the model's].", show_default=False)
    ] = None,
    t_min: Annotated[
        int | None, typer.Option("--t-min", help="Lowest timestep drawn [default: the model's].", show_default=False)
    ] = None,
    t_max: Annotated[
        int | None,
        typer.Option("--t-max", help="Timesteps are drawn below this [default: the model's].", show_default=False),
    ] = None,
    dds_weight: DdsWeightOption = None,
    cut_weight: CutWeightOption = None,
    cut_patches: CutPatchesOption = None,
    cut_patch_sizes: CutPatchSizesOption = None,
    cut_temperature: CutTemperatureOption = None,
    pds_grid: PdsGridOption = None,
    identity_steps: IdentityStepsOption = None,
    identity_weight: IdentityWeightOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per UNet call.")] = 8,
    hold: Annotated[
        bool, typer.Option("--hold/--no-hold", help="Also run DDS from the right answer: what DDS can reach.")
    ] = True,
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help="Comma-separated methods to run on the recolour cases (masked-dds-auto: masked DDS with --mask auto, "
            "whose masks are scored too): a subset screens a model faster.",
        ),
    ] = ",".join(EVAL_RUNS),
    mask_strength: MaskStrengthOption = None,
    mask_noises: MaskNoisesOption = None,
    mask_threshold: MaskThresholdOption = None,
    mask_grow: MaskGrowOption = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where report.json and grid.png go.")] = Path(
        "shapes-eval"
    ),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a report.json and grid.png already in --out-dir.")
    ] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp16, bf16 or fp32.")] = (
        "auto"
    ),
) -> None:
    """Measure the edit methods on fresh shapes-world cases whose right answers are known; print the table.

    stdout: the table (markdown); stderr: progress (a bar in a terminal, else a line per batch).
    """
    from ddsedit.automask import AutoMaskSettings

    try:
        if cases < 2 or swaps < 0 or batch_size < 1:
            raise InputError("--cases must be >= 2, --swaps >= 0 and --batch-size >= 1")
        chosen = tuple(dict.fromkeys(m.strip() for m in methods.split(",") if m.strip()))
        if not chosen or any(m not in EVAL_RUNS for m in chosen):
            raise InputError(f"--methods must be some of {', '.join(EVAL_RUNS)} (comma-separated), got {methods!r}")
        mask_settings = AutoMaskSettings().replace(
            strength=mask_strength, noises=mask_noises, threshold=mask_threshold, grow=mask_grow
        )
        mask_settings.validate()
        existing = [out_dir / name for name in ("report.json", "grid.png") if (out_dir / name).exists()]
        if existing and not overwrite:
            raise InputError(f"{existing[0]} exists: pass --overwrite to replace it, or another --out-dir")
        from ddsedit.loading import quiet_third_party_output

        quiet_third_party_output()
        from ddsedit.editor import Editor
        from ddsedit.shapes.evaluate import edit_count, evaluate, format_report, write_report

        overrides = dict(
            steps=steps, guidance=guidance, lr=lr, t_min=t_min, t_max=t_max, **_method_overrides(dict(
                dds_weight=dds_weight, cut_weight=cut_weight, cut_patches=cut_patches, cut_patch_sizes=cut_patch_sizes,
                cut_temperature=cut_temperature, pds_grid=pds_grid, identity_steps=identity_steps,
                identity_weight=identity_weight,
            )),
        )  # fmt: skip
        editor = Editor.from_pretrained(model, device=device, dtype=dtype)
        config = editor.config("dds", **overrides)
        config.validate(editor.components.num_train_timesteps)
        total = edit_count(cases, swaps, hold, chosen)
        stderr.print(f"eval-shapes: {total} edits of {config.steps} steps on {editor.device.type}", markup=False)
        with _EvalProgress(total) as on_progress:
            report, picture = evaluate(editor, cases, seed, overrides, swaps=swaps, batch_size=batch_size,
                                       hold=hold, methods=chosen, on_progress=on_progress,
                                       mask_settings=mask_settings)  # fmt: skip
        json_path, grid_path = write_report(report, picture, out_dir, overwrite=overwrite)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        stderr.print("interrupted: no report written")
        raise typer.Exit(130) from None
    except Exception as error:  # noqa: BLE001
        raise _fail(error, verbose=False) from None
    typer.echo(format_report(report))
    stderr.print(f"wrote {json_path} and {grid_path}", markup=False)


class _EvalProgress:
    """eval-shapes progress on stderr: a bar in a terminal; without one, a line per batch with an estimate."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = 0.0
        self.bar = None

    def __enter__(self):
        import time

        self.started = time.monotonic()
        if stderr.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=stderr,
            )  # fmt: skip
            self.bar.__enter__()
            task = self.bar.add_task("edits", total=self.total)

        def on_progress(label: str, count: int) -> None:
            self.done += count
            if self.bar is not None:
                self.bar.update(task, completed=self.done, description=label)
                return
            elapsed = time.monotonic() - self.started
            left = elapsed / self.done * (self.total - self.done)
            stderr.print(
                f"eval-shapes: {self.done}/{self.total} edits ({label}), {elapsed:.0f} s, about {left:.0f} s left",
                markup=False,
            )

        return on_progress

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)


@app.command("make-tiny-model", no_args_is_help=True)
def make_tiny_model_command(
    folder: Annotated[Path, typer.Argument(help="Folder to write the model to.")],
    v_prediction: Annotated[
        bool, typer.Option("--v-prediction", help="Make it a v-prediction model.")
    ] = False,
) -> None:
    """Write a tiny RANDOM model (edits nothing meaningful) for smoke tests of the pipeline."""
    try:
        from ddsedit.loading import quiet_third_party_output

        quiet_third_party_output()
        from ddsedit.tiny import build_tiny_pipeline

        if folder.exists() and any(folder.iterdir()):
            raise InputError(f"{folder} exists and is not empty")
        build_tiny_pipeline(folder, prediction_type="v_prediction" if v_prediction else "epsilon")
    except typer.Exit:
        raise
    except Exception as error:  # noqa: BLE001
        raise _fail(error, verbose=False) from None
    typer.echo(str(folder))


@app.command("batch", no_args_is_help=True)
def batch_command(
    manifest: Annotated[
        Path,
        typer.Argument(
            help="JSONL or CSV manifest, one edit a row: src, query, and optionally ref, method, mask (a file, or "
            "auto), seed, steps, guidance, lr, out. Paths are relative to the manifest's folder.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out-dir", help="Folder for the outputs and results.jsonl.", show_default=False)
    ],
    model: ModelOption = None,
    device: Annotated[
        str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (several processes: each its own).")
    ] = "auto",
    dtype: DtypeOption = "auto",
    steps: StepsOption = None,
    guidance: GuidanceOption = None,
    lr: LrOption = None,
    t_min: TMinOption = None,
    t_max: TMaxOption = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Seed of rows without one. Default: a seed derived from the row, the same on every run.",
            show_default=False,
        ),
    ] = None,
    negative: Annotated[
        str | None, typer.Option("--negative", help="Negative prompt for every row.", show_default=False)
    ] = None,
    size: SizeOption = None,
    dds_weight: DdsWeightOption = None,
    cut_weight: CutWeightOption = None,
    cut_patches: CutPatchesOption = None,
    cut_patch_sizes: CutPatchSizesOption = None,
    cut_temperature: CutTemperatureOption = None,
    pds_grid: PdsGridOption = None,
    identity_steps: IdentityStepsOption = None,
    identity_weight: IdentityWeightOption = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Rows per UNet call (same method, settings and working size).")
    ] = 1,
    processes: Annotated[
        int,
        typer.Option(
            "--processes", help="Split the rows over N processes (one per GPU, or CPU processes) via accelerate."
        ),
    ] = 1,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Run the valid rows even if some rows are bad.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo rows whose output exists, replacing it.")
    ] = False,
    allow_pickle: AllowPickleOption = False,
    prediction_type: PredictionTypeOption = None,
    cuda_graph: CudaGraphOption = False,
    mask_strength: MaskStrengthOption = None,
    mask_noises: MaskNoisesOption = None,
    mask_threshold: MaskThresholdOption = None,
    mask_grow: MaskGrowOption = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars or summary; errors only.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show library warnings and tracebacks.")
    ] = False,
) -> None:
    """Edit every row of a manifest with one model load; rerun the same command to resume.

    --steps, --guidance and --lr apply to the rows that do not set their own; the method options
    (--cut-weight, --identity-steps, ...) to every row whose method reads them.

    stdout: the output path of every row done or already done. Exit codes: 0 all rows done,
    1 some row failed, or was bad and not run under --skip-invalid (each recorded in
    OUT_DIR/results.jsonl), 2 bad input (each bad row printed as MANIFEST:LINE: reason;
    nothing runs unless --skip-invalid, which runs the others and marks these "not run: invalid"),
    130 interrupted.
    """
    try:
        from ddsedit.batch import BatchOptions, run_batch  # quiets the libraries once the manifest is checked

        options = BatchOptions(
            manifest=manifest, out_dir=out_dir, model=model, device=device, dtype=dtype, steps=steps,
            guidance=guidance, lr=lr, t_min=t_min, t_max=t_max, seed=seed, negative=negative, size=size,
            batch_size=batch_size, processes=processes, skip_invalid=skip_invalid, overwrite=overwrite,
            allow_pickle=allow_pickle, prediction_type=prediction_type, cuda_graph=cuda_graph, quiet=quiet,
            verbose=verbose, mask_strength=mask_strength, mask_noises=mask_noises, mask_threshold=mask_threshold,
            mask_grow=mask_grow, **_method_overrides(dict(
                dds_weight=dds_weight, cut_weight=cut_weight, cut_patches=cut_patches, cut_patch_sizes=cut_patch_sizes,
                cut_temperature=cut_temperature, pds_grid=pds_grid, identity_steps=identity_steps,
                identity_weight=identity_weight,
            )),
        )  # fmt: skip
        exit_code = run_batch(options, console=stderr, emit=typer.echo)
    except KeyboardInterrupt:
        stderr.print("interrupted: finished rows are kept; run the same command again to do the rest")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as error:  # noqa: BLE001 - the CLI's contract is one line, never a traceback
        raise _fail(error, verbose) from None
    if exit_code:
        raise typer.Exit(exit_code)


def main() -> None:
    """Console-script entry point: usage errors (a missing or unknown option) are one line too."""
    # The click that typer runs on (typer >= 0.17 vendors its own copy): found through a public name.
    click_errors = sys.modules[typer.BadParameter.__module__]
    command = typer.main.get_command(app)
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
    except (KeyboardInterrupt, click_errors.Abort):
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
