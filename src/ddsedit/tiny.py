"""Tiny, randomly initialised Stable Diffusion-format pipelines (SD 1.x layout and SDXL layout), built offline.

It edits nothing meaningful: it exists so that the whole pipeline (loading, the loop,
decoding, the CLI) can run in seconds on a CPU, in tests and in a smoke run.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_WORDS = (
    "a", "an", "the", "photo", "of", "on", "in", "with", "background", "cat", "dog", "bird", "car",
    "flamingo", "stork", "rollerskating", "red", "green", "blue", "yellow", "white", "black",
    "circle", "square", "triangle", "painting",
)  # fmt: skip


def model_index(diffusers_version: str) -> dict:
    """The model_index.json of an SD pipeline folder without safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


def build_tiny_pipeline(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny random SD-format pipeline (a diffusers folder) to ``folder``.

    VAE stride 2 (two blocks), 4 latent channels, UNet with cross-attention (dim 32),
    a two-layer CLIP text encoder over :data:`TINY_WORDS`. About 1 MB in all.
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ddsedit.wordtokenizer import build_tokenizer, save_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(TINY_WORDS)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    save_tokenizer(tokenizer, str(folder / "tokenizer"))
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(model_index(diffusers.__version__), indent=2))
    # Edit defaults stored with the model: a tiny model works on tiny images.
    (folder / "ddsedit.json").write_text(json.dumps({"size": 32}, indent=2))
    return folder


def sdxl_model_index(diffusers_version: str, force_zeros_for_empty_prompt: bool = True) -> dict:
    """The model_index.json of an SDXL base pipeline folder (StableDiffusionXLPipeline's layout)."""
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers_version,
        "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }


def build_tiny_sdxl_pipeline(
    folder: str | Path, prediction_type: str = "epsilon", seed: int = 0, force_zeros_for_empty_prompt: bool = True
) -> Path:
    """Write a tiny random SDXL-layout pipeline (a diffusers folder) to ``folder``.

    Two CLIP text encoders (the second with a projection, whose pooled output SDXL's UNet takes), hidden
    width 32 each, so the UNet attends to 64-wide text features; a UNet with SDXL's ``text_time`` added
    conditioning (pooled text + six size ids) and two transformer layers in its deeper block; a stride-2 VAE
    whose config asks for fp32 (``force_upcast``) as SDXL's does; SDXL's Euler scheduler config. About 2 MB.
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ddsedit.wordtokenizer import build_tokenizer, save_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(TINY_WORDS)

    def text_config(layers: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip

    text_encoder = CLIPTextModel(text_config(2))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(3))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_embed_dim,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        steps_offset=1,
        timestep_spacing="leading",
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    text_encoder_2.save_pretrained(folder / "text_encoder_2")
    save_tokenizer(tokenizer, str(folder / "tokenizer"))
    save_tokenizer(tokenizer, str(folder / "tokenizer_2"))
    scheduler.save_pretrained(folder / "scheduler")
    index = sdxl_model_index(diffusers.__version__, force_zeros_for_empty_prompt)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "ddsedit.json").write_text(json.dumps({"size": 32}, indent=2))
    return folder
