"""Write a trained shapes pipeline as a diffusers folder (fp16 safetensors) and check that it loads.

Layout: ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` (each via save_pretrained),
``model_index.json`` (written by hand, as StableDiffusionPipeline's), ``ddsedit.json`` (edit defaults
read by ddsedit's loader) and ``train_info.json`` (how the model was made).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

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
    vae16 = copy.deepcopy(vae).to(torch.float16)
    vae16.register_to_config(scaling_factor=float(scaling_factor))
    vae16.save_pretrained(folder / "vae", safe_serialization=True)
    copy.deepcopy(unet).to(torch.float16).save_pretrained(folder / "unet", safe_serialization=True)
    copy.deepcopy(text_encoder).to(torch.float16).save_pretrained(folder / "text_encoder", safe_serialization=True)
    save_tokenizer(tokenizer, str(folder / "tokenizer"))
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(model_index(diffusers.__version__), indent=2) + "\n")
    (folder / "ddsedit.json").write_text(json.dumps(EDIT_DEFAULTS, indent=2) + "\n")
    (folder / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    for path in folder.rglob("*"):  # safetensors writes 0600 files; a bundled model must be world-readable
        path.chmod(0o755 if path.is_dir() else 0o644)
    check_folder(folder)
    return folder_size(folder)


def check_folder(folder: Path) -> None:
    """Load every component the way ddsedit's loader does; raise if any fails or looks wrong."""
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    assert abs(vae.config.scaling_factor - 0.18215) > 1e-6, "scaling_factor was not measured"
    UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    check_tokenizer(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"), WORDS)
    DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
