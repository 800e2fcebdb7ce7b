"""Harden a shapes model's VAE decoder: teach it to decode perturbed latents to clean world images.

    python -m shapes_training.decoder MODEL_DIR --out DIR [--steps 600] [--sigma 0.3] [--lr 5e-4]

An edit moves latents away from anything the encoder produces, and a decoder trained only on
the encoder's outputs has never been asked what such latents should look like. This step
fine-tunes the decoder alone on encoder latents plus noise (half per-element, half smooth over
the image), up to ``sigma`` in the UNet's scaled units, against the clean image, with the
autoencoder's weighted loss. The encoder stays fixed, so the latent space the UNet learned, the
scaling factor and the UNet itself are unchanged: DIR is MODEL_DIR with a new ``vae``.
``train_info.json`` in DIR gains a ``decoder`` section with the settings, seconds and losses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ddsedit.shapes.world import render_batch, sample_case
from shapes_training.bookkeeping import step_rng, warmup_cosine
from shapes_training.export import check_folder, folder_size
from shapes_training.train import reconstruction_loss

DECODER_PHASE = 5  # the phase number in step_rng's seeds, apart from the trainer's phases


@dataclass
class DecoderConfig:
    """Settings of the decoder fine-tune."""

    steps: int = 600
    batch: int = 8
    lr: float = 5e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    sigma: float = 0.3  # largest perturbation std, in scaled latent units (the UNet's)
    smooth_grid: int = 4  # the smooth half of the noise is bilinear from a grid this many cells across
    shape_weight: float = 5.0
    dot_weight: float = 10.0
    grad_clip: float = 1.0
    seed: int = 7


def perturb(
    latents: torch.Tensor, scaling_factor: float, sigma: float, grid: int, gen: torch.Generator
) -> torch.Tensor:
    """Add noise of a per-image std drawn from [0, sigma] (scaled units): half white, half smooth."""
    count = latents.shape[0]
    std = torch.rand(count, 1, 1, 1, generator=gen) * sigma / scaling_factor
    white = torch.randn(latents.shape, generator=gen)
    coarse = torch.randn((count, latents.shape[1], grid, grid), generator=gen)
    smooth = F.interpolate(coarse, size=latents.shape[-2:], mode="bilinear", align_corners=False)
    return latents + std * (white + smooth) / 2**0.5


def harden_decoder(
    vae: AutoencoderKL, cfg: DecoderConfig, on_step: Callable[[int, float], None] | None = None
) -> list[float]:
    """Fine-tune ``vae``'s decoder in place; returns the mean L1 of each step (0-1 scale of [-1, 1] pixels)."""
    scaling_factor = float(vae.config.scaling_factor)
    vae.requires_grad_(False)
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    vae.train()
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
    losses = []
    for step in range(cfg.steps):
        rng, gen = step_rng(cfg.seed, DECODER_PHASE, step)
        images, masks, dots = render_batch([sample_case(rng) for _ in range(cfg.batch)])
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            latents = perturb(latents, scaling_factor, cfg.sigma, cfg.smooth_grid, gen)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        recon = vae.decode(latents).sample
        loss = reconstruction_loss(recon, images, masks, dots, cfg.shape_weight, cfg.dot_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        optimizer.step()
        losses.append(float((recon.detach() - images).abs().mean()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    vae.eval().requires_grad_(False)
    return losses


def harden_model(model_dir: Path, out: Path, cfg: DecoderConfig, on_step=None) -> dict[str, Any]:
    """Copy a shapes model folder to ``out`` with its decoder hardened; returns the record written."""
    if out.exists():
        raise FileExistsError(f"{out} exists: choose another --out")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch.float32)
    start = time.time()
    losses = harden_decoder(vae, cfg, on_step)
    seconds = time.time() - start
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging)
    shutil.rmtree(staging / "vae")
    vae.to(torch.float16).save_pretrained(staging / "vae", safe_serialization=True)
    vae_config_path = staging / "vae" / "config.json"
    vae_config = json.loads(vae_config_path.read_text())
    vae_config.pop("_name_or_path", None)  # where it was loaded from on this machine: not part of the model
    vae_config_path.write_text(json.dumps(vae_config, indent=2, sort_keys=True) + "\n")
    record = {"from": str(model_dir), "config": asdict(cfg), "seconds": round(seconds, 1),
              "l1_per_100_steps": [round(sum(losses[i : i + 100]) / len(losses[i : i + 100]), 5)
                                   for i in range(0, len(losses), 100)]}  # fmt: skip
    info_path = staging / "train_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["decoder"] = record
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    for path in staging.rglob("*"):  # safetensors writes 0600 files; a bundled model must be world-readable
        path.chmod(0o755 if path.is_dir() else 0o644)
    check_folder(staging)
    staging.rename(out)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shapes_training.decoder", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path, help="a shapes model folder (e.g. src/ddsedit/bundled/shapes)")
    parser.add_argument("--out", type=Path, required=True, help="the new model folder (must not exist)")
    defaults = DecoderConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--sigma", type=float, default=defaults.sigma)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DecoderConfig(steps=args.steps, sigma=args.sigma, lr=args.lr, seed=args.seed)

    def report(step: int, l1: float) -> None:
        if step % 100 == 0 or step == cfg.steps:
            print(f"step {step}/{cfg.steps}: l1 {l1:.4f}", flush=True)

    try:
        record = harden_model(args.model_dir, args.out, cfg, report)
    except (FileExistsError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.out} ({folder_size(args.out) / 1e6:.1f} MB) in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
