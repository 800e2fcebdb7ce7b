"""Time ddsedit's DDS loop against two reference loops, side by side, in one process.

    python -m benchmarks.bench_dds --arch sd15 --size 512          # on a GPU
    python -m benchmarks.bench_dds --arch sdxl --size 1024         # SDXL base's UNet, on a GPU
    python -m benchmarks.bench_dds --arch tiny --size 64 --device cpu

The three loops share the UNet configuration, the source latents, the prompts and the
sequence of timesteps and noise:
- ``reference-2call``: two UNet calls of batch 2 per step (source, target), fp32 weights,
  the SGD step through autograd (as in the public re-implementations);
- ``reference-batch4``: one call of batch 4 under fp16/bf16 autocast over fp32 weights,
  autograd SGD (as in the DDS paper's code);
- ``ddsedit``: the product's engine (:func:`ddsedit.optimize.distill`) with the UNet in the
  chosen dtype, as the CLI runs it;
- ``ddsedit-cds``, ``ddsedit-pds``, ``ddsedit-ids``: the same engine running the methods beyond DDS,
  each with its own defaults (IDS without the CUT term), and ``ddsedit-ids-cut``: IDS with it
  (their step time is reported against ``ddsedit``'s, in the same run).
Timing does not depend on the weights, so SD architectures use random weights built from
the packaged configs. The loops are also checked to give the same edit: the first step's
gradient direction (cosine) and the final latents' relative error against reference-2call.
The reference loops are timing baselines built from ddsedit's own score functions, so their
agreement with the engine checks batching and the update, not the DDS math itself
(tests/test_reference_dds.py checks that against a loop that shares no code with ddsedit).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ddsedit import scores
from ddsedit.conditioning import Conditioning, call_unet
from ddsedit.families import FAMILIES, Family
from ddsedit.optimize import LoopSettings, PromptEmbeddings, distill

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "ddsedit" / "model_configs"
ARCHITECTURES = {"sd15": "sd15", "sd21": "sd2-v", "sd21-base": "sd2", "sdxl": "sdxl"}
SDXL_ARCHITECTURES = ("sdxl", "tiny-sdxl")  # UNets that take SDXL's pooled text and size ids
LOOPS = (
    "reference-2call", "reference-batch4", "ddsedit", "ddsedit-cds", "ddsedit-pds", "ddsedit-ids", "ddsedit-ids-cut",
)  # fmt: skip
DEFAULT_LOOPS = LOOPS[:3]


@dataclass
class LoopResult:
    """One loop's figures."""

    name: str
    ms_per_step: float  # median over timed steps, device-synchronised
    ms_per_step_mean: float
    seconds_per_edit: float  # edit_steps * ms_per_step + VAE encode and decode
    vae_seconds: float
    peak_memory_mib: float
    first_gradient_cosine: float = 1.0  # against reference-2call
    final_latent_relative_error: float = 0.0  # against reference-2call


@dataclass
class BenchReport:
    arch: str
    device: str
    device_name: str
    dtype: str
    size: int
    batch_size: int
    timed_steps: int
    edit_steps: int
    compile_seconds: float | None
    engine_options: str = ""  # how the ddsedit loop ran: "eager", "cuda-graph", "compile (mode)"
    repeats: int = 1  # whole runs, one after another; figures are the median over runs
    loops: list[LoopResult] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    images_per_second: dict[str, float] = field(default_factory=dict)
    ratio_runs: dict[str, list[float]] = field(default_factory=dict)  # each run's ratio, to show the spread


def build_models(arch: str, size: int, device: torch.device):
    """(unet fp32, vae fp32, text dim, alphas_cumprod, prediction_type, latent stride, family) for ``arch``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if arch in ARCHITECTURES:
        folder = CONFIGS / ARCHITECTURES[arch]
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "scheduler"))
    else:
        from ddsedit.loading import bundled_models
        from ddsedit.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline

        builders = {"tiny": build_tiny_pipeline, "tiny-sdxl": build_tiny_sdxl_pipeline}
        if arch not in builders and arch not in bundled_models():
            known = "sd15, sd21, sd21-base, sdxl, tiny, tiny-sdxl or a bundled model"
            raise SystemExit(f"unknown --arch {arch!r}: {known}")
        with tempfile.TemporaryDirectory(prefix="ddsedit-bench-") as scratch:  # a tiny model lives in memory once read
            folder = builders[arch](Path(scratch) / arch) if arch in builders else bundled_models()[arch]
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
            scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    for module in (unet, vae):
        module.requires_grad_(False).eval().to(device)
    stride = 2 ** (len(vae.config.block_out_channels) - 1)
    return (
        unet,
        vae,
        unet.config.cross_attention_dim,
        scheduler.alphas_cumprod.float(),
        (scheduler.config.get("prediction_type", "epsilon")),
        stride,
        FAMILIES["sdxl" if arch in SDXL_ARCHITECTURES else "sd"],
    )


def random_embeddings(unet, family: Family, count: int, size: int, generator: torch.Generator) -> PromptEmbeddings:
    """Random prompt conditionings (unconditional, source, target) of the family's shapes, one row per image.

    SDXL's also carry a pooled embedding (the UNet's added-conditioning width less the six size ids') and the
    size ids of a ``size`` x ``size`` source edited at that size, as ddsedit builds them."""
    text = torch.randn((3, 77, unet.config.cross_attention_dim), generator=generator) * 0.5
    extra: dict[str, torch.Tensor] = {}
    if family.image_conditioning is not None:
        pooled_width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["text_embeds"] = torch.randn((3, pooled_width), generator=generator)
    rows = [Conditioning(text[i : i + 1], {key: value[i : i + 1] for key, value in extra.items()}) for i in range(3)]
    if family.image_conditioning is not None:
        sizes = {"time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)}
        rows = [row.with_extra(sizes) for row in rows]
    return PromptEmbeddings(*(row.expand(count) for row in rows))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def draw_sequence(steps: int, count: int, shape: tuple[int, ...], seed: int, settings: LoopSettings, device):
    """The timesteps and noise that distill() draws for ``count`` images seeded seed, seed+1, ..."""
    generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(count)]
    sequence = []
    for _ in range(steps):
        draws = [
            (
                torch.randint(settings.t_min, settings.t_max, (1,), generator=g, device=device),
                torch.randn((1, *shape), generator=g, device=device, dtype=torch.float32),
            )
            for g in generators
        ]
        sequence.append((torch.cat([t for t, _ in draws]), torch.cat([n for _, n in draws])))
    return sequence


def reference_loop(unet, source, embeddings, alphas, prediction_type, settings, sequence, batch4, autocast_dtype,
                   call=call_unet):  # fmt: skip
    """A reference DDS loop: autograd SGD; two calls of batch 2 or one call of batch 4 under autocast.

    ``call`` is the family's UNet call (SDXL's passes the pooled text and size ids as added conditioning)."""
    latents = source.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([latents], lr=settings.lr)
    uncond, src, tgt = embeddings.unconditional, embeddings.source, embeddings.target
    step_times, first_gradient = [], None
    device = source.device
    for timesteps, noise in sequence:
        start = time.perf_counter()
        alpha_bar = alphas[timesteps]
        with torch.no_grad():
            noisy_source = scores.add_noise(source, noise, alpha_bar)
            noisy_target = scores.add_noise(latents.detach(), noise, alpha_bar)
            if batch4:
                with torch.autocast(device.type, dtype=autocast_dtype):
                    batch = torch.cat([noisy_source, noisy_source, noisy_target, noisy_target])
                    out = call(unet, batch, timesteps.repeat(4), Conditioning.cat([uncond, src, uncond, tgt])).float()
                eps = scores.epsilon_from_prediction(out, batch, alpha_bar.repeat(4), prediction_type).chunk(4)
                eps_source = scores.classifier_free_guidance(eps[0], eps[1], settings.guidance)
                eps_target = scores.classifier_free_guidance(eps[2], eps[3], settings.guidance)
            else:
                guided = []
                for noisy, cond in ((noisy_source, src), (noisy_target, tgt)):
                    pair = torch.cat([noisy, noisy])
                    out = call(unet, pair, timesteps.repeat(2), Conditioning.cat([uncond, cond]))
                    eps = scores.epsilon_from_prediction(out, pair, alpha_bar.repeat(2), prediction_type).chunk(2)
                    guided.append(scores.classifier_free_guidance(eps[0], eps[1], settings.guidance))
                eps_source, eps_target = guided
            gradient = torch.nan_to_num(eps_target - eps_source)
        if first_gradient is None:
            first_gradient = gradient.clone()
        loss = scores.LOSS_SCALE * (latents * gradient).sum() / scores.REFERENCE_LATENT_PIXELS
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        step_times.append(time.perf_counter() - start)
    return latents.detach(), step_times, first_gradient


def engine_loop(unet, source, embeddings, alphas, prediction_type, settings, steps, seed, cuda_graph=False,
                call=call_unet):  # fmt: skip
    """ddsedit's own loop, timed per step through its callback (a CUDA graph is recorded before step 1)."""
    device = source.device
    generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(source.shape[0])]
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, latents: torch.Tensor) -> None:
        synchronize(device)
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    synchronize(device)
    last[0] = time.perf_counter()
    one_step = dataclasses.replace(settings, steps=1)
    first_gradient = None
    # The first step on its own, to read the gradient the engine applies.
    first = distill(unet, source, embeddings, alphas, prediction_type, one_step,
                    [torch.Generator(device=device).manual_seed(seed + i) for i in range(source.shape[0])],
                    cuda_graph=cuda_graph, call=call)  # fmt: skip
    first_gradient = (source - first) / (settings.lr * scores.GRADIENT_SCALE)
    synchronize(device)
    last[0] = time.perf_counter()
    latents = distill(
        unet, source, embeddings, alphas, prediction_type,
        dataclasses.replace(settings, steps=steps), generators, on_step=on_step, cuda_graph=cuda_graph, call=call,
    )  # fmt: skip
    return latents, step_times, first_gradient


def time_vae(vae, pixels, dtype, device) -> float:
    """Seconds for one encode and one decode at ``dtype``."""
    vae_copy = copy.deepcopy(vae).to(dtype)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        latents = vae_copy.encode(pixels.to(dtype)).latent_dist.mean
        vae_copy.decode(latents)
    synchronize(device)
    elapsed = time.perf_counter() - start
    del vae_copy
    return elapsed


def run(args: argparse.Namespace) -> BenchReport:
    from ddsedit.loading import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    # The fp32 UNet waits on the CPU while it is not the loop being timed, so that each loop's peak
    # memory counts only what that loop holds on the device.
    unet, vae, _, alphas, prediction_type, stride, family = build_models(args.arch, args.size, torch.device("cpu"))
    call = family.function("call_denoiser")
    vae.to(device)
    alphas = alphas.to(device)
    latent_side = args.size // stride
    shape = (unet.config.in_channels, latent_side, latent_side)
    count = args.batch_size
    generator = torch.Generator(device="cpu").manual_seed(1)
    source = torch.randn((count, *shape), generator=generator).to(device)
    pixels = torch.rand((1, 3, args.size, args.size), generator=generator).to(device) * 2 - 1
    embeddings32 = embeddings_as(random_embeddings(unet, family, count, args.size, generator), torch.float32, device)
    settings = LoopSettings("dds", args.steps, 7.5, args.lr, 50, 950)
    sequence = draw_sequence(args.warmup + args.steps, count, shape, args.seed, settings, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = BenchReport(
        args.arch, str(device), device_name, str(dtype).removeprefix("torch."), args.size, count,
        args.steps, args.edit_steps, None, engine_options(args),
    )  # fmt: skip
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    half = dtype if dtype != torch.float32 else (torch.bfloat16 if device.type == "cpu" else torch.float16)
    for name in args.loops:
        reset_peak_memory(device)
        if name.startswith("ddsedit"):
            method, loop_settings = engine_settings(name, settings)
            # The references need the fp32 UNet as built; without them the engine loops take it over (one copy of
            # SDXL's UNet in fp32 is 10 GB: two may not fit a CPU machine).
            references = any(not loop.startswith("ddsedit") for loop in args.loops)
            engine_unet = (copy.deepcopy(unet) if references else unet).to(device=device, dtype=dtype)
            if device.type == "cuda":
                engine_unet = engine_unet.to(memory_format=torch.channels_last)
            if args.compile:
                start = time.perf_counter()
                engine_unet = torch.compile(engine_unet, mode=args.compile_mode)
                engine_loop(engine_unet, source, embeddings_as(embeddings32, dtype), alphas, prediction_type,
                            settings, 2, args.seed, call=call)  # fmt: skip
                report.compile_seconds = time.perf_counter() - start
            embeddings = embeddings_as(embeddings32, dtype)
            cuda_graph = args.cuda_graph and method == "dds"  # the methods with autograd are not recorded
            engine_loop(engine_unet, source, embeddings, alphas, prediction_type, loop_settings, args.warmup,
                        args.seed, cuda_graph=cuda_graph, call=call)  # fmt: skip
            reset_peak_memory(device)
            latents, step_times, first_gradient = engine_loop(
                engine_unet, source, embeddings, alphas, prediction_type, loop_settings,
                args.warmup + args.steps, args.seed, cuda_graph=cuda_graph, call=call,
            )  # fmt: skip
            step_times = step_times[args.warmup :]
            vae_seconds = time_vae(vae, pixels, dtype, device)
            del engine_unet
        else:
            batch4 = name == "reference-batch4"
            unet.to(device)
            latents, step_times, first_gradient = reference_loop(
                unet, source, embeddings32, alphas, prediction_type, settings, sequence, batch4, half, call=call
            )
            unet.to("cpu")
            step_times = step_times[args.warmup :]
            vae_seconds = time_vae(vae, pixels, torch.float32, device)
        median_ms = statistics.median(step_times) * 1000
        result = LoopResult(
            name=name,
            ms_per_step=median_ms,
            ms_per_step_mean=statistics.fmean(step_times) * 1000,
            seconds_per_edit=args.edit_steps * median_ms / 1000 + vae_seconds,
            vae_seconds=vae_seconds,
            peak_memory_mib=peak_memory_mib(device),
        )
        results[name] = (latents.float(), first_gradient.float())
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report.loops.append(result)
    baseline = "reference-2call" if "reference-2call" in results else report.loops[0].name
    base_latents, base_gradient = results[baseline]
    for result in report.loops:
        latents, gradient = results[result.name]
        result.first_gradient_cosine = float(
            torch.nn.functional.cosine_similarity(gradient.flatten(), base_gradient.flatten(), dim=0)
        )
        moved = (base_latents - source).norm()
        result.final_latent_relative_error = float((latents - base_latents).norm() / moved.clamp_min(1e-12))
    add_ratios(report)
    return report


def engine_settings(loop: str, settings: LoopSettings) -> tuple[str, LoopSettings]:
    """The method an engine loop runs (``ddsedit-ids-cut``: ids) and its settings: the method's own defaults
    (as ``Editor.config(method)`` resolves them without a model's), IDS's CUT term only in ``-cut``."""
    from ddsedit.methods import get_method
    from ddsedit.settings import resolve_config

    method, _, variant = loop.removeprefix("ddsedit").removeprefix("-").partition("-")
    method = method or "dds"
    overrides = {"cut_weight": 3.0} if variant == "cut" else {}  # the time is the same for any weight above 0
    config = resolve_config(get_method(method), {}, overrides)
    return method, dataclasses.replace(settings, method=method, options=config.options, t_min=config.t_min,
                                       t_max=config.t_max)  # fmt: skip


def add_ratios(report: BenchReport) -> None:
    """Speed-ups of the engine against each reference, and images per second of each loop."""
    by_name = {result.name: result for result in report.loops}
    if "ddsedit" in by_name:
        for reference in ("reference-2call", "reference-batch4"):
            if reference in by_name:
                speedup = by_name[reference].ms_per_step / by_name["ddsedit"].ms_per_step
                report.ratios[f"speedup_vs_{reference}"] = speedup
        for method in ("cds", "pds", "ids", "ids-cut"):
            if f"ddsedit-{method}" in by_name:
                report.ratios[f"{method.replace('-', '_')}_step_vs_dds"] = (
                    by_name[f"ddsedit-{method}"].ms_per_step / by_name["ddsedit"].ms_per_step
                )
    for result in report.loops:
        report.images_per_second[result.name] = report.batch_size / (result.ms_per_step / 1000 * report.edit_steps)


def merge_runs(reports: list[BenchReport]) -> BenchReport:
    """One report from several whole runs: each loop's median over runs, the median of the runs' ratios.

    On a shared machine the speed drifts between loops timed one after another; repeating the
    whole run and taking medians makes the ratios less a matter of which loop ran when.
    """
    merged = copy.deepcopy(reports[0])
    merged.repeats = len(reports)
    merged.ratios, merged.images_per_second = {}, {}
    for index, loop in enumerate(merged.loops):
        runs = [report.loops[index] for report in reports]
        loop.ms_per_step = statistics.median(run.ms_per_step for run in runs)
        loop.ms_per_step_mean = statistics.fmean(run.ms_per_step_mean for run in runs)
        loop.vae_seconds = statistics.median(run.vae_seconds for run in runs)
        loop.seconds_per_edit = merged.edit_steps * loop.ms_per_step / 1000 + loop.vae_seconds
        loop.peak_memory_mib = max(run.peak_memory_mib for run in runs)
    add_ratios(merged)
    merged.ratio_runs = {key: [report.ratios[key] for report in reports] for key in merged.ratios}
    merged.ratios = {key: statistics.median(runs) for key, runs in merged.ratio_runs.items()}
    return merged


def engine_options(args: argparse.Namespace) -> str:
    if args.compile:
        return f"compile ({args.compile_mode})"
    return "cuda-graph" if args.cuda_graph else "eager"


def embeddings_as(embeddings: PromptEmbeddings, dtype: torch.dtype, device: torch.device | None = None
                  ) -> PromptEmbeddings:  # fmt: skip
    """The conditionings (extra tensors too) in ``dtype``, moved to ``device`` if given."""
    parts = (embeddings.unconditional, embeddings.source, embeddings.target)
    if device is not None:
        parts = tuple(
            Conditioning(part.hidden_states.to(device), {k: v.to(device) for k, v in part.extra.items()})
            for part in parts
        )
    return PromptEmbeddings(*(part.to(dtype) for part in parts))


def format_table(report: BenchReport) -> str:
    lines = [
        f"{report.arch} {report.size}x{report.size}, batch {report.batch_size}, {report.device_name}, "
        f"dtype {report.dtype}, {report.timed_steps} timed steps x {report.repeats} runs, "
        f"ddsedit loop: {report.engine_options}",
        "| loop | ms/step | s/edit (200 steps + VAE) | peak memory MiB | gradient cosine | final latent rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for r in report.loops:
        lines.append(
            f"| {r.name} | {r.ms_per_step:.1f} | {r.seconds_per_edit:.2f} | {r.peak_memory_mib:.0f} "
            f"| {r.first_gradient_cosine:.4f} | {r.final_latent_relative_error:.4f} |"
        )
    for key, value in report.ratios.items():
        runs = report.ratio_runs.get(key)
        spread = f" (median of {len(runs)} runs: {', '.join(f'{r:.2f}' for r in runs)})" if runs else ""
        lines.append(f"{key}: {value:.2f}x{spread}")
    if report.compile_seconds is not None:
        lines.append(f"torch.compile time: {report.compile_seconds:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny",
                        help="sd15, sd21, sd21-base, sdxl, tiny, tiny-sdxl or a bundled model name")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="the engine's dtype (references: fp32 / autocast)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--edit-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine's UNet")
    parser.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"),
                        help="torch.compile mode (reduce-overhead adds CUDA graphs)")
    parser.add_argument("--cuda-graph", action="store_true", help="the engine records one step as a CUDA graph")
    parser.add_argument("--loops", nargs="+", default=list(DEFAULT_LOOPS), choices=LOOPS,
                        help="loops to time (default: the two references and ddsedit's DDS)")
    parser.add_argument("--repeats", type=int, default=1, help="whole runs one after another; medians reported")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    from ddsedit.loading import quiet_third_party_output

    quiet_third_party_output()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    reports = [run(args) for _ in range(args.repeats)]
    report = merge_runs(reports) if len(reports) > 1 else reports[0]
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
