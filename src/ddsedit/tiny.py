"""Tiny, randomly initialised diffusers pipelines (SD 1.x, SDXL, SD3 and Flux.1 layouts), built offline.

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
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ddsedit.wordtokenizer import build_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(TINY_WORDS)

    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, 2))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer, 3))
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
    components = {
        "unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer, "tokenizer_2": tokenizer, "scheduler": scheduler,
    }  # fmt: skip
    return _save_components(folder, components, sdxl_model_index(diffusers.__version__, force_zeros_for_empty_prompt))


# --------------------------------------------------------------------------- what SDXL, SD3 and Flux builders share


def _clip_text_config(tokenizer, layers: int):
    """A 32-wide CLIP text config over ``tokenizer`` (projection 32, for the encoders with a projection)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def _t5_encoder(tokenizer, width: int):
    """A two-layer T5 encoder ``width`` wide with T5 v1.1's gated-GELU feed-forward (SD3's and Flux's T5-XXL is
    one), over ``tokenizer``'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=width // 8,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip


def _flow_vae(scaling_factor: float, shift_factor: float):
    """The tiny stride-2 VAE, shaped as SD3's and Flux's are: no quant convolutions, latents shifted then scaled."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )  # fmt: skip


def _save_components(folder: Path, components: dict, index: dict) -> Path:
    """Each component in its subfolder (CLIP tokenizers with their slow files too), the index, the edit defaults."""
    from transformers import CLIPTokenizer

    from ddsedit.wordtokenizer import save_tokenizer

    for name, component in components.items():
        if isinstance(component, CLIPTokenizer):
            save_tokenizer(component, str(folder / name))
        else:
            component.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "ddsedit.json").write_text(json.dumps({"size": 32}, indent=2))  # a tiny model works on tiny images
    return folder


# --------------------------------------------------------------------------- flow-matching models (SD3, Flux)


def sd3_model_index(diffusers_version: str, with_t5: bool = True) -> dict:
    """The model_index.json of an SD3 pipeline folder (StableDiffusion3Pipeline's layout); without T5, its text
    encoder and tokenizer are null, as in a folder saved from a pipeline loaded with ``text_encoder_3=None``."""
    none = [None, None]
    return {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": diffusers_version,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"] if with_t5 else none,
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"] if with_t5 else none,
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": none,
        "feature_extractor": none,
    }


def build_tiny_sd3_pipeline(folder: str | Path, with_t5: bool = True, seed: int = 0) -> Path:
    """Write a tiny random SD3-layout pipeline (a diffusers folder) to ``folder``.

    Two CLIP text encoders with projections (32 wide, different depths, so that their order matters), a T5
    encoder 64 wide (wider than the two CLIPs' 64 concatenated features would be padded to, as SD3's 4096 is
    wider than its CLIPs' 2048), an SD3 transformer with patch size 2 over 4-channel latents, a stride-2 VAE
    with SD3's scaling and shift, SD3's flow-matching scheduler (shift 3). ``with_t5=False`` leaves T5 out, as
    SD3 runs without it. About 1 MB.
    """
    import diffusers
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from ddsedit.wordtokenizer import build_t5_tokenizer, build_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer, t5_tokenizer = build_tokenizer(TINY_WORDS), build_t5_tokenizer(TINY_WORDS)
    t5_width = 64
    components = {
        "text_encoder": CLIPTextModelWithProjection(_clip_text_config(tokenizer, 2)),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_text_config(tokenizer, 3)),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "transformer": SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=t5_width, caption_projection_dim=32,
            pooled_projection_dim=2 * 32, pos_embed_max_size=32,
        ),  # fmt: skip
        "vae": _flow_vae(scaling_factor=1.5305, shift_factor=0.0609),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    }
    t5 = _t5_encoder(t5_tokenizer, t5_width)  # built either way, so that the other weights do not depend on it
    if with_t5:
        components.update(text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    return _save_components(folder, components, sd3_model_index(diffusers.__version__, with_t5))


def flux_model_index(diffusers_version: str) -> dict:
    """The model_index.json of a Flux.1 pipeline folder (FluxPipeline's layout)."""
    return {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers_version,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }


def build_tiny_flux_pipeline(folder: str | Path, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """Write a tiny random Flux.1-layout pipeline (a diffusers folder) to ``folder``.

    A CLIP text encoder (its pooled output, 32 wide, is the transformer's pooled projection), a T5 encoder 32
    wide, a Flux transformer (one double and two single blocks) over 2x2-packed 4-channel latents (16 packed
    features), a stride-2 VAE with Flux's scaling and shift. ``guidance_embeds=True`` is dev-like (guidance
    embedding, dev's resolution-dependent shifting); False is schnell-like (no guidance, no shift). About 1 MB.
    """
    import diffusers
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from ddsedit.wordtokenizer import build_t5_tokenizer, build_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer, t5_tokenizer = build_tokenizer(TINY_WORDS), build_t5_tokenizer(TINY_WORDS)
    if guidance_embeds:  # FLUX.1-dev's scheduler
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )  # fmt: skip
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    components = {
        "text_encoder": CLIPTextModel(_clip_text_config(tokenizer, 2)),
        "text_encoder_2": _t5_encoder(t5_tokenizer, 32),
        "tokenizer": tokenizer,
        "tokenizer_2": t5_tokenizer,
        "transformer": FluxTransformer2DModel(
            patch_size=1, in_channels=4 * 4, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        ),  # fmt: skip
        "vae": _flow_vae(scaling_factor=0.3611, shift_factor=0.1159),
        "scheduler": scheduler,
    }
    return _save_components(folder, components, flux_model_index(diffusers.__version__))
