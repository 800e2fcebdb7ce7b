"""The engine against an independent reference written from the DDS paper's algorithm.

The reference (:class:`ReferenceDDS`) is built only from torch, diffusers and transformers,
as the DDS authors' code is (Hertz et al. 2023, google/prompt-to-prompt's DDS notebook): it
loads the tiny model's parts itself, encodes each prompt with its own text-encoder call,
noises with ``sqrt(alpha_bar) z + sqrt(1 - alpha_bar) eps`` from the scheduler's
``alphas_cumprod``, runs the UNet for the unconditional and the conditional prompt of the
source and of the target separately, mixes them with classifier-free guidance, and takes a
``torch.optim.SGD`` step by autograd on ``2000 * sum(z * grad) / (h * w)`` with ``grad``
held fixed. It shares no function with ``ddsedit``; the engine is only called, through
:meth:`ddsedit.editor.Editor.edit` as a user calls it, and its per-step latents are read
by wrapping the loop it calls (the wrapper changes nothing the loop computes).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from engine_support import edit_trajectory
from PIL import Image, ImageDraw
from transformers import CLIPTextModel, CLIPTokenizer

# The paper's code backpropagates ``2000 * sum(z * grad) / (h * w)``, h * w being the real
# latent's pixel count. ddsedit documents (scores.py, EditConfig) that it divides by SD's
# 64 * 64 whatever the size, so that a step does not grow as the image shrinks. The same
# update therefore needs, in the reference, ``lr_reference = lr_engine * h * w / (64 * 64)``:
# these constants are written here from that documentation, not imported, so that a change
# of the engine's scaling fails this test.
PAPER_LOSS_SCALE = 2000.0
ENGINE_FIXED_LATENT_PIXELS = 64 * 64

# Both sides run the same fp32 weights on the same CPU but batch differently: the engine makes
# one UNet call of 4 samples, the reference 4 calls of 1. The UNet's kernels then round
# differently: measured here, outputs of size ~1 differ by ~1.6e-6. Guidance multiplies a
# difference of two predictions by 7.5, and DDS subtracts two guided predictions, so the
# gradient differs by up to ~1.6e-5 and one step (0.5 * 2000 / 4096 = 0.244 times the
# gradient) moves the latents ~4e-6 apart; over the 6 steps the measured gap stays below
# 1.2e-5. ATOL leaves ~8x for other CPUs' kernels. The latents move by 0.07 to 2.4 over the
# run, and the smallest wrong formula tried (guidance 7.4 instead of 7.5) shifts them by
# ~1e-3, so this tolerance hides rounding only. The error is absolute (rounding of
# predictions of size ~1), not relative to latents that pass through 0, hence RTOL = 0.
ATOL = 1e-4
RTOL = 0.0
STEPS = 6

# Latent cells of the masked-DDS test's editable rectangle (the tiny VAE's stride is 2).
MASK_ROWS, MASK_COLUMNS = slice(2, 10), slice(4, 12)


@dataclass(frozen=True)
class Settings:
    """One edit's settings, spelled out for both sides (not the engine's defaults)."""

    steps: int = STEPS
    guidance: float = 7.5
    lr: float = 0.5  # larger than the paper's 0.1 so that 6 steps move the latents well clear of rounding
    t_min: int = 50
    t_max: int = 950  # exclusive, as torch.randint's high in the paper's code
    seed: int = 1234
    negative: str = ""


class ReferenceDDS:
    """SDS / DDS / masked DDS as the paper's code runs them, on a diffusers model folder."""

    def __init__(self, folder: Path) -> None:
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
        self.prediction_type = scheduler.config.prediction_type

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

    @torch.no_grad()
    def guided_epsilon(
        self, noisy: torch.Tensor, timestep: torch.Tensor, alpha_bar: torch.Tensor,
        unconditional: torch.Tensor, conditional: torch.Tensor, guidance: float,
    ) -> torch.Tensor:  # fmt: skip
        """Classifier-free guided noise prediction, one UNet call per prompt."""
        predictions = []
        for text in (unconditional, conditional):
            output = self.unet(noisy, timestep, encoder_hidden_states=text).sample
            if self.prediction_type == "v_prediction":
                # v = sqrt(a) eps - sqrt(1-a) x0 and x_t = sqrt(a) x0 + sqrt(1-a) eps solve to this eps.
                output = alpha_bar.sqrt() * output + (1.0 - alpha_bar).sqrt() * noisy
            predictions.append(output)
        unconditional_eps, conditional_eps = predictions
        return unconditional_eps + guidance * (conditional_eps - unconditional_eps)

    def edit(
        self, image: Image.Image, method: str, query: str, ref: str, settings: Settings,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """Run ``settings.steps`` steps; return the source latents and the latents after each step."""
        source = self.encode(image)
        unconditional = self.embed(settings.negative)
        target_text = self.embed(query)
        source_text = self.embed(ref) if method != "sds" else None
        height, width = source.shape[-2:]
        latents = source.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([latents], lr=settings.lr * height * width / ENGINE_FIXED_LATENT_PIXELS)
        # ddsedit draws (optimize.draw_step) from one CPU generator seeded with the edit's seed: per
        # step a timestep in [t_min, t_max), then a standard normal noise of the latent's shape.
        # Making the same draws here gives both runs the same t and noise without sharing code.
        generator = torch.Generator().manual_seed(settings.seed)
        trajectory = []
        for _ in range(settings.steps):
            timestep = torch.randint(settings.t_min, settings.t_max, (1,), generator=generator)
            noise = torch.randn(source.shape, generator=generator)
            alpha_bar = self.alphas_cumprod[timestep]
            with torch.no_grad():
                noisy = alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise
                target_eps = self.guided_epsilon(
                    noisy, timestep, alpha_bar, unconditional, target_text, settings.guidance
                )
                if source_text is None:
                    gradient = target_eps - noise
                else:
                    # DDS: the same timestep and noise on the source, so the shared noise cancels.
                    noisy_source = alpha_bar.sqrt() * source + (1.0 - alpha_bar).sqrt() * noise
                    source_eps = self.guided_epsilon(
                        noisy_source, timestep, alpha_bar, unconditional, source_text, settings.guidance
                    )
                    gradient = target_eps - source_eps
                if mask is not None:
                    gradient = gradient * mask
            loss = PAPER_LOSS_SCALE * (latents * gradient.detach()).sum() / (height * width)
            optimizer.zero_grad()
            loss.backward()
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
    config = editor.config(
        steps=settings.steps, guidance=settings.guidance, lr=settings.lr, t_min=settings.t_min,
        t_max=settings.t_max, seed=settings.seed, negative=settings.negative,
    )  # fmt: skip
    return edit_trajectory(monkeypatch, editor, image, method, query, ref if method != "sds" else None, mask, config)


def _source_image() -> Image.Image:
    """A 32x32 picture (the tiny model's working size, so nothing is resized) with some structure."""
    rows, columns = np.mgrid[0:32, 0:32]
    array = np.stack([rows * 7 % 256, columns * 5 % 256, (rows + columns) * 3 % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(array)
    ImageDraw.Draw(image).ellipse((6, 6, 22, 22), fill=(220, 40, 40))
    return image


def _mask_image() -> Image.Image:
    """White over pixels whose latent cells are MASK_ROWS x MASK_COLUMNS, black elsewhere."""
    mask = Image.new("L", (32, 32), 0)
    left, right = 2 * MASK_COLUMNS.start, 2 * MASK_COLUMNS.stop - 1
    top, bottom = 2 * MASK_ROWS.start, 2 * MASK_ROWS.stop - 1
    ImageDraw.Draw(mask).rectangle((left, top, right, bottom), fill=255)
    return mask


def _latent_mask() -> torch.Tensor:
    """The mask of :func:`_mask_image` at latent resolution, written down directly: [1, 1, 16, 16]."""
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., MASK_ROWS, MASK_COLUMNS] = 1.0
    return mask


@pytest.mark.parametrize(
    ("model", "method"),
    [
        ("tiny_model_dir", "dds"),
        ("tiny_v_model_dir", "dds"),
        ("tiny_model_dir", "masked-dds"),
        ("tiny_model_dir", "sds"),
        ("tiny_v_model_dir", "sds"),
    ],
)
def test_engine_steps_match_the_reference(
    model: str, method: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of STEPS steps of the engine's edit gives the reference's latents, up to fp32 rounding."""
    folder = request.getfixturevalue(model)
    settings = Settings()
    image = _source_image()
    ref, query = "a photo of a red circle", "a painting of a blue square"
    masked = method == "masked-dds"
    reference = ReferenceDDS(folder)
    assert reference.prediction_type == ("v_prediction" if model == "tiny_v_model_dir" else "epsilon")
    expected_source, expected = reference.edit(
        image, method, query, ref, settings, mask=_latent_mask() if masked else None
    )
    source, trajectory = run_engine(
        folder, image, method, query, ref, settings, monkeypatch, mask=_mask_image() if masked else None
    )
    assert source.shape == (1, 4, 16, 16)
    torch.testing.assert_close(source, expected_source, atol=ATOL, rtol=RTOL)
    assert len(trajectory) == len(expected) == settings.steps
    for step, (latents, reference_latents) in enumerate(zip(trajectory, expected, strict=True), start=1):
        torch.testing.assert_close(
            latents, reference_latents, atol=ATOL, rtol=RTOL, msg=lambda text, step=step: f"step {step}: {text}"
        )
    # The comparison means something only if the latents moved far beyond the tolerance.
    assert (expected[-1] - expected_source).abs().max() > 100 * ATOL
    if masked:
        outside = _latent_mask() == 0
        assert torch.equal(trajectory[-1][outside.expand_as(source)], source[outside.expand_as(source)])


def test_the_reference_shares_no_code_with_ddsedit() -> None:
    """The reference must stay independent, or agreeing with it proves nothing.

    Every global name its methods use must come from outside ``ddsedit`` (comments may name it).
    """
    names: set[str] = set()
    # Unwrapped: torch.no_grad() wraps a method, and the wrapper's code names none of the method's globals.
    methods = [inspect.unwrap(member) for member in vars(ReferenceDDS).values() if inspect.isfunction(member)]
    pending = [method.__code__ for method in methods]
    while pending:
        code = pending.pop()
        names.update(code.co_names)
        pending.extend(const for const in code.co_consts if inspect.iscode(const))
    used = {name: globals()[name] for name in names if name in globals()}
    assert used, "the scan found no global names: it is not looking at the reference"
    for name, value in used.items():
        module = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", "") or ""
        assert not module.startswith("ddsedit"), f"the reference uses {name} from {module}"
