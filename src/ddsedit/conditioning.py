"""What a denoiser is conditioned on, and each family's functions that encode prompts and call its denoiser.

A :class:`Conditioning` holds one row per image: the text encoder's hidden states and, for families that need
more (SDXL's pooled embeddings and size ids, SD3's and Flux's pooled projections, Flux dev's guidance), named
extra tensors, all batched along the first dimension, so that the methods can stack and split conditionings
without knowing the family.

The flow-matching families (SD3, Flux.1) also have their sigma schedules here (:func:`sd3_sigmas`,
:func:`flux_sigmas`): their denoisers take a flow time t in [0, 1] (t = 1 is pure noise), not a DDPM timestep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
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


# --------------------------------------------------------------------------- flow matching (SD3, Flux.1)

# The flow schedulers' num_train_timesteps (1000 in every SD3 and Flux model): their timesteps are sigma * 1000,
# and that is what the pipelines hand their transformers (Flux's divides it by 1000 again).
FLOW_TIMESTEP_SCALE = 1000


def flow_sigmas(scheduler_config: dict[str, Any], steps: int, image_seq_len: int | None = None, *,
                evenly_spaced: bool = False) -> torch.Tensor:  # fmt: skip
    """The descending sigmas [steps + 1] (the last 0) of a flow pipeline's scheduler for ``steps`` steps: diffusers'
    own FlowMatchEulerDiscreteScheduler on the model's config, so that its shift (static, or resolution-dependent
    with ``use_dynamic_shifting``), terminal stretch and Karras/exponential/beta options all apply as they do
    in the pipeline.

    ``image_seq_len`` (the transformer's image tokens, (latent height / 2) * (latent width / 2)) sets the dynamic
    shift's mu as the pipelines compute it; it is needed only when the config shifts dynamically.
    ``evenly_spaced``: the pipeline hands the scheduler sigmas evenly spaced from 1 to 1/steps (FluxPipeline) rather
    than letting it space its own timesteps (StableDiffusion3Pipeline); the two differ in the last bits, and the
    scheduler's own spacing starts from its already-shifted smallest sigma.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    config = scheduler.config
    options: dict[str, Any] = {}
    if config.get("use_dynamic_shifting") or evenly_spaced:  # FluxPipeline computes mu whether it is used or not
        if image_seq_len is None:
            if config.get("use_dynamic_shifting"):
                raise DDSEditError("this model's scheduler shifts by resolution: its sigmas need the image_seq_len")
        else:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            # The config holds every key (the scheduler's own defaults otherwise), so the pipelines' differing
            # fallbacks for a missing max_shift (SD3 1.16, Flux 1.15) never apply.
            options["mu"] = calculate_shift(
                image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.15),
            )  # fmt: skip
    if evenly_spaced and not config.get("use_flow_sigmas"):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **options)
    else:
        scheduler.set_timesteps(steps, **options)
    return scheduler.sigmas.to(torch.float32)


def _t5_hidden_states(tokenizer: Any, text_encoder: Any, prompt: str, max_length: int,
                      device: torch.device) -> torch.Tensor:  # fmt: skip
    """T5's last hidden states [1, max_length, width] of one prompt, padded to ``max_length`` (no attention mask:
    the pipelines pass none, so the padding tokens are encoded and attended to as well)."""
    tokens = tokenizer(
        [prompt], padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    with torch.no_grad():
        hidden = text_encoder(tokens.to(device))[0]
    return hidden.to(text_encoder.dtype)


def _max_sequence_length(components: Any, default: int) -> int:
    """T5's prompt length: the pipeline's default, unless the model's settings name another."""
    return int((getattr(components, "pipeline_config", None) or {}).get("max_sequence_length", default))


def _has_text_encoder(components: Any, name: str) -> bool:
    """Whether the model has this text encoder at all (SD3 may come without T5), loaded or freed since."""
    return name not in getattr(components, "absent_text_encoders", ())


# --------------------------------------------------------------------------- SD3


SD3_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 length


def encode_sd3_prompts(components: Any, prompts: list[str], device: torch.device) -> Conditioning:
    """SD3's conditioning as StableDiffusion3Pipeline.encode_prompt builds it (no clip-skip, one prompt for all
    three encoders): CLIP-L's and CLIP-G's penultimate hidden states concatenated along the features, padded with
    zeros to T5's width, followed along the sequence by T5's last hidden states ([K, 77 + 256, 4096] for SD3);
    ``extra["pooled_projections"]`` is the two CLIP projections' pooled embeddings concatenated ([K, 2048]).

    Without T5 (a model loaded without it), T5's part is zeros of its shape, as the pipeline's is with
    ``text_encoder_3=None``. The empty prompt is encoded like any other: the pipeline encodes "" for a missing
    negative prompt (SD3 has no ``force_zeros_for_empty_prompt``). Each prompt is encoded on its own, as the
    pipeline encodes a prompt and its negative.
    """
    with_t5 = _has_text_encoder(components, "text_encoder_3")
    _freed(components, ("text_encoder", "text_encoder_2", *(("text_encoder_3",) if with_t5 else ())))
    return Conditioning.cat([_encode_sd3_prompt(components, prompt, device, with_t5) for prompt in prompts])


def _encode_sd3_prompt(components: Any, prompt: str, device: torch.device, with_t5: bool) -> Conditioning:
    clip_dtype = components.text_encoder.dtype  # the pipeline casts both CLIPs' hidden states to CLIP-L's dtype
    hidden_states, pooled = [], []
    for text_encoder, tokenizer in (
        (components.text_encoder, components.tokenizer), (components.text_encoder_2, components.tokenizer_2)
    ):  # fmt: skip
        tokens = tokenizer(
            [prompt], padding="max_length", max_length=components.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        with torch.no_grad():
            outputs = text_encoder(tokens.to(device), output_hidden_states=True)
        if outputs[0].ndim != 2:  # a last hidden state: the encoder has no projection
            raise ModelError("SD3's CLIP text encoders must have projections (CLIPTextModelWithProjection)")
        pooled.append(outputs[0])
        hidden_states.append(outputs.hidden_states[-2].to(clip_dtype))
    length = _max_sequence_length(components, SD3_MAX_SEQUENCE_LENGTH)
    if with_t5:
        t5 = _t5_hidden_states(components.tokenizer_3, components.text_encoder_3, prompt, length, device)
    else:
        width = components.unet.config.joint_attention_dim  # ModelComponents keeps the transformer as `unet`
        t5 = torch.zeros((1, length, width), device=device, dtype=clip_dtype)
    clip = torch.cat(hidden_states, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return Conditioning(torch.cat([clip, t5], dim=-2), {"pooled_projections": torch.cat(pooled, dim=-1)})


def call_sd3_transformer(transformer: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                         conditioning: Conditioning) -> torch.Tensor:  # fmt: skip
    """SD3's transformer on latents [K, C, H, W] (H, W multiples of its patch size, 2) in its dtype at flow times
    ``timesteps`` [K] (or one for all; fp32, as :func:`sd3_sigmas` gives them) in [0, 1]: the raw velocity
    prediction [K, C, H, W]. The pipeline passes the scheduler's timestep, t * 1000 in fp32, whatever the model's
    dtype."""
    dtype = next(transformer.parameters()).dtype
    timestep = (timesteps.to(torch.float32) * FLOW_TIMESTEP_SCALE).reshape(-1).expand(latents.shape[0])
    return transformer(
        hidden_states=latents.to(dtype), timestep=timestep,
        encoder_hidden_states=conditioning.hidden_states.to(dtype),
        pooled_projections=conditioning.extra["pooled_projections"].to(dtype), return_dict=False,
    )[0]  # fmt: skip


def sd3_sigmas(scheduler_config: dict[str, Any], steps: int, image_seq_len: int | None = None) -> torch.Tensor:
    """StableDiffusion3Pipeline's sigmas for ``steps`` steps (the scheduler spaces its own timesteps)."""
    return flow_sigmas(scheduler_config, steps, image_seq_len)


# --------------------------------------------------------------------------- Flux.1


FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length


def encode_flux_prompts(components: Any, prompts: list[str], device: torch.device) -> Conditioning:
    """Flux's conditioning as FluxPipeline.encode_prompt builds it (one prompt for both encoders): T5's last hidden
    states as the hidden states ([K, 512, 4096] for Flux.1), CLIP-L's pooled output (no projection) as
    ``extra["pooled_projections"]`` ([K, 768]).

    Flux's text ids are zeros [512, 3] whatever the prompt, so :func:`call_flux_transformer` makes them. Flux dev's
    guidance is not the prompt's: a method adds it as ``extra["guidance"]`` ([K] or one row, fp32, e.g. 3.5).
    Each prompt is encoded on its own, as the pipeline encodes a prompt and its negative (true CFG).
    """
    _freed(components, ("text_encoder", "text_encoder_2"))
    length = _max_sequence_length(components, FLUX_MAX_SEQUENCE_LENGTH)
    rows = []
    for prompt in prompts:
        tokenizer, text_encoder = components.tokenizer, components.text_encoder
        tokens = tokenizer(
            [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        with torch.no_grad():
            pooled = text_encoder(tokens.to(device), output_hidden_states=False).pooler_output
        hidden = _t5_hidden_states(components.tokenizer_2, components.text_encoder_2, prompt, length, device)
        rows.append(Conditioning(hidden, {"pooled_projections": pooled.to(text_encoder.dtype)}))
    return Conditioning.cat(rows)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Latents [K, C, H, W] -> Flux's token sequence [K, (H/2) * (W/2), C * 4]: each 2x2 patch one token, its
    features channel-major (c, dy, dx), tokens in row-major patch order, as FluxPipeline._pack_latents."""
    count, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise DDSEditError(f"Flux packs latents in 2x2 patches: {height}x{width} latents are not even on both sides")
    patches = latents.reshape(count, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(count, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: Flux's tokens [K, (H/2) * (W/2), C * 4] -> latents [K, C, H, W]."""
    count, _, features = packed.shape
    patches = packed.reshape(count, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(count, features // 4, height, width)


def flux_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The position ids [(H/2) * (W/2), 3] of the packed tokens of H x W latents, as
    FluxPipeline._prepare_latent_image_ids: (0, patch row, patch column), in token order."""
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def call_flux_transformer(transformer: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                          conditioning: Conditioning) -> torch.Tensor:  # fmt: skip
    """Flux's transformer on unpacked latents [K, C, H, W] (H, W even) at flow times ``timesteps`` [K] (or one for
    all; fp32, as :func:`flux_sigmas` gives them) in [0, 1]: the raw velocity prediction, unpacked to [K, C, H, W].

    As FluxPipeline calls it: the latents packed 2x2, with their position ids and the text's (zeros); the timestep
    is the scheduler's (t * 1000), cast to the model's dtype and divided by 1000, which in half precision is not
    always t itself; the guidance (Flux dev: the transformer has guidance embeddings) is ``extra["guidance"]`` in
    fp32, and None for models without (schnell), whatever the conditioning holds.

    Raises:
        DDSEditError: the model takes guidance and the conditioning has none.
    """
    dtype = next(transformer.parameters()).dtype
    count, _, height, width = latents.shape
    guidance = None
    if transformer.config.guidance_embeds:
        if "guidance" not in conditioning.extra:
            raise DDSEditError("this Flux model takes a guidance value (extra['guidance']) and none was given")
        guidance = conditioning.extra["guidance"].to(torch.float32).reshape(-1).expand(count)
    timestep = (timesteps.to(torch.float32) * FLOW_TIMESTEP_SCALE).reshape(-1).expand(count).to(dtype)
    hidden_states = conditioning.hidden_states.to(dtype)
    packed = transformer(
        hidden_states=pack_latents(latents.to(dtype)), timestep=timestep / FLOW_TIMESTEP_SCALE, guidance=guidance,
        pooled_projections=conditioning.extra["pooled_projections"].to(dtype), encoder_hidden_states=hidden_states,
        txt_ids=torch.zeros(hidden_states.shape[1], 3, device=latents.device, dtype=dtype),
        img_ids=flux_image_ids(height, width, latents.device, dtype), return_dict=False,
    )[0]  # fmt: skip
    return unpack_latents(packed, height, width)


def flux_sigmas(scheduler_config: dict[str, Any], steps: int, image_seq_len: int | None = None) -> torch.Tensor:
    """FluxPipeline's sigmas for ``steps`` steps: evenly spaced from 1 to 1/steps, then shifted by the scheduler
    (by resolution for dev, whose ``image_seq_len`` is its packed token count; not at all for schnell)."""
    return flow_sigmas(scheduler_config, steps, image_seq_len, evenly_spaced=True)
