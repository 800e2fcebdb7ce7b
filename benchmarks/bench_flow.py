"""Time a whole FlowEdit edit on SD3's or Flux.1's transformer, and how far it is from its FLOP floor.

    python -m benchmarks.bench_flow --arch flux-dev --size 1024 --dtype bf16        # on a GPU
    python -m benchmarks.bench_flow --arch sd3-medium --size 1024 --dtype bf16
    python -m benchmarks.bench_flow --arch tiny-flux --size 32 --device cpu --dtype fp32 --steps 4 --n-max 2

The edit is the product's FlowEdit (:func:`ddsedit.flowgradients.flowedit_edit`, the sampler ``ddsedit flowedit``
runs) over the model's own sigma schedule, with FlowEdit's authors' settings: SD3 integrates 33 of 50 steps,
each step one transformer call of 4 rows per image (source unconditional and conditional, target unconditional
and conditional; CFG 3.5 for the source, 13.5 for the target); Flux.1-dev integrates 24 of 28 steps, each one
call of 2 rows (source, target) with the guidance embedded (1.5 for the source, 5.5 for the target), no CFG.
Timing does not depend on the weights, so the transformer has random weights from the shipped configs (``sdxl``'s
way, but built in the chosen dtype directly
on the device: no fp32 copy of 12 B parameters on the CPU first).

Only the transformer is timed. The text encoders are not loaded: the prompts' conditioning is random, of the
shapes they give (SD3: 77 CLIP + 256 T5 tokens 4096 wide and a 2048-wide pooled projection; Flux: 512 T5 tokens
4096 wide and CLIP's 768-wide pooled output), which is what the edit holds once T5 has been freed after encoding,
as the CLI frees it. The VAE is not run either: the source latents are random, and the decode is not timed.

The FLOP floor is the transformer's forward FLOPs for one step's batch, counted by ``FlopCounterMode`` on the
meta device (no memory, no arithmetic; SDPA runs its math decomposition there, so attention's two matmuls are
counted, as the counter counts the flash kernels on CUDA), times the active steps, divided by the GPU's dense
peak (``--peak-tflops``; 989 TFLOP/s is H100/H200 SXM's dense bf16). The elementwise work of the sampler and
of CFG is left out of the floor: it is a few latent-sized tensors a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_dds import peak_memory_mib, reset_peak_memory, synchronize
from ddsedit.conditioning import FLUX_MAX_SEQUENCE_LENGTH, SD3_MAX_SEQUENCE_LENGTH, Conditioning
from ddsedit.families import FAMILIES
from ddsedit.flowgradients import FlowSchedule, flowedit_edit
from ddsedit.gradients import GradientInputs, PromptEmbeddings
from ddsedit.methods import FlowEditOptions

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "ddsedit" / "model_configs"
CLIP_TOKENS = 77  # SD3's two CLIP encoders' sequence, ahead of T5's in its conditioning
FULL_SIZE_LATENT_STRIDE = 8  # SD3's and Flux's VAEs: three downsamplings
H100_BF16_DENSE_TFLOPS = 989.0  # H100 and H200 SXM, bf16 tensor cores without sparsity


@dataclass(frozen=True)
class FlowArch:
    """One benchmarked model: its family, where its configs come from, and FlowEdit's settings for it."""

    family: str  # "sd3" or "flux": the transformer class, its call, its prompt layout and sigma schedule
    configs: str  # a folder under model_configs, or "tiny": the tiny random pipeline of the family
    steps: int  # the schedule's length T (FlowEdit's authors' setting for the model)
    n_max: int  # the steps FlowEdit integrates: the last n_max of T
    source_guidance: float  # SD3: the source branch's CFG scale; Flux: the source rows' embedded guidance
    target_guidance: float


ARCHITECTURES = {
    "sd3-medium": FlowArch("sd3", "sd3-medium", 50, 33, 3.5, 13.5),
    "flux-dev": FlowArch("flux", "flux-dev", 28, 24, 1.5, 5.5),
    "tiny-sd3": FlowArch("sd3", "tiny", 50, 33, 3.5, 13.5),
    "tiny-flux": FlowArch("flux", "tiny", 28, 24, 1.5, 5.5),
}
# Transformer rows per image in one step's call: SD3 runs CFG on both branches, Flux-dev embeds its guidance.
ROWS_PER_IMAGE = {"sd3": 4, "flux": 2}


@dataclass
class FlowReport:
    """One configuration's figures; times are device-synchronised, the edit's is the median of ``repeats``."""

    arch: str
    family: str
    device: str
    device_name: str
    dtype: str
    size: int
    batch_size: int
    steps: int  # the schedule's length T
    active_steps: int  # n_max: steps integrated, one transformer call each
    rows_per_step: int  # transformer samples in each step's call, all images together
    source_guidance: float
    target_guidance: float
    warmup: int
    repeats: int
    transformer_parameters: int
    weights_mib: float
    seconds_per_edit: float
    ms_per_step: float  # seconds_per_edit / active_steps
    peak_memory_mib: float  # CUDA: max_memory_allocated over the timed edits (weights included); CPU: peak RSS
    flops_per_step: int  # one step's transformer forward, counted on the meta device
    flops_per_edit: int
    peak_tflops: float
    floor_seconds: float  # flops_per_edit at peak_tflops
    ratio_to_floor: float  # seconds_per_edit / floor_seconds
    achieved_tflops: float
    edit_finite: bool  # random weights may overflow in half precision; the time does not depend on it
    flop_count_method: str = "FlopCounterMode on the meta device, one step's batch"
    text_encoders: str = "not loaded: random conditioning of their output shapes (T5 freed after encoding)"
    seconds_per_edit_runs: list[float] = field(default_factory=list)


@dataclass
class FlowModel:
    """What the edit needs of a model: its transformer config, scheduler config and latent layout."""

    family: str
    transformer_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    latent_stride: int  # image pixels per latent pixel

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels: Flux's transformer takes them packed 2x2 into its in_channels."""
        channels = int(self.transformer_config["in_channels"])
        return channels // 4 if self.family == "flux" else channels


def read_model(arch: FlowArch) -> FlowModel:
    """The configs of ``arch``: shipped for full-size models, written by :mod:`ddsedit.tiny` for tiny ones."""
    if arch.configs != "tiny":
        folder = CONFIGS / arch.configs
        return FlowModel(
            arch.family, _read_json(folder / "transformer" / "config.json"),
            _read_json(folder / "scheduler" / "scheduler_config.json"), FULL_SIZE_LATENT_STRIDE,
        )  # fmt: skip
    from ddsedit.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    builder = {"sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}[arch.family]
    with tempfile.TemporaryDirectory(prefix="ddsedit-bench-flow-") as scratch:
        folder = builder(Path(scratch) / arch.family)
        vae = _read_json(folder / "vae" / "config.json")
        return FlowModel(
            arch.family, _read_json(folder / "transformer" / "config.json"),
            _read_json(folder / "scheduler" / "scheduler_config.json"), 2 ** (len(vae["block_out_channels"]) - 1),
        )  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def random_transformer(model: FlowModel, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer of ``model`` with random weights, created in ``dtype`` on ``device`` (meta: no memory).

    The default device and dtype are set while diffusers builds it, so that each parameter is born where it
    will run: Flux-dev's 11.9 B parameters would be 48 GB in fp32 on the CPU otherwise.
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    model_class = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[model.family]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = model_class.from_config(model.transformer_config)
    finally:
        torch.set_default_dtype(default_dtype)
    # Buffers diffusers builds on the CPU (SD3's position table) follow the parameters.
    return transformer.to(device=device, dtype=dtype).requires_grad_(False).eval()


def random_prompts(model: FlowModel, count: int, generator: torch.Generator) -> dict[str, Conditioning]:
    """Random conditioning rows [count, ...] shaped as the family's encoders give them, by role.

    SD3: "unconditional" (the empty negative prompt), "source" and "target", each CLIP's 77 tokens followed by
    T5's 256, ``joint_attention_dim`` wide, with the pooled projections. Flux: "source" and "target", T5's 512
    tokens and CLIP's pooled output; Flux-dev's guidance is the branch's, added by :func:`flux_velocities`.
    """
    config = model.transformer_config
    width, pooled_width = int(config["joint_attention_dim"]), int(config["pooled_projection_dim"])
    if model.family == "sd3":
        roles, tokens = ("unconditional", "source", "target"), CLIP_TOKENS + SD3_MAX_SEQUENCE_LENGTH
    else:
        roles, tokens = ("source", "target"), FLUX_MAX_SEQUENCE_LENGTH
    return {
        role: Conditioning(
            torch.randn((count, tokens, width), generator=generator),
            {"pooled_projections": torch.randn((count, pooled_width), generator=generator)},
        )
        for role in roles
    }


def placed(conditioning: Conditioning, device: torch.device, dtype: torch.dtype) -> Conditioning:
    """The rows on ``device``, in ``dtype`` but for Flux's guidance, which the transformer takes in fp32."""
    extra = {
        key: value.to(device=device, dtype=torch.float32 if key == "guidance" else dtype)
        for key, value in conditioning.extra.items()
    }
    return Conditioning(conditioning.hidden_states.to(device=device, dtype=dtype), extra)


def step_conditioning(arch: FlowArch, prompts: dict[str, Conditioning]) -> Conditioning:
    """The rows of one step's transformer call, in the order the velocity functions split its output."""
    if arch.family == "sd3":
        unconditional = prompts["unconditional"]
        return Conditioning.cat([unconditional, prompts["source"], unconditional, prompts["target"]])
    count = len(prompts["source"])
    return Conditioning.cat([
        prompts["source"].with_extra({"guidance": torch.full((count,), arch.source_guidance)}),
        prompts["target"].with_extra({"guidance": torch.full((count,), arch.target_guidance)}),
    ])  # fmt: skip


def edit_inputs(arch: FlowArch, transformer: torch.nn.Module, source: torch.Tensor,
                prompts: dict[str, Conditioning], n_max: int) -> GradientInputs:  # fmt: skip
    """What the product's FlowEdit (:func:`ddsedit.flowgradients.flowedit_edit`) runs on: the transformer, the
    source latents, the prompts' rows and the authors' guidance, as :class:`ddsedit.editor.Editor` builds them."""
    family = FAMILIES[arch.family]
    embeddings = PromptEmbeddings(
        # Flux has no unconditional call: its rows stand in, unused.
        unconditional=placed(prompts.get("unconditional", prompts["source"]), source.device, transformer.dtype),
        source=placed(prompts["source"], source.device, transformer.dtype),
        target=placed(prompts["target"], source.device, transformer.dtype),
    )  # fmt: skip
    options = FlowEditOptions(source_guidance=arch.source_guidance, n_max=n_max)
    return GradientInputs(transformer, source.float(), embeddings, None, "velocity", arch.target_guidance, options,
                          [], family.function("call_denoiser"), true_cfg=family.true_cfg)  # fmt: skip


def count_step_flops(model: FlowModel, arch: FlowArch, count: int, latent_side: int, dtype: torch.dtype) -> int:
    """The transformer forward FLOPs of one step's call for ``count`` images, counted on the meta device.

    The meta transformer has the real one's shapes and no storage, so this costs a few seconds even for Flux-dev,
    and counts what the model does (matmuls, convolutions, attention), not a formula of it.
    """
    meta = torch.device("meta")
    transformer = random_transformer(model, meta, dtype)
    prompts = random_prompts(model, count, torch.Generator().manual_seed(0))
    conditioning = placed(step_conditioning(arch, prompts), meta, dtype)
    rows = len(conditioning)
    latents = torch.empty((rows, model.latent_channels, latent_side, latent_side), device=meta)
    times = torch.full((rows,), 0.5, device=meta)
    call = FAMILIES[model.family].function("call_denoiser")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        call(transformer, latents, times, conditioning)
    return int(counter.get_total_flops())


def run(args: argparse.Namespace) -> FlowReport:
    from ddsedit.loading import resolve_device, resolve_dtype

    arch = ARCHITECTURES[args.arch]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    steps = args.steps or arch.steps
    n_max = args.n_max or arch.n_max
    model = read_model(arch)
    family = FAMILIES[arch.family]
    if args.size % (2 * model.latent_stride):
        raise SystemExit(f"--size must be a multiple of {2 * model.latent_stride} (the VAE's stride times the "
                         "transformer's 2x2 patches)")  # fmt: skip
    if not 0 < n_max <= steps:
        raise SystemExit(f"--n-max must be in [1, --steps] = [1, {steps}], got {n_max}")
    latent_side = args.size // model.latent_stride
    count = args.batch_size

    generator = torch.Generator().manual_seed(args.seed)
    source = torch.randn((count, model.latent_channels, latent_side, latent_side), generator=generator).to(device)
    prompts = random_prompts(model, count, generator)
    image_tokens = (latent_side // 2) ** 2  # what the pipelines' resolution-dependent shift is computed from
    sigmas = family.function("flow_sigmas")(model.scheduler_config, steps, image_tokens)
    schedule = FlowSchedule(sigmas, torch.ones(steps))  # FlowEdit's steps are the sigmas' intervals

    transformer = random_transformer(model, device, dtype)
    inputs = edit_inputs(arch, transformer, source, prompts, n_max)

    def edit() -> torch.Tensor:
        generators = [torch.Generator(device=device).manual_seed(args.seed + i) for i in range(count)]
        with torch.no_grad():
            return flowedit_edit(inputs, schedule, generators)

    for _ in range(args.warmup):
        edit()
    synchronize(device)
    reset_peak_memory(device)
    runs = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        edited = edit()
        synchronize(device)
        runs.append(time.perf_counter() - start)
    peak = peak_memory_mib(device)
    parameters = sum(parameter.numel() for parameter in transformer.parameters())
    weights_mib = sum(tensor.numel() * tensor.element_size()
                      for tensor in (*transformer.parameters(), *transformer.buffers())) / 2**20  # fmt: skip
    del transformer
    if device.type == "cuda":
        torch.cuda.empty_cache()

    flops_per_step = count_step_flops(model, arch, count, latent_side, dtype)
    seconds = statistics.median(runs)
    flops_per_edit = flops_per_step * n_max
    floor_seconds = flops_per_edit / (args.peak_tflops * 1e12)
    return FlowReport(
        arch=args.arch, family=arch.family, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        dtype=str(dtype).removeprefix("torch."), size=args.size, batch_size=count, steps=steps, active_steps=n_max,
        rows_per_step=ROWS_PER_IMAGE[arch.family] * count, source_guidance=arch.source_guidance,
        target_guidance=arch.target_guidance, warmup=args.warmup, repeats=args.repeats,
        transformer_parameters=parameters, weights_mib=weights_mib, seconds_per_edit=seconds,
        ms_per_step=seconds / n_max * 1000, peak_memory_mib=peak, flops_per_step=flops_per_step,
        flops_per_edit=flops_per_edit, peak_tflops=args.peak_tflops, floor_seconds=floor_seconds,
        ratio_to_floor=seconds / floor_seconds, achieved_tflops=flops_per_edit / seconds / 1e12,
        edit_finite=bool(torch.isfinite(edited).all()), seconds_per_edit_runs=runs,
    )  # fmt: skip


def format_report(report: FlowReport) -> str:
    lines = [
        f"{report.arch} {report.size}x{report.size}, batch {report.batch_size}, {report.device_name}, "
        f"dtype {report.dtype}, FlowEdit {report.active_steps} of {report.steps} steps, "
        f"{report.rows_per_step} transformer samples a step (guidance {report.source_guidance:g} source, "
        f"{report.target_guidance:g} target), median of {report.repeats} timed edit(s) after {report.warmup} warm-up",
        f"transformer {report.transformer_parameters / 1e6:,.1f} M parameters ({report.weights_mib:,.1f} MiB); "
        f"text encoders {report.text_encoders}; no VAE",
        "| s/edit | ms/step | peak memory MiB | TFLOP/step | floor s | measured/floor | achieved TFLOP/s |",
        "|---|---|---|---|---|---|---|",
        f"| {report.seconds_per_edit:.3f} | {report.ms_per_step:.1f} | {report.peak_memory_mib:.0f} "
        f"| {report.flops_per_step / 1e12:.4g} | {report.floor_seconds:.4g} | {report.ratio_to_floor:.2f}x "
        f"| {report.achieved_tflops:.4g} |",
        f"floor: {report.flop_count_method}, x {report.active_steps} steps, at {report.peak_tflops:g} TFLOP/s",
    ]
    if not report.edit_finite:
        lines.append("the edited latents are not all finite (random weights in half precision); timing holds")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny-flux", choices=tuple(ARCHITECTURES))
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--steps", type=int, default=None, help="the schedule's length T (SD3 50, Flux 28)")
    parser.add_argument("--n-max", type=int, default=None, help="steps integrated, the last of T (SD3 33, Flux 24)")
    parser.add_argument("--batch-size", type=int, default=1, help="images edited together")
    parser.add_argument("--warmup", type=int, default=1, help="whole edits before the timed ones")
    parser.add_argument("--repeats", type=int, default=3, help="timed edits; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="the GPU's dense peak for --dtype, for the floor (989: H100/H200 SXM bf16)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--repeats and --batch-size must be >= 1, --warmup >= 0")
    from ddsedit.loading import quiet_third_party_output

    quiet_third_party_output()
    report = run(args)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
