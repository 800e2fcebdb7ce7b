"""Masks from the prompts alone (DiffEdit, Couairon et al., ICLR 2023): where the model's noise
predictions under the ref and the query prompts differ is where the edit belongs.

The source's latents are noised to the timestep of ``strength`` on a 50-step DDIM grid (t = 481 at
0.5 for SD's 1000-step schedule) with ``noises`` seeded draws; the UNet predicts the noise under each
prompt; the map is the mean over the draws and the latent channels of ``|eps_query - eps_ref|``; the
mask is where the map exceeds ``threshold`` times its mean, resized to the source and grown.

DiffEdit guides both predictions with the same unconditional one, so its guided difference is
``guidance * (eps_query - eps_ref)``: the unconditional prediction cancels, and a threshold relative to
the mean gives the same mask at every guidance scale. The map is therefore computed from the two
conditional predictions only, which saves a third of the UNet work and makes neither the guidance
scale nor a negative prompt a setting of the mask.

This module imports torch only inside the functions that make tensors (as :mod:`ddsedit.imageio`),
so that the command line can check the settings before the slow imports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFilter

from ddsedit.errors import InputError
from ddsedit.settings import MASK_PANEL, declared, setting

if TYPE_CHECKING:
    import torch

AUTO_MASK = "auto"  # the --mask value (and manifest cell) that asks for an automatic mask
DDIM_GRID_STEPS = 50  # DiffEdit's strength counts steps of a 50-step DDIM grid
# SD 1.x/2.x scheduler configs set steps_offset 1 with "leading" spacing: the grid is 1, 21, ..., 981.
DDIM_STEPS_OFFSET = 1
# A map whose largest value is below this fraction of a typical noise prediction's size is flat:
# the prompts are the same to the model (float rounding between batch rows is far smaller).
FLAT_TOLERANCE = 1e-4
SAME_PROMPTS_MESSAGE = "the prompts --ref and --query say the same thing to the model: no mask can be drawn"


@dataclass(frozen=True)
class AutoMaskSettings:
    """How an automatic mask is drawn. The defaults are DiffEdit's, and a growth that DiffEdit has not.

    ``grow`` 2 px is the paste-back seam's default width (``EditConfig.feather``): the seam blends the source
    back in over that many pixels inside the mask, and a mask that ends at the object's edge leaves a rim of
    the old colour there. Measured on the shapes eval (README, "Automatic masks"): growing by 2 px cut the old
    colour left from 2.0% to 0.2% of the shape; the IoU differences against no growth were not settled.

    ``strength``: how far the source is noised, as a fraction of a 50-step DDIM grid (0.5: t = 481);
    ``noises``: how many noise draws the map averages; ``threshold``: a latent cell is editable where the
    map exceeds this multiple of its mean (DiffEdit: clamp at 3 x mean, then > 0.5, i.e. 1.5);
    ``grow``: pixels (at the source's size) the mask is grown by; ``seed``: of the noise draws (None: the
    edit's seed, or a random one); ``chunk_size``: samples per UNet call (memory, not the result).
    """

    strength: float = setting(
        0.5, "How far the source is noised, as a fraction of a 50-step DDIM grid.", panel=MASK_PANEL,
        flags=("--mask-strength",), minimum=1 / DDIM_GRID_STEPS, maximum=1,
    )  # fmt: skip
    noises: int = setting(10, "Noise draws averaged.", panel=MASK_PANEL, flags=("--mask-noises",), minimum=1,
                          maximum=10_000)  # fmt: skip
    threshold: float = setting(
        1.5, "Editable where the prediction difference exceeds this times its mean.", panel=MASK_PANEL,
        flags=("--mask-threshold",), minimum=0, above_minimum=True, maximum=1000,
    )  # fmt: skip
    grow: int = setting(2, "Pixels to grow it by, at the source's size.", panel=MASK_PANEL, flags=("--mask-grow",),
                        minimum=0, maximum=10_000)  # fmt: skip
    seed: int | None = None
    chunk_size: int = 8

    def validate(self) -> None:
        """Raise InputError for settings that cannot work, naming the flag."""
        for item in declared(AutoMaskSettings):
            problem = item.problem(getattr(self, item.name))
            if problem:
                raise InputError(problem)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InputError(f"mask seed must be in [0, 2^63), got {self.seed}")
        if self.chunk_size < 1:
            raise InputError(f"mask chunk size must be >= 1, got {self.chunk_size}")

    def replace(self, **overrides: Any) -> AutoMaskSettings:
        """A copy with ``overrides`` applied; ``None`` values are ignored (flag not given)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise InputError(f"unknown automatic-mask setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def recorded(self) -> dict[str, Any]:
        """What an output's metadata records about the mask (and batch resume compares): all but the chunk size."""
        return {
            "mask": AUTO_MASK,
            "mask_strength": self.strength,
            "mask_noises": self.noises,
            "mask_threshold": self.threshold,
            "mask_grow": self.grow,
            "mask_seed": self.seed,
        }


def requested_settings(mask: object) -> AutoMaskSettings | None:
    """The automatic-mask settings a request's ``mask`` asks for: ``"auto"`` (the defaults), an
    :class:`AutoMaskSettings`, or None for a mask image or path (a file must then be named ``./auto``)."""
    if isinstance(mask, AutoMaskSettings):
        return mask
    if isinstance(mask, str) and mask == AUTO_MASK:
        return AutoMaskSettings()
    return None


def strength_timestep(strength: float, num_train_timesteps: int = 1000, grid_steps: int = DDIM_GRID_STEPS) -> int:
    """The timestep DiffEdit noises to: the first of the last ``int(grid_steps * strength)`` steps of the DDIM grid.

    The grid is diffusers' ``DDIMScheduler.set_timesteps(grid_steps)`` with leading spacing and
    ``steps_offset`` 1 (SD 1.x/2.x): ``ratio * k + 1`` for k = grid_steps - 1, ..., 0 with
    ``ratio = num_train_timesteps // grid_steps``; strength 0.5 is its index 25, t = 481 for 1000 steps.
    """
    kept_steps = min(int(grid_steps * strength), grid_steps)
    if kept_steps < 1:
        raise InputError(f"--mask-strength {strength} keeps no step of a {grid_steps}-step grid")
    ratio = num_train_timesteps // grid_steps
    return min(ratio * (kept_steps - 1) + DDIM_STEPS_OFFSET, num_train_timesteps - 1)


def difference_map(ref_epsilon: torch.Tensor, query_epsilon: torch.Tensor) -> torch.Tensor:
    """``|eps_query - eps_ref|`` averaged over the noise draws and the latent channels: [N, C, h, w] -> [h, w]."""
    return (query_epsilon - ref_epsilon).abs().mean(dim=(0, 1))


def is_flat(difference: torch.Tensor, ref_epsilon: torch.Tensor) -> bool:
    """Whether the prompts are the same to the model: the map is nothing next to the predictions themselves."""
    scale = float(ref_epsilon.abs().mean())
    return float(difference.max()) <= FLAT_TOLERANCE * max(scale, 1e-12)


def threshold_map(difference: torch.Tensor, ratio: float) -> torch.Tensor:
    """The cells where the map exceeds ``ratio`` times its mean (DiffEdit's clamp/3-mean/0.5 rule at ratio 1.5)."""
    return difference > ratio * difference.mean()


def map_to_mask(difference: torch.Tensor, ratio: float, size: tuple[int, int], grow: int = 0) -> Image.Image:
    """The mask at ``size`` (w, h) as a mode "L" image, 255 = editable: the map resized bilinearly, thresholded
    at ``ratio`` times its mean (taken at latent resolution), then grown by ``grow`` pixels.

    Resizing the map before thresholding gives edges that follow the map between latent cells, not
    the blocky outline of cells scaled up; the threshold is the one :func:`threshold_map` uses.
    """
    import torch.nn.functional as F

    width, height = size
    level = ratio * float(difference.mean())
    resized = F.interpolate(difference[None, None].float().cpu(), size=(height, width), mode="bilinear",
                            align_corners=False)[0, 0]  # fmt: skip
    mask = Image.fromarray(((resized > level).numpy() * 255).astype(np.uint8), mode="L")
    return grow_mask(mask, grow)


def grow_mask(mask: Image.Image, pixels: int) -> Image.Image:
    """Grow the white region of a binary "L" mask by ``pixels`` in every direction (a square neighbourhood)."""
    if pixels <= 0:
        return mask
    return mask.filter(ImageFilter.MaxFilter(2 * pixels + 1))


def mask_from_predictions(
    ref_epsilon: torch.Tensor, query_epsilon: torch.Tensor, settings: AutoMaskSettings, size: tuple[int, int]
) -> Image.Image:
    """The mask (mode "L", 255 = editable, at ``size``) that the predictions under the two prompts draw.

    Raises:
        InputError: the map is flat (the prompts are the same to the model), or the mask is empty or
            covers the whole image (the message says which setting to change).
    """
    difference = difference_map(ref_epsilon, query_epsilon)
    if is_flat(difference, ref_epsilon):
        raise InputError(SAME_PROMPTS_MESSAGE)
    mask = map_to_mask(difference, settings.threshold, size, settings.grow)
    low, high = mask.getextrema()
    if high == 0:
        raise InputError(
            f"the automatic mask is empty: no region's noise predictions differ by more than {settings.threshold} "
            "times the mean; lower --mask-threshold"
        )
    if low == 255:
        raise InputError(
            "the automatic mask covers the whole image: raise --mask-threshold or lower --mask-grow (or use dds)"
        )
    return mask


def noise_predictions(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    ref_embedding: Any,
    query_embedding: Any,
    timestep: int,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    noises: int,
    generator: torch.Generator,
    chunk_size: int,
    call: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise predictions under the ref and the query for ``noises`` noisings of ``latents`` [1, C, h, w].

    One batched pass of 2 x ``noises`` samples, ``chunk_size`` samples per UNet call, without autograd;
    v-predictions are converted to noise predictions. Returns ``(eps_ref, eps_query)``, each [noises, C, h, w],
    fp32. Both prompts see the same noisy latents, so the noise itself cancels in their difference.
    ``ref_embedding`` and ``query_embedding`` are one-row conditionings (tensors: SD's); ``call`` is the family's
    denoiser call (default: SD's UNet).
    """
    import torch

    from ddsedit import scores
    from ddsedit.conditioning import Conditioning, call_unet

    call = call or call_unet
    ref_embedding = ref_embedding if isinstance(ref_embedding, Conditioning) else Conditioning(ref_embedding)
    query_embedding = query_embedding if isinstance(query_embedding, Conditioning) else Conditioning(query_embedding)

    device = latents.device
    alpha_bar = alphas_cumprod.to(device=device, dtype=torch.float32)[timestep]
    noise = torch.randn((noises, *latents.shape[1:]), generator=generator, device=device, dtype=torch.float32)
    noisy = scores.add_noise(latents.float().expand(noises, -1, -1, -1), noise, alpha_bar.repeat(noises))
    batch = torch.cat([noisy, noisy])
    embeddings = Conditioning.cat([ref_embedding.expand(noises), query_embedding.expand(noises)])
    predictions = []
    with torch.no_grad():
        for start in range(0, batch.shape[0], chunk_size):
            chunk = batch[start : start + chunk_size]
            count = chunk.shape[0]
            timesteps = torch.full((count,), timestep, device=device, dtype=torch.long)
            prediction = call(unet, chunk, timesteps, embeddings.rows(start, start + count)).float()
            predictions.append(
                scores.epsilon_from_prediction(prediction, chunk, alpha_bar.repeat(count), prediction_type)
            )
    epsilon = torch.cat(predictions)
    return epsilon[:noises], epsilon[noises:]


# Flux.1 dev takes its guidance scale as an input of every call; the mask's calls use FluxPipeline's default.
FLUX_MASK_GUIDANCE = 3.5


def strength_sigma(strength: float, sigmas: Any) -> float:
    """The flow time DiffEdit's ``strength`` names on a rectified-flow model: the sigma of its own 50-step schedule
    ``sigmas`` (51 values, descending) at the first of the last ``int(50 * strength)`` steps (0.5: index 25)."""
    steps = len(sigmas) - 1
    kept_steps = min(int(steps * strength), steps)
    if kept_steps < 1:
        raise InputError(f"--mask-strength {strength} keeps no step of a {steps}-step schedule")
    return float(sigmas[steps - kept_steps])


def velocity_predictions(
    transformer: Any,
    latents: torch.Tensor,
    ref_embedding: Any,
    query_embedding: Any,
    sigma: float,
    noises: int,
    generator: torch.Generator,
    chunk_size: int,
    call: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`noise_predictions` for a rectified-flow model: the velocities under the ref and the query for
    ``noises`` noisings ``(1 - sigma) x + sigma eps`` of ``latents`` [1, C, h, w], each [noises, C, h, w], fp32.

    At one point the noise predictions behind two velocities differ by ``(1 - sigma)`` times the velocities'
    difference, a factor that a threshold relative to the map's mean does not see: the map is drawn from the
    velocities as they are. ``ref_embedding`` and ``query_embedding`` are one-row conditionings.
    """
    import torch

    from ddsedit.conditioning import Conditioning

    device = latents.device
    noise = torch.randn((noises, *latents.shape[1:]), generator=generator, device=device, dtype=torch.float32)
    noisy = (1.0 - sigma) * latents.float().expand(noises, -1, -1, -1) + sigma * noise
    batch = torch.cat([noisy, noisy])
    embeddings = Conditioning.cat([ref_embedding.expand(noises), query_embedding.expand(noises)])
    if "guidance" not in embeddings.extra:
        embeddings = embeddings.with_extra({"guidance": torch.full((1,), FLUX_MASK_GUIDANCE, device=device)})
    predictions = []
    with torch.no_grad():
        for start in range(0, batch.shape[0], chunk_size):
            chunk = batch[start : start + chunk_size]
            times = torch.full((chunk.shape[0],), sigma, device=device, dtype=torch.float32)
            predictions.append(call(transformer, chunk, times, embeddings.rows(start, start + chunk.shape[0])).float())
    velocity = torch.cat(predictions)
    return velocity[:noises], velocity[noises:]
