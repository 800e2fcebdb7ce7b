"""Build the untrained components of the shapes pipelines from config: VAE, text encoder, UNet and DDPM scheduler;
for shapes-flow the SD3 transformer and the flow-matching scheduler."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ddsedit.shapes.world import IMAGE_SIZE
from ddsedit.wordtokenizer import MAX_LENGTH
from shapes_training.config import TextConfig, TransformerConfig, UNetConfig, VAEConfig


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    """AutoencoderKL downsampling by 2 ** (len(channels) - 1).

    The log-variance half of `quant_conv`'s bias starts at `cfg.init_logvar`: with a tiny KL weight the
    posterior should be nearly deterministic anyway, and starting there spares the decoder from learning
    through std-1 latent noise at first.
    """
    n = len(cfg.channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=IMAGE_SIZE,
    )
    with torch.no_grad():
        vae.quant_conv.bias[cfg.latent_channels :] = cfg.init_logvar
    return vae


def build_text_encoder(cfg: TextConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A small CLIPTextModel whose vocabulary and special ids match `tokenizer`."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        projection_dim=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(
    cfg: UNetConfig, latent_channels: int, cross_attention_dim: int, latent_size: int
) -> UNet2DConditionModel:
    """UNet2DConditionModel with transformer (self + cross-attention) blocks at `cfg.attention_levels`."""
    n = len(cfg.channels)
    down = tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if n - 1 - i in cfg.attention_levels else "UpBlock2D" for i in range(n))
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=cfg.channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=cfg.heads,  # diffusers' historical name for the number of heads
        norm_num_groups=cfg.norm_groups,
    )


def build_scheduler() -> DDPMScheduler:
    """Stable Diffusion's training noise schedule: scaled_linear betas 0.00085..0.012, 1000 steps, epsilon."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def build_transformer(
    cfg: TransformerConfig, latent_channels: int, latent_size: int, joint_attention_dim: int, pooled_dim: int
) -> SD3Transformer2DModel:
    """SD3Transformer2DModel with adaLN-Zero initialisation (DiT's): every block starts as the identity.

    diffusers leaves the modulation layers at PyTorch's default initialisation; DiT (Peebles and Xie, 2023)
    found zeroing them, and the output projection, trains better from scratch. The positional embedding is
    SD3's cropped one, sized to the latents exactly (``pos_embed_max_size`` in patches).
    """
    width = cfg.heads * cfg.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=cfg.patch_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=width,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=latent_size // cfg.patch_size,
    )
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            for norm in (block.norm1, block.norm1_context):
                norm.linear.weight.zero_()
                norm.linear.bias.zero_()
        for layer in (transformer.norm_out.linear, transformer.proj_out):
            layer.weight.zero_()
            layer.bias.zero_()
    return transformer


def build_flow_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    """SD3's flow-matching Euler scheduler, 1000 training steps, the given shift, no resolution-dependent shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
