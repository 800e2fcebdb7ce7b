"""What a denoiser is conditioned on, and each family's functions that encode prompts and call its denoiser.

A :class:`Conditioning` holds one row per image: the text encoder's hidden states and, for families that need
more (SDXL's pooled embeddings and size ids), named extra tensors, all batched along the first dimension, so
that the methods can stack and split conditionings without knowing the family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ddsedit.errors import DDSEditError, ModelError


@dataclass
class Conditioning:
    """Conditioning rows [K, ...]: ``hidden_states`` and any ``extra`` tensors the family's denoiser takes."""

    hidden_states: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def rows(self, start: int, stop: int) -> Conditioning:
        return Conditioning(self.hidden_states[start:stop], {k: v[start:stop] for k, v in self.extra.items()})

    def expand(self, count: int) -> Conditioning:
        """A single row repeated ``count`` times (views, no copies)."""
        return Conditioning(
            self.hidden_states.expand(count, *self.hidden_states.shape[1:]),
            {key: value.expand(count, *value.shape[1:]) for key, value in self.extra.items()},
        )

    def with_extra(self, extra: dict[str, torch.Tensor]) -> Conditioning:
        """These rows with more extra tensors (one row each, or one row for all), e.g. an image's size ids."""
        count = len(self)
        return Conditioning(
            self.hidden_states,
            {**self.extra, **{key: value.expand(count, *value.shape[1:]) for key, value in extra.items()}},
        )

    def to(self, dtype: torch.dtype) -> Conditioning:
        return Conditioning(self.hidden_states.to(dtype), {k: v.to(dtype) for k, v in self.extra.items()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        keys = parts[0].extra.keys()
        return Conditioning(
            torch.cat([part.hidden_states for part in parts]),
            {key: torch.cat([part.extra[key] for part in parts]) for key in keys},
        )


def vae_scaling(vae_config: Any) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a VAE config: latents = (encoded - shift) * scale."""
    return float(vae_config.scaling_factor), float(getattr(vae_config, "shift_factor", None) or 0.0)


# --------------------------------------------------------------------------- SD 1.x/2.x


def encode_clip_prompts(components: Any, prompts: list[str], device: torch.device) -> Conditioning:
    """CLIP's last hidden states, as StableDiffusionPipeline.encode_prompt takes them (no clip-skip)."""
    text_encoder = components.text_encoder
    if text_encoder is None:
        raise DDSEditError("the text encoder was freed; load the model again to encode new prompts")
    tokenizer = components.tokenizer
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    with torch.no_grad():
        hidden = text_encoder(tokens, return_dict=False)[0]
    return Conditioning(hidden)


def call_unet(unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
              conditioning: Conditioning) -> torch.Tensor:  # fmt: skip
    """SD's UNet on latents in its dtype: the raw prediction (noise or v)."""
    unet_dtype = next(unet.parameters()).dtype
    return unet(
        latents.to(unet_dtype), timesteps, encoder_hidden_states=conditioning.hidden_states.to(unet_dtype),
        return_dict=False,
    )[0]  # fmt: skip


# --------------------------------------------------------------------------- SDXL


def _freed(components: Any, names: tuple[str, ...]) -> None:
    if any(getattr(components, name, None) is None for name in names):
        raise DDSEditError("the text encoders were freed; load the model again to encode new prompts")


def encode_sdxl_prompts(components: Any, prompts: list[str], device: torch.device) -> Conditioning:
    """SDXL's conditioning as StableDiffusionXLPipeline.encode_prompt builds it (no clip-skip, one prompt for both
    encoders): each encoder's penultimate hidden states, concatenated along the features, and the pooled
    embedding of the second encoder's projection as ``extra["text_embeds"]``.

    The empty prompt is the pipeline's "no negative prompt": zeros, hidden states and pooled alike, when the
    model's config says ``force_zeros_for_empty_prompt`` (SDXL base does); otherwise "" is encoded.
    Each prompt is encoded on its own, as the pipeline encodes a prompt and its negative, so that a prompt's
    conditioning does not depend on which prompts it was encoded with.
    """
    _freed(components, ("text_encoder", "text_encoder_2"))
    zero_empty = bool(components.pipeline_config.get("force_zeros_for_empty_prompt", True))
    rows = [_encode_sdxl_prompt(components, prompt, device) for prompt in prompts]
    if zero_empty:
        rows = [
            Conditioning(torch.zeros_like(row.hidden_states), {k: torch.zeros_like(v) for k, v in row.extra.items()})
            if prompt == "" else row
            for prompt, row in zip(prompts, rows, strict=True)
        ]  # fmt: skip
    return Conditioning.cat(rows)


def _encode_sdxl_prompt(components: Any, prompt: str, device: torch.device) -> Conditioning:
    hidden_states, pooled = [], None
    for tokenizer, text_encoder in (
        (components.tokenizer, components.text_encoder), (components.tokenizer_2, components.text_encoder_2)
    ):  # fmt: skip
        tokens = tokenizer(
            [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        with torch.no_grad():
            outputs = text_encoder(tokens.to(device), output_hidden_states=True)
        if pooled is None and outputs[0].ndim == 2:  # the projection's text_embeds, not a last hidden state
            pooled = outputs[0]
        hidden_states.append(outputs.hidden_states[-2])
    if pooled is None:
        raise DDSEditError("the second text encoder of this SDXL model gives no pooled projection")
    dtype = components.text_encoder_2.dtype
    return Conditioning(torch.cat(hidden_states, dim=-1).to(dtype), {"text_embeds": pooled.to(dtype)})


def sdxl_size_ids(components: Any, source_size: tuple[int, int], working_size: tuple[int, int],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:  # fmt: skip
    """SDXL's micro-conditioning, as the pipeline's ``_get_add_time_ids`` builds it: (original height, width,
    crop top, left, target height, width), with the source image's size as the original, no crop, and the
    working size as the target. The same ids go with every prompt of the image (the pipeline's default when
    no negative sizes are given)."""
    ids = [source_size[1], source_size[0], 0, 0, working_size[1], working_size[0]]
    return {"time_ids": torch.tensor([ids], dtype=dtype)}


SDXL_SIZE_IDS = 6


def check_sdxl_unet(unet: Any, text_encoder_2: Any) -> None:
    """Refuse a UNet whose added conditioning is not SDXL base's (pooled text + 6 size ids), as the pipeline's
    ``_get_add_time_ids`` does; the refiner's, which also takes an aesthetic score, is the usual case.

    Raises:
        ModelError: the widths differ.
    """
    if getattr(unet, "add_embedding", None) is None or unet.config.get("addition_embed_type") != "text_time":
        raise ModelError("this UNet has no SDXL added conditioning (addition_embed_type text_time)")
    passed = int(unet.config.addition_time_embed_dim) * SDXL_SIZE_IDS + int(text_encoder_2.config.projection_dim)
    expected = int(unet.add_embedding.linear_1.in_features)
    if passed != expected:
        raise ModelError(
            f"this UNet's added conditioning takes {expected} features, not SDXL base's {passed} "
            "(pooled text and 6 size ids): the SDXL refiner or another model, not an SDXL base model"
        )


def call_sdxl_unet(unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                   conditioning: Conditioning) -> torch.Tensor:  # fmt: skip
    """SDXL's UNet on latents in its dtype, with the pooled text and size ids as ``added_cond_kwargs``."""
    unet_dtype = next(unet.parameters()).dtype
    added = {key: conditioning.extra[key].to(unet_dtype) for key in ("text_embeds", "time_ids")}
    return unet(
        latents.to(unet_dtype), timesteps, encoder_hidden_states=conditioning.hidden_states.to(unet_dtype),
        added_cond_kwargs=added, return_dict=False,
    )[0]  # fmt: skip
