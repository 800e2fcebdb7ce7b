"""A pool of VAE-encoded world images for UNet training, encoded once instead of at every step.

On two CPU cores the VAE encoder costs about a fifth of a UNet training step, so encoding a pool of
images once and drawing batches from it (with a fresh posterior sample each time) buys more UNet
steps in the same time. The pool stores each image's posterior mean and std and its case's labels,
from which captions (full, short, or empty for classifier-free guidance) are made at draw time.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # workers import this module: keep diffusers out of their start-up
    from diffusers import AutoencoderKL

from ddsedit.shapes.world import BACKGROUNDS, COLOURS, SHAPES, make_caption, render_batch, sample_case


@dataclass
class LatentPool:
    """Posterior means and stds (N, C, h, w) of N world images, with their (shape, colour, background)."""

    mean: torch.Tensor
    std: torch.Tensor
    labels: np.ndarray  # (N, 3) int: indices into SHAPES, COLOURS, BACKGROUNDS

    @classmethod
    @torch.no_grad()
    def encode(
        cls, vae: AutoencoderKL, n: int, seed: int, batch: int = 64, workers: int = 1
    ) -> LatentPool:
        """Render and encode `n` random images with `vae` (in eval mode, on its device).

        Chunk i of `batch` images is drawn from its own generator seeded by (seed, i), so the pool is the
        same whatever the number of `workers` rendering the chunks in parallel.
        """
        vae.eval()
        device = next(vae.parameters()).device
        sizes = [min(batch, n - start) for start in range(0, n, batch)]
        jobs = [(seed, i, size) for i, size in enumerate(sizes)]
        means, stds, labels = [], [], []
        # "spawn": forked workers of a process that has run torch's thread pools can hang
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) if workers > 1 else nullcontext() as pool:
            # one worker renders here: no process start-up cost
            chunks = pool.map(_render_chunk, jobs) if pool is not None else map(_render_chunk, jobs)
            for images, chunk_labels in chunks:
                posterior = vae.encode(images.to(device)).latent_dist
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.float().cpu())
                labels.append(chunk_labels)
        return cls(torch.cat(means), torch.cat(stds), np.concatenate(labels))

    def save(self, path: Path) -> None:
        torch.save({"mean": self.mean, "std": self.std, "labels": torch.from_numpy(self.labels)}, path)

    @classmethod
    def load(cls, path: Path) -> LatentPool:
        d = torch.load(path, map_location="cpu")
        return cls(d["mean"], d["std"], d["labels"].numpy())

    def __len__(self) -> int:
        return self.mean.shape[0]

    def draw(
        self,
        n: int,
        rng: np.random.Generator,
        gen: torch.Generator,
        short_caption_prob: float = 0.0,
        empty_caption_prob: float = 0.0,
    ) -> tuple[torch.Tensor, list[str]]:
        """`n` posterior samples (unscaled latents) of random pool images, and their captions."""
        idx = torch.from_numpy(rng.integers(len(self), size=n))
        latents = self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=gen)
        shapes, colours, backgrounds = list(SHAPES), list(COLOURS), list(BACKGROUNDS)
        captions = []
        for s, c, b in self.labels[idx.numpy()]:
            u = rng.random()
            if u < empty_caption_prob:
                captions.append("")
            else:
                background = backgrounds[b] if u >= empty_caption_prob + short_caption_prob else None
                captions.append(make_caption(colours[c], shapes[s], background))
        return latents, captions


def _render_chunk(job: tuple[int, int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """Images and (shape, colour, background) indices of chunk `index` (a worker's unit of work)."""
    seed, index, size = job
    rng = np.random.default_rng([seed, index])
    cases = [sample_case(rng) for _ in range(size)]
    shapes, colours, backgrounds = list(SHAPES), list(COLOURS), list(BACKGROUNDS)
    labels = [(shapes.index(c.shape), colours.index(c.colour), backgrounds.index(c.background)) for c in cases]
    return render_batch(cases)[0], np.array(labels, dtype=np.int64).reshape(-1, 3)
