"""A tiny, randomly initialised Stable Diffusion-format pipeline, built offline.

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
