"""cds, pds and ids against independent references written from the methods' equations.

The reference (:class:`ReferenceMethods`) follows the project issue's statement of each method
(PDS: Koo et al. 2024; CDS: Nam et al. 2024; IDS: Kim et al. 2025), as
tests/test_reference_dds.py does for DDS: it loads the tiny model's parts with diffusers and
transformers itself, runs the UNet once per prompt (no batching), captures the self-attention
features with plain ``register_forward_hook`` hooks, writes PatchNCE row by row, and steps with
``torch.optim.SGD`` on the authors' loss by autograd. It shares no function with ``ddsedit``
(:func:`test_the_reference_shares_no_code_with_ddsedit` checks that); the engine is only called
through :meth:`ddsedit.editor.Editor.edit`, and its per-step latents are read by wrapping the loop
it calls (the wrapper only observes).

The reference makes the engine's random draws with its own generator, in the order that
``ddsedit.optimize.draw_step`` and ``ddsedit.methods`` document: per step t (pds: an index into
the grid), the noise (pds: then the second noise), then cds/ids's patch positions. The tests are
coupled to that order on purpose: the same draws are what make a step-by-step comparison possible.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from engine_support import edit_trajectory
from PIL import Image, ImageDraw
from transformers import CLIPTextModel, CLIPTokenizer

# The authors' code (DDS, and CDS on top of it) steps on ``2000 * sum(z * grad) / (h * w)`` with
# h * w = 64 * 64 for SD's 512 px images. ddsedit documents (scores.py, EditConfig) that it keeps
# 64 * 64 whatever the latent's size, and the issue states that the CUT term is added unscaled
# beside it (``dds_weight * 2000 * sum(z * grad) / 4096 + cut_weight * CUT``). The reference
# therefore steps on exactly that loss with the engine's lr. Written here, not imported, so that a
# change of the engine's scaling fails these tests.
PAPER_LOSS_SCALE = 2000.0
FIXED_LATENT_PIXELS = 64 * 64

# Rounding, measured on this machine's CPU: the engine runs one UNet call of 4 samples where the
# reference runs 4 calls of 1, so the kernels round differently, ~1.6e-6 on outputs of size ~1
# (test_reference_dds.py measured the same). Guidance (x7.5) and each method's own factors carry that
# into the gradient, and 5 steps of 0.5 * 2000 / 4096 = 0.244 times it accumulate. Largest latent gap
# over the 5 steps, engine against reference:
#   pds: 4.6e-6 (eps model), 5.3e-6 (v model, grid 25): the gradient is ~0.4 to 0.8 times the
#        guided-prediction difference, where DDS's is 1 times it;
#   cds: 1.1e-5 (defaults), 2.4e-6 (cds-subset), 6.1e-6 (v), 1.5e-5 (15x13 latent), 1.1e-5 (masked):
#        the CUT term is cut_weight / GRADIENT_SCALE = 6.1 times d(PatchNCE)/dz, and PatchNCE divides
#        feature similarities (rounded ~1e-6) by 0.07;
#   ids: 1.3e-5 (eps), 5.7e-6 (v), 1.1e-5 (with CUT): eps* divides by sqrt(1 - alpha_bar) (>= 0.22
#        for t >= 50) and each correction differentiates through the UNet.
# ATOL = 1e-4 leaves ~6.5x over the largest, for other CPUs' kernels. The latents move 0.12 to 0.45
# over a run (asserted below to be > 100 * ATOL). Of the wrong formulas tried on the engine (listed
# in the commit message), the least visible (the positive kept among PatchNCE's negatives, the source
# features taken from the unconditional rows) put the latents 1.1e-4 to 1e-3 off at the step where
# they first fail in the default-weight cases, and 7.8e-3 off in cds-subset, whose CUT-heavy weights
# (dds_weight 0.2, cut_weight 15) are there to make the contrastive term's details stand out; its
# rounding gap is 2.4e-6. The errors are absolute (rounding of quantities of size ~1, latents that
# pass through 0), hence RTOL = 0.
ATOL = 1e-4
RTOL = 0.0
STEPS = 5


@dataclass(frozen=True)
class Settings:
    """One edit's settings, all spelled out for both sides (none is left to the engine's defaults)."""

    steps: int = STEPS
    guidance: float = 7.5
    lr: float = 0.5  # larger than the papers' so that 5 steps move the latents well clear of rounding
    t_min: int = 50
    t_max: int = 950  # exclusive
    seed: int = 1234
    negative: str = ""
    size: int = 32  # the tiny model's working size: a 32x32 image is not resized
    dds_weight: float = 1.0
    cut_weight: float = 3.0
    cut_patches: int = 256
    cut_patch_sizes: tuple[int, ...] = (1, 2)
    cut_temperature: float = 0.07
    pds_grid: int = 500
    identity_steps: int = 3
    identity_weight: float = 1.0

    def engine_overrides(self, method: str) -> dict[str, Any]:
        """Every field ``method`` reads, as an :meth:`Editor.config` override."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key not in OTHER_METHODS[method]}


_CUT = {"dds_weight", "cut_weight", "cut_patches", "cut_patch_sizes", "cut_temperature"}
_IDENTITY = {"identity_steps", "identity_weight"}
OTHER_METHODS = {"pds": _CUT | _IDENTITY, "cds": _IDENTITY | {"pds_grid"}, "ids": {"pds_grid"}}


class ReferenceMethods:
    """PDS, CDS and IDS as the issue's equations state them, on a diffusers model folder."""

    def __init__(self, folder: Path) -> None:
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval().requires_grad_(False)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.scheduler_config = dict(scheduler.config)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
        self.betas = scheduler.betas.to(torch.float32)  # one training step's, as the PDS authors take them
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = scheduler.config.prediction_type
        # CDS's layers: every self-attention module of the decoder (up blocks), by name.
        self.self_attention = {
            name: module for name, module in self.unet.named_modules()
            if name.startswith("up_blocks.") and name.endswith(".attn1")
        }  # fmt: skip

    # ------------------------------------------------------------------ model calls

    @torch.no_grad()
    def embed(self, prompt: str) -> torch.Tensor:
        """One prompt, one text-encoder call: [1, tokens, dim]."""
        ids = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        return self.text_encoder(ids).last_hidden_state

    @torch.no_grad()
    def encode(self, image: Image.Image) -> torch.Tensor:
        """An RGB image at the working size -> the VAE posterior's mean, scaled: [1, 4, h, w]."""
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    @contextmanager
    def captured(self, features: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """While open, each up-block attn1 module's output goes in ``features`` (None: nothing is kept).

        The Attention module returns its processor's output (after the output projection); the
        transformer block adds the residual outside it, so a forward hook sees the pre-residual features.
        """
        handles = []
        if features is not None:
            for name, module in self.self_attention.items():

                def keep(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor, name: str = name) -> None:
                    features[name] = output

                handles.append(module.register_forward_hook(keep))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def epsilon(
        self, noisy: torch.Tensor, timestep: torch.Tensor, alpha_bar: torch.Tensor, text: torch.Tensor,
        features: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """One UNet call for one prompt, as a noise prediction (autograd follows the caller's mode)."""
        with self.captured(features):
            output = self.unet(noisy, timestep, encoder_hidden_states=text).sample
        if self.prediction_type == "v_prediction":
            # v = sqrt(a) eps - sqrt(1-a) x0 and x_t = sqrt(a) x0 + sqrt(1-a) eps solve to this eps.
            output = alpha_bar.sqrt() * output + (1.0 - alpha_bar).sqrt() * noisy
        return output

    def guided(
        self, noisy: torch.Tensor, timestep: torch.Tensor, alpha_bar: torch.Tensor, unconditional: torch.Tensor,
        conditional: torch.Tensor, guidance: float, features: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Classifier-free guided noise prediction; ``features`` receives the conditional call's."""
        unconditional_eps = self.epsilon(noisy, timestep, alpha_bar, unconditional)
        conditional_eps = self.epsilon(noisy, timestep, alpha_bar, conditional, features)
        return unconditional_eps + guidance * (conditional_eps - unconditional_eps)

    # ------------------------------------------------------------------ PDS

    def standardized_posterior_sample(
        self, clean: torch.Tensor, noise: torch.Tensor, previous_noise: torch.Tensor, timestep: torch.Tensor,
        previous_timestep: torch.Tensor, unconditional: torch.Tensor, text: torch.Tensor, guidance: float,
    ) -> torch.Tensor:  # fmt: skip
        """z = (x_prev - mu) / sigma for one branch, as the PDS authors' pds.py computes it: the ONE-step beta_t and
        alpha_t = 1 - beta_t of the training schedule at t, with the cumulative products at t and at the grid's
        previous step (issue #20)."""
        alpha_bar = self.alphas_cumprod[timestep]
        alpha_bar_prev = self.alphas_cumprod[previous_timestep]
        beta_t = self.betas[timestep]
        alpha_t = 1.0 - beta_t
        x_t = alpha_bar.sqrt() * clean + (1.0 - alpha_bar).sqrt() * noise
        e = self.guided(x_t, timestep, alpha_bar, unconditional, text, guidance)
        x0_hat = (x_t - (1.0 - alpha_bar).sqrt() * e) / alpha_bar.sqrt()
        c0 = alpha_bar_prev.sqrt() * beta_t / (1.0 - alpha_bar)
        c1 = alpha_t.sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        mu = c0 * x0_hat + c1 * x_t
        sigma = ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta_t).sqrt()
        x_prev = alpha_bar_prev.sqrt() * clean + (1.0 - alpha_bar_prev).sqrt() * previous_noise
        return (x_prev - mu) / sigma

    def pds_grid(self, settings: Settings) -> list[tuple[int, int]]:
        """The (t, t_prev) pairs t may take: the scheduler's own DDIM grid of ``pds_grid`` steps in ascending order,
        indices from int(2% of its length) to int(98%) (exclusive), t in [t_min, t_max), t_prev the point before."""
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(settings.pds_grid)
        ascending = [int(t) for t in reversed(scheduler.timesteps)]
        low, high = int(settings.pds_grid * 0.02), int(settings.pds_grid * 0.98)
        return [(ascending[i], ascending[i - 1]) for i in range(low, high)
                if settings.t_min <= ascending[i] < settings.t_max]  # fmt: skip

    # ------------------------------------------------------------------ CDS's contrastive loss

    @staticmethod
    def feature_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[1, positions, C] tokens of a layer as a [C, H, W] map; H x W is the latent over a power of 2."""
        positions, channels = tokens.shape[1:]
        factor = round(math.sqrt(height * width / positions))
        rows, columns = height // factor, width // factor
        assert rows * columns == positions, "the reference handles latents whose levels divide exactly"
        return tokens[0].reshape(rows, columns, channels).permute(2, 0, 1)

    @staticmethod
    def average_pooled(feature_map: torch.Tensor, size: int) -> torch.Tensor:
        """size x size average pooling without overlap (rows/columns beyond a whole patch are dropped)."""
        if size == 1:
            return feature_map
        channels, height, width = feature_map.shape
        rows, columns = height // size, width // size
        cropped = feature_map[:, : rows * size, : columns * size]
        return cropped.reshape(channels, rows, size, columns, size).mean(dim=(2, 4))

    @staticmethod
    def patch_nce(source_rows: torch.Tensor, target_rows: torch.Tensor, temperature: float) -> torch.Tensor:
        """Row by row: logits_i = [<s_i, t_i>, <s_i, t_j> for j != i] / T, cross-entropy with the positive first."""
        count = source_rows.shape[0]
        total = source_rows.new_zeros(())
        for i in range(count):
            similarities = target_rows @ source_rows[i] / temperature  # <s_i, t_j> for every j
            logits = torch.cat([similarities[i : i + 1], similarities[:i], similarities[i + 1 :]])
            total = total + torch.logsumexp(logits, dim=0) - logits[0]
        return total / count

    def cut_loss(
        self, source_features: dict[str, torch.Tensor], target_features: dict[str, torch.Tensor],
        height: int, width: int, generator: torch.Generator, settings: Settings,
    ) -> torch.Tensor:  # fmt: skip
        """PatchNCE summed over the layers (sorted by module name) and the patch sizes (in the given order)."""
        loss = torch.zeros(())
        for name in sorted(self.self_attention):
            source_map = self.feature_map(source_features[name].detach(), height, width)
            target_map = self.feature_map(target_features[name], height, width)
            for size in settings.cut_patch_sizes:
                source_rows = self.average_pooled(source_map, size).flatten(1).T  # [positions, C]
                target_rows = self.average_pooled(target_map, size).flatten(1).T
                source_rows = source_rows / source_rows.norm(dim=1, keepdim=True)
                target_rows = target_rows / target_rows.norm(dim=1, keepdim=True)
                positions = source_rows.shape[0]
                # Coupled to the engine's order: one permutation per layer and size, after the step's t and noise.
                chosen = torch.randperm(positions, generator=generator)[: min(settings.cut_patches, positions)]
                loss = loss + self.patch_nce(source_rows[chosen], target_rows[chosen], settings.cut_temperature)
        return loss

    # ------------------------------------------------------------------ IDS

    def identity_noise(
        self, source: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor, unconditional: torch.Tensor,
        source_text: torch.Tensor, settings: Settings,
    ) -> torch.Tensor:  # fmt: skip
        """eps* after N steps of z_t -= lambda * grad ||z_src - x0hat(z_t, ref)||_2, from z_t = noised source."""
        alpha_bar = self.alphas_cumprod[timestep]
        z_t = alpha_bar.sqrt() * source + (1.0 - alpha_bar).sqrt() * noise
        for _ in range(settings.identity_steps):
            variable = z_t.detach().requires_grad_(True)
            with torch.enable_grad():
                e = self.guided(variable, timestep, alpha_bar, unconditional, source_text, settings.guidance)
                x0_hat = (variable - (1.0 - alpha_bar).sqrt() * e) / alpha_bar.sqrt()
                distance = torch.linalg.vector_norm(source - x0_hat)  # the norm itself, one image
                (gradient,) = torch.autograd.grad(distance, variable)
            z_t = z_t - settings.identity_weight * gradient
        return (z_t - alpha_bar.sqrt() * source) / (1.0 - alpha_bar).sqrt()

    # ------------------------------------------------------------------ the edit

    def edit(
        self, image: Image.Image, method: str, query: str, ref: str, settings: Settings,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """Run ``settings.steps`` steps of ``method``; return the source latents and the latents after each step."""
        source = self.encode(image)
        unconditional = self.embed(settings.negative)
        target_text = self.embed(query)
        source_text = self.embed(ref)
        height, width = source.shape[-2:]
        latents = source.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([latents], lr=settings.lr)
        generator = torch.Generator().manual_seed(settings.seed)
        grid = self.pds_grid(settings)
        trajectory = []
        for _ in range(settings.steps):
            if method == "pds":
                index = torch.randint(0, len(grid), (1,), generator=generator)
                timestep, previous_timestep = (torch.tensor([t]) for t in grid[int(index)])
                noise = torch.randn(source.shape, generator=generator)
                previous_noise = torch.randn(source.shape, generator=generator)
            else:
                timestep = torch.randint(settings.t_min, settings.t_max, (1,), generator=generator)
                noise = torch.randn(source.shape, generator=generator)
            alpha_bar = self.alphas_cumprod[timestep]
            contrast = None
            with torch.no_grad():
                if method == "pds":
                    posterior = [
                        self.standardized_posterior_sample(
                            clean, noise, previous_noise, timestep, previous_timestep, unconditional, text,
                            settings.guidance,
                        )
                        for clean, text in ((latents, target_text), (source, source_text))
                    ]  # fmt: skip
                    gradient = posterior[0] - posterior[1]
                else:
                    if method == "ids":
                        noise = self.identity_noise(source, noise, timestep, unconditional, source_text, settings)
                    source_features: dict[str, torch.Tensor] = {}
                    noisy_source = alpha_bar.sqrt() * source + (1.0 - alpha_bar).sqrt() * noise
                    noisy_target = alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise
                    source_eps = self.guided(
                        noisy_source, timestep, alpha_bar, unconditional, source_text, settings.guidance,
                        features=source_features,
                    )  # fmt: skip
                    target_eps = self.guided(
                        noisy_target, timestep, alpha_bar, unconditional, target_text, settings.guidance
                    )
                    gradient = settings.dds_weight * (target_eps - source_eps)
                    if settings.cut_weight > 0:
                        contrast = source_features
            loss = PAPER_LOSS_SCALE * (latents * gradient.detach()).sum() / FIXED_LATENT_PIXELS
            if contrast is not None:
                # The target's features: a conditional pass on its noised latents, with autograd, same t and noise.
                target_features: dict[str, torch.Tensor] = {}
                noisy = alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise
                self.epsilon(noisy, timestep, alpha_bar, target_text, target_features)
                cut = self.cut_loss(contrast, target_features, height, width, generator, settings)
                loss = loss + settings.cut_weight * cut
            optimizer.zero_grad()
            loss.backward()
            if mask is not None:
                latents.grad.mul_(mask)  # the masked variant scales the whole step
            optimizer.step()
            trajectory.append(latents.detach().clone())
        return source, trajectory


def run_engine(
    folder: Path, image: Image.Image, method: str, query: str, ref: str, settings: Settings,
    monkeypatch: pytest.MonkeyPatch, mask: Image.Image | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """Edit with ddsedit's public API; return its source latents and its latents after each step."""
    from ddsedit.editor import Editor

    editor = Editor.from_pretrained(folder, device="cpu", dtype="fp32")
    config = editor.config(method, **settings.engine_overrides(method))
    return edit_trajectory(monkeypatch, editor, image, method, query, ref, mask, config)


def source_image(width: int = 32, height: int = 32) -> Image.Image:
    """A picture with some structure at the working size (so nothing is resized)."""
    rows, columns = np.mgrid[0:height, 0:width]
    array = np.stack([rows * 7 % 256, columns * 5 % 256, (rows + columns) * 3 % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(array)
    ImageDraw.Draw(image).ellipse((6, 6, width - 10, height - 10), fill=(220, 40, 40))
    return image


# Latent cells of the masked test's editable rectangle (the tiny VAE's stride is 2).
MASK_ROWS, MASK_COLUMNS = slice(3, 11), slice(5, 14)


def mask_image() -> Image.Image:
    """White over the pixels of the latent cells MASK_ROWS x MASK_COLUMNS, black elsewhere."""
    mask = Image.new("L", (32, 32), 0)
    left, right = 2 * MASK_COLUMNS.start, 2 * MASK_COLUMNS.stop - 1
    top, bottom = 2 * MASK_ROWS.start, 2 * MASK_ROWS.stop - 1
    ImageDraw.Draw(mask).rectangle((left, top, right, bottom), fill=255)
    return mask


def latent_mask() -> torch.Tensor:
    """The mask of :func:`mask_image` at latent resolution, written down directly: [1, 1, 16, 16]."""
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., MASK_ROWS, MASK_COLUMNS] = 1.0
    return mask


REF, QUERY = "a photo of a red circle", "a painting of a blue square"

# (model fixture, method, settings, image size (w, h), masked). Non-default settings where they make the
# comparison stronger: cut_patches below the map's positions, so that which positions are drawn matters;
# sizes in the other order, so that the order of the draws matters; CUT-heavy weights (cds-subset), so that
# PatchNCE's details move the latents far beyond rounding; other grids, weights and correction counts.
CASES = {
    "pds": ("tiny_model_dir", "pds", Settings(), (32, 32), False),
    "pds-v-grid50": ("tiny_v_model_dir", "pds", Settings(pds_grid=50, t_min=1, t_max=999, seed=77), (32, 32), False),
    "pds-grid1000": ("tiny_model_dir", "pds", Settings(pds_grid=1000, seed=3), (32, 32), False),
    "cds": ("tiny_model_dir", "cds", Settings(), (32, 32), False),
    "cds-subset": ("tiny_model_dir", "cds", Settings(cut_patches=24, cut_patch_sizes=(2, 1), dds_weight=0.2,
                                                     cut_weight=15.0), (32, 32), False),
    "cds-v": ("tiny_v_model_dir", "cds", Settings(cut_patches=40, seed=5), (32, 32), False),
    "cds-odd-latent": ("tiny_model_dir", "cds", Settings(cut_patches=32, size=30), (30, 26), False),
    "cds-masked": ("tiny_model_dir", "cds", Settings(cut_patches=32), (32, 32), True),
    "ids": ("tiny_model_dir", "ids", Settings(cut_weight=0.0), (32, 32), False),
    "ids-v": ("tiny_v_model_dir", "ids", Settings(cut_weight=0.0, seed=99), (32, 32), False),
    "ids-cut": ("tiny_model_dir", "ids", Settings(cut_weight=3.0, cut_patches=32, identity_steps=2,
                                                  identity_weight=0.5), (32, 32), False),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_engine_steps_match_the_reference(
    case: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step of the engine's edit gives the reference's latents, up to fp32 rounding."""
    model, method, settings, (width, height), masked = CASES[case]
    folder = request.getfixturevalue(model)
    image = source_image(width, height)
    reference = ReferenceMethods(folder)
    assert reference.prediction_type == ("v_prediction" if model == "tiny_v_model_dir" else "epsilon")
    if method in ("cds", "ids") and settings.cut_weight > 0:
        assert len(reference.self_attention) == 2  # the tiny UNet's decoder has two self-attention layers
    expected_source, expected = reference.edit(
        image, method, QUERY, REF, settings, mask=latent_mask() if masked else None
    )
    source, trajectory = run_engine(
        folder, image, method, QUERY, REF, settings, monkeypatch, mask=mask_image() if masked else None
    )
    assert source.shape == (1, 4, height // 2, width // 2)
    torch.testing.assert_close(source, expected_source, atol=ATOL, rtol=RTOL)
    assert len(trajectory) == len(expected) == settings.steps
    for step, (latents, reference_latents) in enumerate(zip(trajectory, expected, strict=True), start=1):
        torch.testing.assert_close(
            latents, reference_latents, atol=ATOL, rtol=RTOL, msg=lambda text, step=step: f"step {step}: {text}"
        )
    # The comparison means something only if the latents moved far beyond the tolerance.
    assert (expected[-1] - expected_source).abs().max() > 100 * ATOL
    if masked:
        outside = (latent_mask() == 0).expand_as(source)
        assert torch.equal(trajectory[-1][outside], source[outside])  # exactly: a zero gradient there


@pytest.mark.parametrize(
    ("method", "settings", "without"),
    [
        ("cds", Settings(steps=3, cut_patches=32), Settings(steps=3, cut_patches=32, cut_weight=0.0)),
        ("ids", Settings(steps=3, cut_weight=0.0), Settings(steps=3, cut_weight=0.0, identity_steps=0)),
    ],
)
def test_the_extra_term_moves_the_latents_well_beyond_the_tolerance(
    method: str, settings: Settings, without: Settings, tiny_model_dir: Path
) -> None:
    """CDS's contrastive term and IDS's correction must change the run by far more than ATOL, or the
    reference comparisons above could not tell them from plain DDS."""
    reference = ReferenceMethods(tiny_model_dir)
    image = source_image()
    _, with_term = reference.edit(image, method, QUERY, REF, settings)
    _, plain = reference.edit(image, method, QUERY, REF, without)
    assert (with_term[-1] - plain[-1]).abs().max() > 100 * ATOL


def test_method_defaults_are_the_issues(tiny_editor: Any) -> None:
    """The settings the issue names as each method's defaults (the reference runs state them all explicitly)."""
    cds, pds, ids = (tiny_editor.config(method).options for method in ("cds", "pds", "ids"))
    assert (cds.dds_weight, cds.cut_weight, cds.cut_patches, tuple(cds.cut_patch_sizes), cds.cut_temperature) == (
        1.0, 3.0, 256, (1, 2), 0.07,
    )  # fmt: skip
    assert pds.pds_grid == 500  # the PDS authors' grid, over their whole 2%-98% range of it
    assert (tiny_editor.config("pds").t_min, tiny_editor.config("pds").t_max) == (1, 999)
    assert (ids.identity_steps, ids.identity_weight, ids.cut_weight) == (3, 1.0, 0.0)  # IDS: no CUT unless asked


def test_the_reference_shares_no_code_with_ddsedit() -> None:
    """The reference must stay independent, or agreeing with it proves nothing.

    Every global name its methods use must come from outside ``ddsedit`` (comments may name it).
    """
    names: set[str] = set()
    # Unwrapped: torch.no_grad() and contextmanager wrap methods, and a wrapper's code names none of their globals.
    members = [inspect.unwrap(vars(ReferenceMethods)[name]) for name in vars(ReferenceMethods)]
    functions = [getattr(member, "__func__", member) for member in members]
    pending = [function.__code__ for function in functions if inspect.isfunction(function)]
    assert len(pending) >= 12, "the scan misses the reference's methods"
    while pending:
        code = pending.pop()
        names.update(code.co_names)
        pending.extend(const for const in code.co_consts if inspect.iscode(const))
    used = {name: globals()[name] for name in names if name in globals()}
    assert used, "the scan found no global names: it is not looking at the reference"
    for name, value in used.items():
        module = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", "") or ""
        assert not module.startswith("ddsedit"), f"the reference uses {name} from {module}"
