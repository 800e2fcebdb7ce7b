"""What a denoiser is conditioned on, and each family's functions that encode prompts and call its denoiser.

A :class:`Conditioning` holds one row per image: the text encoder's hidden states and, for families that need
more (SDXL's pooled embeddings and size ids), named extra tensors, all batched along the first dimension, so
that the methods can stack and split conditionings without knowing the family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ddsedit.errors import DDSEditError


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
