"""The model families, one declaration each: how a family's prompts are encoded, what its denoiser is called
with besides latents and timesteps, whether it predicts noise or velocity, how its latents are scaled and its
default working size. Imports no torch; the functions are named ``"module:function"`` and imported when used.

SD 1.x/2.x is the first family (the bundled shapes model is one of its models); SDXL, SD3 and Flux each land
as one more declaration here, plus their encode and call functions in :mod:`ddsedit.conditioning`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ddsedit.errors import ModelError

NOISE, VELOCITY = "noise", "velocity"  # what a family's denoiser predicts


@dataclass(frozen=True)
class Family:
    """One model family's declaration."""

    name: str
    label: str  # as messages name it
    pipelines: tuple[str, ...]  # model_index.json `_class_name`s of its diffusers pipelines
    prediction: str  # NOISE (epsilon or v, as the scheduler says) or VELOCITY (flow matching)
    default_size: int  # longest side of the working image, in pixels
    encode_prompts: str  # (components, prompts, device) -> Conditioning, one row per prompt
    call_denoiser: str  # (denoiser, latents, timesteps, conditioning) -> the raw prediction
    latent_scaling: str = "ddsedit.conditioning:vae_scaling"  # (vae config) -> (scale, shift)

    def function(self, role: str) -> Callable[..., Any]:
        """The function declared for ``role`` (``encode_prompts``, ``call_denoiser``, ``latent_scaling``)."""
        module, _, name = getattr(self, role).partition(":")
        return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "sd", "Stable Diffusion 1.x/2.x", ("StableDiffusionPipeline",), NOISE, 512,
            encode_prompts="ddsedit.conditioning:encode_clip_prompts",
            call_denoiser="ddsedit.conditioning:call_unet",
        ),
    )
}  # fmt: skip
DEFAULT_FAMILY = "sd"


def family_of_pipeline(class_name: str | None) -> Family:
    """The family whose pipelines include ``class_name`` (a folder's model_index.json); None: SD 1.x/2.x."""
    if class_name is None:
        return FAMILIES[DEFAULT_FAMILY]
    for family in FAMILIES.values():
        if class_name in family.pipelines:
            return family
    known = ", ".join(family.label for family in FAMILIES.values())
    raise ModelError(f"{class_name} models are not supported yet (supported: {known})")
