"""Sanity checks of a trained shapes pipeline folder: VAE round trip and text-to-image generation.

    python -m shapes_training.sanity DIR [--n 40] [--steps 40] [--guidance 6] [--grid samples.png]

* VAE: encode-decode `n` world images; mean L1 (0-1 scale), shape IoU (pixels nearest the shape
  colour), fraction of grey dots kept, and mean background change in levels.
* Generation: sample `n` images with DDIM and classifier-free guidance for captions cycling through
  every full caption, then read each image's background, shape colour and shape back (`metrics`).
  Targets: colour right >= 90 %, shape right >= 80 %.

A shapes-flow folder (SD3 layout, ``model_index.json`` of a StableDiffusion3Pipeline) is run by diffusers' own
StableDiffusion3Pipeline instead (flow-matching Euler, its classifier-free guidance, its decoding with the VAE's
shift_factor), and scored the same way. Its target (issue #22): colour and shape right >= 90 %.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusion3Pipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from ddsedit.shapes import metrics
from ddsedit.shapes.world import BACKGROUNDS, COLOURS, SHAPES, make_caption, render_array, sample_case
from ddsedit.wordtokenizer import MAX_LENGTH
from shapes_training.export import load_flow_pipeline


@dataclass
class Pipeline:
    """The components of a shapes pipeline folder, in float32 and eval mode."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler

    @classmethod
    def load(cls, folder: Path) -> Pipeline:
        return cls(
            AutoencoderKL.from_pretrained(folder, subfolder="vae").float().eval(),
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").float().eval(),
            CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            UNet2DConditionModel.from_pretrained(folder, subfolder="unet").float().eval(),
            DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
        )

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (posterior means)."""
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents -> uint8 (N, 64, 64, 3) images."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    @torch.no_grad()
    def generate(self, captions: list[str], steps: int, guidance: float, gen: torch.Generator) -> np.ndarray:
        """DDIM sampling with classifier-free guidance; returns uint8 images."""
        n = len(captions)
        context = torch.cat([self.encode_text([""] * n), self.encode_text(captions)])
        c = self.unet.config
        latents = torch.randn((n, c.in_channels, c.sample_size, c.sample_size), generator=gen)
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            eps_uncond, eps_cond = self.unet(torch.cat([latents, latents]), t, context).sample.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            latents = self.scheduler.step(eps, t, latents).prev_sample
        return self.decode(latents)


@dataclass
class FlowPipeline:
    """A shapes-flow folder in diffusers' own StableDiffusion3Pipeline (float32)."""

    pipe: StableDiffusion3Pipeline

    @classmethod
    def load(cls, folder: Path) -> FlowPipeline:
        pipe = load_flow_pipeline(folder)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe)

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipe.vae

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the transformer's latents, (mean - shift_factor) * scaling_factor."""
        c = self.vae.config
        return (self.vae.encode(images).latent_dist.mean - c.shift_factor) * c.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """The transformer's latents -> uint8 (N, 64, 64, 3) images, decoded as the SD3 pipeline decodes."""
        c = self.vae.config
        images = self.vae.decode(latents / c.scaling_factor + c.shift_factor).sample
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    @torch.no_grad()
    def generate(self, captions: list[str], steps: int, guidance: float, gen: torch.Generator) -> np.ndarray:
        """The pipeline's own sampling (negative prompt "", as at training's empty captions); uint8 images."""
        images = self.pipe(prompt=captions, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                           output_type="np").images
        return (images * 255).round().astype(np.uint8)


def load_pipeline(folder: Path) -> Pipeline | FlowPipeline:
    """The folder's pipeline: shapes-flow when its model_index names StableDiffusion3Pipeline, else the UNet one."""
    index = json.loads((folder / "model_index.json").read_text())
    return FlowPipeline.load(folder) if index["_class_name"] == "StableDiffusion3Pipeline" else Pipeline.load(folder)


def vae_report(pipe: Pipeline | FlowPipeline, n: int = 256, seed: int = 1234) -> dict[str, float]:
    """Round trip `n` fresh world images through the VAE (posterior mean) and measure what survives."""
    rng = np.random.default_rng(seed)
    cases = [sample_case(rng) for _ in range(n)]
    rendered = [render_array(c) for c in cases]
    images = torch.from_numpy(np.stack([r[0] for r in rendered])).permute(0, 3, 1, 2).float() / 127.5 - 1
    decoded = pipe.decode(pipe.encode(images))
    ious, dots, bg = [], [], []
    for case, (img, mask, _), out in zip(cases, rendered, decoded, strict=True):
        ious.append(metrics.iou(metrics.colour_mask(out, case.colour, case.background), mask))
        dots.append(metrics.dots_kept(out, list(case.dots)))
        bg.append(metrics.background_change(img, out, mask))
    l1 = float(np.abs(decoded.astype(np.float32) - np.stack([r[0] for r in rendered])).mean() / 255)
    return {"l1": l1, "iou_median": float(np.median(ious)), "iou_mean": float(np.mean(ious)),
            "iou_min": float(np.min(ious)), "dots_kept": float(np.mean(dots)), "background_change": float(np.mean(bg))}


def generation_report(
    pipe: Pipeline | FlowPipeline, n: int = 40, steps: int = 40, guidance: float = 6.0, seed: int = 0, batch: int = 20
) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """Generate `n` images for captions cycling through all full captions; score colour, shape, background."""
    wanted = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(wanted))
    targets = [wanted[order[i % len(wanted)]] for i in range(n)]
    captions = [make_caption(c, s, b) for c, s, b in targets]
    gen = torch.Generator().manual_seed(seed)
    images = np.concatenate([pipe.generate(captions[i : i + batch], steps, guidance, gen) for i in range(0, n, batch)])
    right = {"colour": 0, "shape": 0, "background": 0, "all": 0}
    fits = []
    for (colour, shape, background), img in zip(targets, images, strict=True):
        r = metrics.read_image(img)
        ok = {"colour": r.colour == colour, "shape": r.shape == shape, "background": r.background == background}
        for k, v in ok.items():
            right[k] += v
        right["all"] += all(ok.values())
        fits.append(r.shape_fit)
    report = {f"{k}_right": v / n for k, v in right.items()}
    report["shape_fit_median"] = float(np.median(fits))
    return report, images, captions


def save_grid(images: np.ndarray, path: Path, cols: int = 10, scale: int = 2) -> None:
    """Tile uint8 images into one PNG."""
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = img
    Image.fromarray(grid).resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shapes_training.sanity", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a folder written by shapes_training.train or .train_flow")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", type=Path, default=None, help="save the samples as one PNG")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.folder)
    result: dict[str, Any] = {"vae": vae_report(pipe)}
    gen, images, captions = generation_report(pipe, args.n, args.steps, args.guidance, args.seed)
    result["generation"] = gen
    print(json.dumps(result, indent=2))
    if args.grid:
        save_grid(images, args.grid)


if __name__ == "__main__":
    main()
