"""Decoder hardening: only the decoder changes, the folder stays a loadable shapes model."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from shapes_training import config, decoder, train


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder") / "run"
    train.Trainer(config.tiny(), out).run()
    return out / "final"


def test_perturb_adds_noise_up_to_sigma() -> None:
    latents = torch.zeros(64, 4, 8, 8)
    perturbed = decoder.perturb(latents, scaling_factor=0.5, sigma=0.3, grid=4, gen=torch.Generator().manual_seed(0))
    stds = perturbed.flatten(1).std(dim=1) * 0.5  # back to scaled units
    assert 0 < stds.max() <= 0.3 * 1.3 and stds.min() < 0.1


def test_hardening_changes_the_decoder_only(tiny_model, tmp_path) -> None:
    out = tmp_path / "hardened"
    record = decoder.harden_model(tiny_model, out, decoder.DecoderConfig(steps=3, batch=2))
    before = load_file(tiny_model / "vae" / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(("decoder.", "post_quant_conv.")) for name in changed)
    for part in ("unet", "text_encoder"):
        name = "diffusion_pytorch_model.safetensors" if part == "unet" else "model.safetensors"
        assert (tiny_model / part / name).read_bytes() == (out / part / name).read_bytes()
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae")
    assert vae.config.scaling_factor == AutoencoderKL.from_pretrained(tiny_model, subfolder="vae").config.scaling_factor
    info = json.loads((out / "train_info.json").read_text())
    assert info["decoder"] == record and record["config"]["steps"] == 3
    assert not (tmp_path / "hardened.partial").exists()
    assert "_name_or_path" not in json.loads((out / "vae" / "config.json").read_text())
    with pytest.raises(FileExistsError):
        decoder.harden_model(tiny_model, out, decoder.DecoderConfig(steps=1, batch=2))
