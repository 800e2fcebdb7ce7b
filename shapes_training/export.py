"""Write a trained shapes pipeline as a diffusers folder (fp16 safetensors) and check that it loads.

Layout: ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` (each via save_pretrained),
``model_index.json`` (written by hand, as StableDiffusionPipeline's), ``ddsedit.json`` (edit defaults
read by ddsedit's loader) and ``train_info.json`` (how the model was made).

shapes-flow (`export_flow_pipeline`): ``transformer/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/
scheduler/`` and StableDiffusion3Pipeline's ``model_index.json`` with ``text_encoder_3`` and ``tokenizer_3`` null.
diffusers (0.42) loads such a folder only when told that T5 is absent:
``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``; null components
that are not optional are dropped from what it loads and then reported missing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ddsedit.shapes.world import WORDS
from ddsedit.tiny import model_index
from ddsedit.wordtokenizer import check_tokenizer, save_tokenizer

EDIT_DEFAULTS: dict[str, Any] = {"size": 64}


def folder_size(folder: Path) -> int:
    """Total bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def export_pipeline(
    folder: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    scaling_factor: float,
    info: dict[str, Any],
) -> int:
    """Save every component in fp16 under `folder`, load each back to check it, and return the folder's size."""
    folder.mkdir(parents=True, exist_ok=True)
    _save_vae(folder, vae, scaling_factor=float(scaling_factor))
    _save_fp16(unet, folder / "unet")
    _save_fp16(text_encoder, folder / "text_encoder")
    save_tokenizer(tokenizer, str(folder / "tokenizer"))
    scheduler.save_pretrained(folder / "scheduler")
    _write_metadata(folder, model_index(diffusers.__version__), info)
    check_folder(folder)
    return folder_size(folder)


def _save_fp16(model: torch.nn.Module, folder: Path) -> None:
    copy.deepcopy(model).to(torch.float16).save_pretrained(folder, safe_serialization=True)


def _save_vae(folder: Path, vae: AutoencoderKL, **config: float) -> None:
    """The VAE in fp16 under folder/vae, with `config` (its scaling_factor, shift_factor) recorded."""
    vae16 = copy.deepcopy(vae).to(torch.float16)
    vae16.register_to_config(**config)
    vae16.save_pretrained(folder / "vae", safe_serialization=True)


def _write_metadata(folder: Path, index: dict[str, Any], info: dict[str, Any]) -> None:
    """model_index.json, ddsedit.json and train_info.json; then every file made world-readable."""
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "ddsedit.json").write_text(json.dumps(EDIT_DEFAULTS, indent=2) + "\n")
    (folder / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    for path in folder.rglob("*"):  # safetensors writes 0600 files; a bundled model must be world-readable
        path.chmod(0o755 if path.is_dir() else 0o644)


def check_folder(folder: Path) -> None:
    """Load every component the way ddsedit's loader does; raise if any fails or looks wrong."""
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    assert abs(vae.config.scaling_factor - 0.18215) > 1e-6, "scaling_factor was not measured"
    UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    check_tokenizer(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"), WORDS)
    DDPMScheduler.from_pretrained(folder, subfolder="scheduler")


def sd3_model_index(diffusers_version: str) -> dict[str, Any]:
    """The model_index.json of a StableDiffusion3Pipeline folder without T5 (what its save_pretrained writes)."""
    clip = ["transformers", "CLIPTextModelWithProjection"]
    tokenizer = ["transformers", "CLIPTokenizer"]
    return {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": clip,
        "text_encoder_2": clip,
        "text_encoder_3": [None, None],
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "tokenizer_3": [None, None],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def export_flow_pipeline(
    folder: Path,
    vae: AutoencoderKL,
    shift_factor: float,
    text_encoders: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection],
    tokenizer: CLIPTokenizer,
    transformer: SD3Transformer2DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    info: dict[str, Any],
) -> int:
    """Save shapes-flow in fp16 under `folder` (layout in the module docstring), check it loads; return its size.

    The VAE keeps its scaling_factor; `shift_factor` is the one the training latents were centred with.
    Both CLIP encoders share the world tokenizer.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _save_vae(folder, vae, shift_factor=float(shift_factor))
    _save_fp16(transformer, folder / "transformer")
    for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders, strict=True):
        _save_fp16(encoder, folder / name)
    for name in ("tokenizer", "tokenizer_2"):
        save_tokenizer(tokenizer, str(folder / name))
    scheduler.save_pretrained(folder / "scheduler")
    _write_metadata(folder, sd3_model_index(diffusers.__version__), info)
    check_flow_folder(folder)
    return folder_size(folder)


def load_flow_pipeline(folder: Path, torch_dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """diffusers' own SD3 pipeline on a shapes-flow folder (T5 absent, so passed as None).

    The dtype must be given: without it transformers (5) loads the CLIP encoders in their stored fp16 and diffusers
    the transformer in fp32, and the pipeline's first step fails on the mix (the bundled SD 1.x folder loads so too).
    """
    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                    torch_dtype=torch_dtype)


def check_flow_folder(folder: Path) -> None:
    """Load the folder as StableDiffusion3Pipeline; raise if it fails or its parts do not fit together."""
    pipe = load_flow_pipeline(folder)
    assert pipe.vae.config.shift_factor is not None, "the SD3 pipeline decodes with shift_factor"
    check_tokenizer(pipe.tokenizer, WORDS)
    check_tokenizer(pipe.tokenizer_2, WORDS)
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert widths <= pipe.transformer.config.joint_attention_dim, "CLIP features wider than the joint attention"
    pooled = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert pooled == pipe.transformer.config.pooled_projection_dim, "pooled width"
