"""The model families, one declaration each: how a family's prompts are encoded, what its denoiser is called
with besides latents and timesteps, whether it predicts noise or velocity, how its latents are scaled and its
default working size. Imports no torch; the functions are named ``"module:function"`` and imported when used.

SD 1.x/2.x is the first family (the bundled shapes model is one of its models), SDXL the second; both predict
noise. SD3/SD3.5 and Flux.1 predict a rectified-flow velocity: their methods are the velocity forms of
:mod:`ddsedit.flowgradients` and the FlowEdit sampler (:mod:`ddsedit.flowedit`), declared beside the noise forms in
:mod:`ddsedit.methods`.
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
    load_folder: str  # (folder, torch_dtype) -> the components by name, from a diffusers folder
    text_encoders: tuple[str, ...] = ("text_encoder",)  # the components that only encode prompts (freed after)
    # (components, source size (w, h), working size (w, h), dtype) -> extra conditioning tensors [1, ...] that
    # depend on the image, not the prompt (SDXL's size ids); None: the family has none.
    image_conditioning: str | None = None
    latent_scaling: str = "ddsedit.conditioning:vae_scaling"  # (vae config) -> (scale, shift)
    # The pipeline runs its VAE in fp32 when the VAE's config says force_upcast and the model is in fp16
    # (SDXL's VAE overflows in fp16); SD 1.x/2.x pipelines ignore that flag.
    vae_force_upcast: bool = False
    # Flow-matching families: (scheduler config, steps, image_seq_len) -> the pipeline's descending sigmas
    # [steps + 1], ending at 0.
    flow_sigmas: str | None = None
    # Guidance as a second, unconditional denoiser call (SD, SDXL, SD3); False: the guidance scale is an input of
    # the one conditional call, when the model takes one (Flux.1 dev's guidance embedding; schnell takes none).
    true_cfg: bool = True
    # The latents' sides must be multiples of this (SD3's patches and Flux's packing are 2x2 latent cells).
    latent_multiple: int = 1

    def function(self, role: str) -> Callable[..., Any]:
        """The function declared for ``role`` (``encode_prompts``, ``call_denoiser``, ``load_folder``,
        ``image_conditioning``, ``latent_scaling``, ``flow_sigmas``)."""
        declared = getattr(self, role)
        if declared is None:
            raise AttributeError(f"the {self.label} family declares no {role}")
        module, _, name = declared.partition(":")
        return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "sd", "Stable Diffusion 1.x/2.x", ("StableDiffusionPipeline",), NOISE, 512,
            encode_prompts="ddsedit.conditioning:encode_clip_prompts",
            call_denoiser="ddsedit.conditioning:call_unet",
            load_folder="ddsedit.loading:load_sd_folder",
        ),
        Family(
            "sdxl", "Stable Diffusion XL", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"), NOISE,
            1024,
            encode_prompts="ddsedit.conditioning:encode_sdxl_prompts",
            call_denoiser="ddsedit.conditioning:call_sdxl_unet",
            load_folder="ddsedit.loading:load_sdxl_folder",
            text_encoders=("text_encoder", "text_encoder_2"),
            image_conditioning="ddsedit.conditioning:sdxl_size_ids",
            vae_force_upcast=True,
        ),
        # The transformer is the denoiser (ModelComponents' ``unet``); SD3's T5 may be absent (the model then runs
        # on its CLIPs alone, as the pipeline does with text_encoder_3=None).
        Family(
            "sd3", "Stable Diffusion 3", ("StableDiffusion3Pipeline",), VELOCITY, 1024,
            encode_prompts="ddsedit.conditioning:encode_sd3_prompts",
            call_denoiser="ddsedit.conditioning:call_sd3_transformer",
            load_folder="ddsedit.loading:load_sd3_folder",
            text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
            flow_sigmas="ddsedit.conditioning:sd3_sigmas",
            latent_multiple=2,
        ),
        Family(
            "flux", "Flux.1", ("FluxPipeline",), VELOCITY, 1024,
            encode_prompts="ddsedit.conditioning:encode_flux_prompts",
            call_denoiser="ddsedit.conditioning:call_flux_transformer",
            load_folder="ddsedit.loading:load_flux_folder",
            text_encoders=("text_encoder", "text_encoder_2"),
            flow_sigmas="ddsedit.conditioning:flux_sigmas",
            true_cfg=False,
            latent_multiple=2,
        ),
    )
}  # fmt: skip
DEFAULT_FAMILY = "sd"
NOISE_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.prediction == NOISE)
FLOW_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.prediction == VELOCITY)


def family_of_pipeline(class_name: str | None) -> Family:
    """The family whose pipelines include ``class_name`` (a folder's model_index.json); None: SD 1.x/2.x."""
    if class_name is None:
        return FAMILIES[DEFAULT_FAMILY]
    for family in FAMILIES.values():
        if class_name in family.pipelines:
            return family
    known = ", ".join(family.label for family in FAMILIES.values())
    raise ModelError(f"{class_name} models are not supported yet (supported: {known})")
