"""Peak memory and time of whole edits, the way the CLI runs them, on a model of random weights.

    python -m benchmarks.bench_memory --arch sdxl --size 1024 --dtype fp16     # on a GPU
    python -m benchmarks.bench_memory --arch tiny-sdxl --size 32 --device cpu

The model is built from the shipped configs (``sdxl``: SDXL base's UNet, VAE and both text encoders; ``sd15``) or
as the tiny random pipeline, saved to a temporary folder and loaded through ``Editor.from_pretrained`` with the text
encoders freed after encoding, as ``ddsedit dds`` loads it. Each setting (plain, ``--cpu-offload``) loads the
model afresh and runs one DDS edit; the report gives the device's peak memory over the load and edit, the peak
during the edit alone, and the seconds of the edit. Memory does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "ddsedit" / "model_configs"
ARCHITECTURES = ("sd15", "sdxl", "tiny", "tiny-sdxl")


@dataclass
class EditMemory:
    """One setting's figures."""

    setting: str  # "plain" or "cpu-offload"
    peak_mib: float  # over the load and the edit
    edit_peak_mib: float  # during the edit alone (text encoders freed after the prompts are encoded)
    edit_seconds: float
    steps: int


def write_random_model(arch: str, folder: Path, dtype: torch.dtype) -> Path:
    """A diffusers folder of ``arch`` with random weights in ``dtype`` (the tiny ones as ddsedit.tiny builds them)."""
    from ddsedit.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline

    if arch == "tiny":
        return build_tiny_pipeline(folder)
    if arch == "tiny-sdxl":
        return build_tiny_sdxl_pipeline(folder)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ddsedit.checkpoints import load_clip_tokenizer

    configs = CONFIGS / arch
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")).to(dtype).save_pretrained(
        folder / "unet"
    )
    AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")).to(dtype).save_pretrained(folder / "vae")
    encoders = {"text_encoder": CLIPTextModel}
    if (configs / "text_encoder_2").is_dir():
        encoders["text_encoder_2"] = CLIPTextModelWithProjection
    for name, model_class in encoders.items():
        config = CLIPTextConfig.from_pretrained(configs / name)
        model_class(config).to(dtype).save_pretrained(folder / name)
        load_clip_tokenizer(configs / name.replace("text_encoder", "tokenizer")).save_pretrained(
            folder / name.replace("text_encoder", "tokenizer")
        )
    DDPMScheduler.from_pretrained(configs, subfolder="scheduler").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text((configs / "model_index.json").read_text())
    return folder


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident memory


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(folder: Path, args: argparse.Namespace, cpu_offload: bool) -> EditMemory:
    """Load the model as the CLI does, then one DDS edit of a ``size`` x ``size`` image."""
    from ddsedit.editor import Editor
    from ddsedit.loading import resolve_device

    device = resolve_device(args.device)
    reset_peak(device)
    editor = Editor.from_pretrained(folder, device=args.device, dtype=args.dtype, keep_text_encoder=False,
                                    cpu_offload=cpu_offload)  # fmt: skip
    image = Image.new("RGB", (args.size, args.size), (200, 40, 40))
    config = editor.config("dds", steps=args.steps, seed=0, size=args.size)
    editor.encode_prompt([config.negative, "a red square", "a blue square"])  # frees the text encoders
    if device.type == "cuda":
        torch.cuda.empty_cache()
    load_peak = peak_mib(device)
    reset_peak(device)
    start = time.perf_counter()
    editor.edit(image, "dds", "a blue square", ref="a red square", config=config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    edit_peak = peak_mib(device)
    del editor
    if device.type == "cuda":
        torch.cuda.empty_cache()
    setting = "cpu-offload" if cpu_offload else "plain"
    return EditMemory(setting, max(load_peak, edit_peak), edit_peak, seconds, args.steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny-sdxl", choices=ARCHITECTURES)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--settings", nargs="+", default=["plain", "cpu-offload"], choices=("plain", "cpu-offload"))
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    from ddsedit.loading import quiet_third_party_output, resolve_device, resolve_dtype

    quiet_third_party_output()
    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    results = []
    with tempfile.TemporaryDirectory(prefix="ddsedit-memory-") as scratch:
        folder = write_random_model(args.arch, Path(scratch) / args.arch, dtype)
        for setting in args.settings:
            results.append(measure(folder, args, cpu_offload=setting == "cpu-offload"))
    report = {"arch": args.arch, "size": args.size, "dtype": str(dtype).removeprefix("torch."),
              "device": args.device, "results": [asdict(result) for result in results]}  # fmt: skip
    print(f"{args.arch} {args.size}x{args.size}, {report['dtype']}, {args.steps}-step DDS edit, text encoders freed")
    print("| setting | peak MiB (load + edit) | peak MiB (edit) | s/edit |")
    print("|---|---|---|---|")
    for result in results:
        print(f"| {result.setting} | {result.peak_mib:.0f} | {result.edit_peak_mib:.0f} | {result.edit_seconds:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
