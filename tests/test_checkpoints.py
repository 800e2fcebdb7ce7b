"""Offline tests of single-file checkpoint loading (ddsedit.checkpoints).

A real SD checkpoint is gigabytes, so the round-trip tests build a tiny SD-shaped (or SDXL-shaped)
model in diffusers' layout, write it out in the ORIGINAL single-file layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*`` or SDXL's ``conditioner.embedders.*``) with the
inverse of diffusers' key mapping, load it back with ``load_single_file`` and compare outputs or
weights. The bundled full-size configs are checked by instantiating them on the meta device and
counting parameters.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from ddsedit import checkpoints  # noqa: E402
from ddsedit.checkpoints import (  # noqa: E402
    MODEL_CONFIGS_DIR,
    detect_sd_version,
    load_clip_tokenizer,
    load_single_file,
    load_single_file_vae,
    read_pipeline_config,
)
from ddsedit.errors import InputError, ModelError  # noqa: E402
from ddsedit.tiny import build_tiny_sdxl_pipeline  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

UNET_PREFIX = "model.diffusion_model."
UNET_ATTN2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", reference CLIP tokenizer


# ---------------------------------------------------------------------------------------------
# The bundled configs and tokenizer


def _count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _assert_clip_tokenizer(tokenizer_dir: Path, pad_id: int) -> None:
    """A bundled tokenizer encodes as the reference CLIP tokenizer does and pads with ``pad_id``."""
    tokenizer = load_clip_tokenizer(tokenizer_dir)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert tokenizer.pad_token_id == pad_id
    assert tokenizer.model_max_length == 77
    padded = tokenizer("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[:4] == [49406, 320, 2368, 49407] and padded[-1] == pad_id


@pytest.mark.parametrize(
    ("version", "prediction_type", "unet_params", "text_params", "sample_size", "pad_id"),
    [
        ("sd15", "epsilon", 859_520_964, 123_060_480, 64, 49407),
        ("sd2", "epsilon", 865_910_724, 340_387_840, 64, 0),
        ("sd2-v", "v_prediction", 865_910_724, 340_387_840, 96, 0),
    ],
)
def test_bundled_configs(version, prediction_type, unet_params, text_params, sample_size, pad_id):
    folder = MODEL_CONFIGS_DIR / version
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    unet_config = UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True)
    vae_config = AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True)
    text_config = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    assert scheduler.config.prediction_type == prediction_type
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert unet_config["sample_size"] == sample_size
    with init_empty_weights():
        assert _count(UNet2DConditionModel.from_config(unet_config)) == unet_params
        assert _count(AutoencoderKL.from_config(vae_config)) == 83_653_863
        assert _count(CLIPTextModel(text_config)) == text_params
    _assert_clip_tokenizer(folder / "tokenizer", pad_id)


@pytest.mark.parametrize(("version", "prediction_type"), [("sdxl", "epsilon"), ("sdxl-v", "v_prediction")])
def test_bundled_sdxl_configs(version, prediction_type):
    folder = MODEL_CONFIGS_DIR / version
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert read_pipeline_config(folder) == {"force_zeros_for_empty_prompt": True}
    unet_config = UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True)
    vae_config = AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True)
    text_config = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    text_config_2 = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2", local_files_only=True)
    # the scheduler that ddsedit builds, and the Euler one the config names: one noise schedule
    for scheduler_class in (DDPMScheduler, EulerDiscreteScheduler):
        scheduler = scheduler_class.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        assert scheduler.config.prediction_type == prediction_type
        assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
        assert scheduler.config.beta_schedule == "scaled_linear"
        assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.steps_offset == 1
    assert unet_config["sample_size"] == 128 and unet_config["cross_attention_dim"] == 2048
    assert (vae_config["scaling_factor"], vae_config["force_upcast"]) == (0.13025, True)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        assert _count(unet) == 2_567_463_684
        # the added conditioning: the pooled bigG output (1280) and six size ids x 256
        assert unet.add_embedding.linear_1.in_features == 2816
        assert _count(AutoencoderKL.from_config(vae_config)) == 83_653_863
        assert _count(CLIPTextModel(text_config)) == 123_060_480
        text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
        assert _count(text_encoder_2) == 694_659_840
        assert tuple(text_encoder_2.text_projection.weight.shape) == (1280, 1280)
    assert text_config.hidden_size + text_config_2.hidden_size == unet_config["cross_attention_dim"]
    _assert_clip_tokenizer(folder / "tokenizer", 49407)
    _assert_clip_tokenizer(folder / "tokenizer_2", 0)


def test_bpe_files_are_the_clip_vocabulary():
    vocab, merges = checkpoints.load_bpe()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["<|startoftext|>"] == 49406
    assert sorted(vocab.values()) == list(range(49408))


# ---------------------------------------------------------------------------------------------
# Version detection on synthetic files holding just the distinguishing tensors


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def _stub(family: str, in_channels: int = 4) -> dict[str, torch.Tensor]:
    unet = "model.diffusion_model."
    width = 768 if family == "sd15" else 1024
    tensors = {
        unet + "input_blocks.0.0.weight": torch.zeros(2, in_channels, 1, 1),
        UNET_ATTN2: torch.zeros(2, width),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(1),
    }
    if family == "sd15":
        tensors["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(1)
    else:
        tensors["cond_stage_model.model.token_embedding.weight"] = torch.zeros(1)
    return tensors


def test_detect_sd15(tmp_path):
    assert detect_sd_version(_write(tmp_path / "v1-5-pruned-emaonly.safetensors", _stub("sd15"))) == "sd15"
    # an SD 1.x file whose name says 768 is still SD 1.x
    assert detect_sd_version(_write(tmp_path / "anything-768.safetensors", _stub("sd15"))) == "sd15"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("v2-1_768-ema-pruned.safetensors", "sd2-v"),
        ("768-v-ema.safetensors", "sd2-v"),
        ("v2-1_512-ema-pruned.safetensors", "sd2"),
        ("512-base-ema.safetensors", "sd2"),
        ("myFineTune_vpred.safetensors", "sd2-v"),
        ("mystery.safetensors", "sd2-v"),  # diffusers' default for SD 2.x: stable-diffusion-2-1
    ],
)
def test_detect_sd2_prediction_type_from_name(tmp_path, name, expected):
    assert detect_sd_version(_write(tmp_path / name, _stub("sd2"))) == expected


def test_detect_sd2_override_and_metadata(tmp_path):
    path = _write(tmp_path / "v2-1_768-ema-pruned.safetensors", _stub("sd2"))
    assert detect_sd_version(path, prediction_type="epsilon") == "sd2"
    assert detect_sd_version(path, prediction_type="v") == "sd2-v"
    declared = _write(
        tmp_path / "model_768.safetensors", _stub("sd2"), {"modelspec.prediction_type": "epsilon"}
    )
    assert detect_sd_version(declared) == "sd2"
    architecture = _write(
        tmp_path / "m512.safetensors", _stub("sd2"), {"modelspec.architecture": "stable-diffusion-v2-768-v"}
    )
    assert detect_sd_version(architecture) == "sd2-v"
    marker = _write(tmp_path / "base.safetensors", {**_stub("sd2"), "v_pred": torch.zeros(0)})
    assert detect_sd_version(marker) == "sd2-v"
    with pytest.raises(InputError, match="prediction type"):
        detect_sd_version(path, prediction_type="sample")


def test_detect_without_text_encoder_uses_the_unet_width(tmp_path):
    tensors = {key: value for key, value in _stub("sd2").items() if not key.startswith("cond_stage_model")}
    assert detect_sd_version(_write(tmp_path / "x_512.safetensors", tensors)) == "sd2"


def test_detect_refuses_other_models(tmp_path):
    with pytest.raises(ModelError, match="input channels"):
        detect_sd_version(_write(tmp_path / "inpainting.safetensors", _stub("sd15", in_channels=9)))
    half_sdxl = {**_stub("sd15"), "conditioner.embedders.1.model.positional_embedding": torch.zeros(1)}
    with pytest.raises(ModelError, match=r"SDXL checkpoint without one of its two text encoders"):
        detect_sd_version(_write(tmp_path / "sdxl.safetensors", half_sdxl))
    with pytest.raises(ModelError, match="not a Stable Diffusion"):
        detect_sd_version(_write(tmp_path / "lora.safetensors", {"lora_unet_down.weight": torch.zeros(2)}))
    mixed = {**_stub("sd2"), "cond_stage_model.model.token_embedding.weight": torch.zeros(1)}
    mixed[UNET_ATTN2] = torch.zeros(2, 768)
    with pytest.raises(ModelError, match="mixes"):
        detect_sd_version(_write(tmp_path / "mixed.safetensors", mixed))


def _sdxl_stub(in_channels: int = 4, context_width: int = 2048) -> dict[str, torch.Tensor]:
    """The tensors that tell an SDXL base file: both text encoders, and a UNet reading their features."""
    unet = "model.diffusion_model."
    return {
        unet + "input_blocks.0.0.weight": torch.zeros(2, in_channels, 1, 1),
        unet + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(2, context_width),
        unet + "label_emb.0.0.weight": torch.zeros(2, 2816),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(1),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1, 768),
        "conditioner.embedders.1.model.token_embedding.weight": torch.zeros(1, 1280),
        "conditioner.embedders.1.model.text_projection": torch.zeros(1280, 1280),
    }


def test_detect_sdxl(tmp_path):
    plain = _write(tmp_path / "sd_xl_base_1.0.safetensors", _sdxl_stub())
    assert detect_sd_version(plain) == "sdxl"
    assert detect_sd_version(plain, prediction_type="v") == "sdxl-v"
    # SD 2.x's file-name rules do not apply: SDXL base is epsilon unless the file says otherwise
    assert detect_sd_version(_write(tmp_path / "sdxl_768-v.safetensors", _sdxl_stub())) == "sdxl"
    architecture = {"modelspec.architecture": "stable-diffusion-xl-v1-base"}
    assert detect_sd_version(_write(tmp_path / "a.safetensors", _sdxl_stub(), architecture)) == "sdxl"
    assert "sdxl" in checkpoints.SD_VERSIONS and "sdxl-v" in checkpoints.SD_VERSIONS
    # without text encoders, the UNet's 2048-wide cross-attention says SDXL
    unet_only = {key: value for key, value in _sdxl_stub().items() if not key.startswith("conditioner.")}
    assert detect_sd_version(_write(tmp_path / "unet-only.safetensors", unet_only)) == "sdxl"


@pytest.mark.parametrize(
    ("metadata", "extra"),
    [
        ({"modelspec.prediction_type": "v"}, {}),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.prediction_type": "v_prediction"}, {}),
        ({"ss_v_parameterization": "True"}, {}),
        (None, {"v_pred": torch.zeros(0)}),
    ],
)
def test_detect_sdxl_v_prediction_from_the_file(tmp_path, metadata, extra):
    path = _write(tmp_path / "fine-tune.safetensors", {**_sdxl_stub(), **extra}, metadata)
    assert detect_sd_version(path) == "sdxl-v"
    assert detect_sd_version(path, prediction_type="epsilon") == "sdxl"  # the caller's word wins


def test_detect_refuses_other_sdxl_models(tmp_path):
    refiner = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 1, 1),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(2, 1280),
        "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(1, 1280),
        "conditioner.embedders.0.model.text_projection": torch.zeros(1280, 1280),
    }
    with pytest.raises(ModelError) as caught:
        detect_sd_version(_write(tmp_path / "sd_xl_refiner_1.0.safetensors", refiner))
    assert str(caught.value) == (
        "sd_xl_refiner_1.0.safetensors is the SDXL refiner (one text encoder, image-to-image only); "
        "ddsedit needs an SDXL base model or a fine-tune of it"
    )
    with pytest.raises(ModelError, match="9 input channels.*inpainting"):
        detect_sd_version(_write(tmp_path / "sd_xl_inpaint.safetensors", _sdxl_stub(in_channels=9)))
    playground = {**_sdxl_stub(), "edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)}
    with pytest.raises(ModelError, match="Playground v2.5"):
        detect_sd_version(_write(tmp_path / "playground-v2.5.safetensors", playground))
    with pytest.raises(ModelError, match="1024-wide ones; the file mixes two models"):
        detect_sd_version(_write(tmp_path / "mixed.safetensors", _sdxl_stub(context_width=1024)))
    no_open_clip = {key: value for key, value in _sdxl_stub().items() if ".embedders.1." not in key}
    with pytest.raises(ModelError, match=r"without one of its two text encoders \(no conditioner.embedders.1"):
        detect_sd_version(_write(tmp_path / "half.safetensors", no_open_clip))


def test_bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(_write(tmp_path / "whole.safetensors", _stub("sd15")).read_bytes()[:-64])
    for bad in (corrupt, truncated):
        for call in (detect_sd_version, lambda path: load_single_file(path, torch.float32)):
            with pytest.raises(ModelError, match="not a valid safetensors file") as caught:
                call(bad)
            assert "\n" not in str(caught.value)
    with pytest.raises(InputError, match="does not exist"):
        detect_sd_version(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="expected a .safetensors"):
        detect_sd_version(_write(tmp_path / "model.weights", _stub("sd15")))
    unrelated = _write(tmp_path / "unrelated.safetensors", {"encoder.layer.0.weight": torch.zeros(3)})
    with pytest.raises(ModelError, match="not a Stable Diffusion"):
        load_single_file(unrelated, torch.float32)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickles_are_refused_without_allow_pickle(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": _stub("sd15")}, path)
    message = f"{path} is a pickle checkpoint, which can run code when loaded; pass --allow-pickle"
    with pytest.raises(InputError, match=re.escape(message)):
        load_single_file(path, torch.float32)
    with pytest.raises(InputError, match="pickle checkpoint"):
        detect_sd_version(path)
    assert detect_sd_version(path, allow_pickle=True) == "sd15"


def test_pickle_global_step_marks_sd2_base(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"global_step": 875000, "state_dict": _stub("sd2")}, path)
    assert detect_sd_version(path, allow_pickle=True) == "sd2"


# ---------------------------------------------------------------------------------------------
# A tiny SD-shaped model, written in the original single-file layout

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str, renames: dict[str, str]) -> str:
    name, _, tail = rest.partition(".")
    return f"{renames.get(name, name)}.{tail}"


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*`` (LDM's openaimodel layout).

    LDM numbers the UNet's blocks in one sequence per side: ``input_blocks.0`` is conv_in, then
    each resolution level contributes ``layers_per_block`` (resnet, attention) blocks and, but for
    the last level, one downsampler block; ``output_blocks`` mirror that with one block more per
    level, the upsampler riding in the level's last block.
    """
    per_level = config["layers_per_block"] + 1
    up_has_attention = ["CrossAttn" in name for name in config["up_block_types"]]
    simple = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",  # SDXL's added (pooled text + size ids) conditioning
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    converted = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in simple:
            new_key = f"{simple[module]}.{leaf}"
        elif match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block = 1 + int(match[1]) * per_level + int(match[3])
            if match[2] == "resnets":
                new_key = f"input_blocks.{block}.0." + _resnet(match[4], _RESNET_TO_LDM)
            else:
                new_key = f"input_blocks.{block}.1.{match[4]}"
        elif match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new_key = f"input_blocks.{(int(match[1]) + 1) * per_level}.0.op.{match[2]}"
        elif match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new_key = f"middle_block.{2 * int(match[1])}." + _resnet(match[2], _RESNET_TO_LDM)
        elif match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new_key = f"middle_block.1.{match[1]}"
        elif match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block = int(match[1]) * per_level + int(match[3])
            if match[2] == "resnets":
                new_key = f"output_blocks.{block}.0." + _resnet(match[4], _RESNET_TO_LDM)
            else:
                new_key = f"output_blocks.{block}.1.{match[4]}"
        elif match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            level = int(match[1])
            slot = 2 if up_has_attention[level] else 1
            new_key = f"output_blocks.{(level + 1) * per_level - 1}.{slot}.conv.{match[2]}"
        else:
            raise AssertionError(f"no LDM name for UNet key {key}")
        converted["model.diffusion_model." + new_key] = value
    return converted


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> ``first_stage_model.*`` (LDM's layout, 1x1-conv attention)."""
    levels = len(config["block_out_channels"])
    shortcut = {"conv_shortcut": "nin_shortcut"}
    converted = {}
    for key, value in state.items():
        if re.match(r"(post_)?quant_conv\.|(en|de)coder\.conv_(in|out)\.", key):
            new_key = key
        elif match := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new_key = f"{match[1]}.norm_out.{match[2]}"
        elif match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new_key = f"encoder.down.{match[1]}.block.{match[2]}." + _resnet(match[3], shortcut)
        elif match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new_key = f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
        elif match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level = levels - 1 - int(match[1])
            new_key = f"decoder.up.{level}.block.{match[2]}." + _resnet(match[3], shortcut)
        elif match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new_key = f"decoder.up.{levels - 1 - int(match[1])}.upsample.conv.{match[2]}"
        elif match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new_key = f"{match[1]}.mid.block_{int(match[2]) + 1}." + _resnet(match[3], shortcut)
        elif match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new_key = f"{match[1]}.mid.attn_1.{_VAE_ATTENTION_TO_LDM[match[2]]}.{match[3]}"
            if match[2] != "group_norm" and match[3] == "weight":
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        else:
            raise AssertionError(f"no LDM name for VAE key {key}")
        converted["first_stage_model." + new_key] = value
    return converted


def clip_to_ldm(
    state: dict[str, torch.Tensor], prefix: str = "cond_stage_model.transformer."
) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys -> ``<prefix>text_model.*``.

    SD 1.x's prefix is ``cond_stage_model.transformer.``, SDXL's (CLIP ViT-L) ``conditioner.embedders.0.transformer.``.
    """
    prefix += "text_model."
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    converted = {prefix + key: value for key, value in state.items()}
    positions = state["embeddings.position_embedding.weight"].shape[0]
    converted[prefix + "embeddings.position_ids"] = torch.arange(positions)[None]
    return converted


def open_clip_to_ldm(
    state: dict[str, torch.Tensor], extra_layer: bool = True, prefix: str = "cond_stage_model.model."
) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel(WithProjection) keys -> OpenCLIP's layout under ``prefix``.

    SD 2.x's prefix is ``cond_stage_model.model.``, SDXL's (OpenCLIP ViT-bigG) ``conditioner.embedders.1.model.``.
    SD 2.x files hold one more transformer layer than the model uses (it reads the penultimate
    layer), plus a text projection; ``extra_layer`` adds such unused tensors. A model with a
    projection (SDXL's second encoder) gets it as OpenCLIP stores it, ``[width, projection]``: the
    transpose of transformers' linear weight.
    """
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    converted = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
    }
    layers = sorted({int(key.split(".")[2]) for key in state if key.startswith("encoder.layers.")})
    for layer in layers:
        source, target = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            converted[f"{target}ln_1.{kind}"] = state[f"{source}layer_norm1.{kind}"]
            converted[f"{target}ln_2.{kind}"] = state[f"{source}layer_norm2.{kind}"]
            converted[f"{target}mlp.c_fc.{kind}"] = state[f"{source}mlp.fc1.{kind}"]
            converted[f"{target}mlp.c_proj.{kind}"] = state[f"{source}mlp.fc2.{kind}"]
            converted[f"{target}attn.out_proj.{kind}"] = state[f"{source}self_attn.out_proj.{kind}"]
            converted[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{source}self_attn.{name}_proj.{kind}"] for name in ("q", "k", "v")]
            )
    if "text_projection.weight" in state:
        converted[prefix + "text_projection"] = state["text_projection.weight"].T
        converted[prefix + "logit_scale"] = torch.tensor(4.6)
    if extra_layer:
        unused = f"{prefix}transformer.resblocks.{len(layers)}."
        for key in [key for key in converted if key.startswith(f"{prefix}transformer.resblocks.0.")]:
            converted[unused + key.split("resblocks.0.")[1]] = torch.randn_like(converted[key])
        width = state["final_layer_norm.weight"].shape[0]
        converted[prefix + "text_projection"] = torch.randn(width, width)
        converted[prefix + "logit_scale"] = torch.tensor(4.6)
    return converted


def _tiny_models(family: str):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        use_linear_projection=family == "sd2",
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu" if family == "sd15" else "gelu",
        )
    ).eval()
    # Give the norms non-default values so that a weight left unloaded would show.
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.add_(0.1 * torch.randn_like(parameter))
    return unet, vae, text_encoder


def _config_folder(root: Path, family: str, unet, vae, text_encoder) -> Path:
    bundled = MODEL_CONFIGS_DIR / ("sd15" if family == "sd15" else "sd2")
    unet.save_config(root / "unet")
    vae.save_config(root / "vae")
    text_encoder.config.save_pretrained(root / "text_encoder")
    shutil.copytree(bundled / "scheduler", root / "scheduler")
    shutil.copytree(bundled / "tokenizer", root / "tokenizer")
    return root


@pytest.fixture(scope="module", params=["sd15", "sd2"])
def tiny(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"tiny-{family}")
    unet, vae, text_encoder = _tiny_models(family)
    config_dir = _config_folder(root / "configs", family, unet, vae, text_encoder)
    text_state = text_encoder.state_dict()
    tensors = {
        **unet_to_ldm(unet.state_dict(), unet.config),
        **vae_to_ldm(vae.state_dict(), vae.config),
        **(clip_to_ldm(text_state) if family == "sd15" else open_clip_to_ldm(text_state)),
    }
    path = root / f"tiny-{family}.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return {
        "family": family,
        "path": path,
        "tensors": tensors,
        "config_dir": config_dir,
        "models": (unet, vae, text_encoder),
    }


@torch.no_grad()
def _assert_same_outputs(parts, originals, tokenizer_ids) -> None:
    unet, vae, text_encoder = originals
    torch.manual_seed(1)
    sample = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 5, 32)
    timestep = torch.tensor([10])
    torch.testing.assert_close(
        parts["unet"](sample, timestep, encoder_hidden_states=context).sample,
        unet(sample, timestep, encoder_hidden_states=context).sample,
    )
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(
        parts["vae"].encode(image).latent_dist.mean, vae.encode(image).latent_dist.mean
    )
    latents = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(parts["vae"].decode(latents).sample, vae.decode(latents).sample)
    ids = torch.tensor([tokenizer_ids])
    torch.testing.assert_close(
        parts["text_encoder"](ids).last_hidden_state, text_encoder(ids).last_hidden_state
    )


def test_single_file_round_trip(tiny):
    parts = load_single_file(tiny["path"], torch.float32, config_dir=tiny["config_dir"])
    assert set(parts) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "family", "pipeline_config"}
    assert isinstance(parts["unet"], UNet2DConditionModel)
    assert isinstance(parts["vae"], AutoencoderKL)
    assert isinstance(parts["text_encoder"], CLIPTextModel)
    ids = parts["tokenizer"]("a photo of a cat").input_ids
    assert ids == CAT_IDS
    assert parts["tokenizer"].pad_token_id == (49407 if tiny["family"] == "sd15" else 0)
    assert parts["scheduler"].config.prediction_type == "epsilon"
    assert parts["scheduler"].alphas_cumprod.shape == (1000,)
    _assert_same_outputs(parts, tiny["models"], ids)


def test_round_trip_in_half_precision_and_prediction_override(tiny):
    parts = load_single_file(
        tiny["path"], torch.bfloat16, config_dir=tiny["config_dir"], prediction_type="v_prediction"
    )
    for name in ("unet", "vae", "text_encoder"):
        assert {parameter.dtype for parameter in parts[name].parameters()} == {torch.bfloat16}
    assert parts["scheduler"].config.prediction_type == "v_prediction"


def test_pickle_round_trip_with_allow_pickle(tiny, tmp_path):
    path = tmp_path / "tiny.ckpt"
    torch.save({"global_step": 1, "state_dict": tiny["tensors"]}, path)
    with pytest.raises(InputError, match="pickle"):
        load_single_file(path, torch.float32, config_dir=tiny["config_dir"])
    parts = load_single_file(path, torch.float32, allow_pickle=True, config_dir=tiny["config_dir"])
    for loaded, original in zip(
        [parts[name] for name in ("unet", "vae", "text_encoder")], tiny["models"], strict=True
    ):
        expected = original.state_dict()
        assert loaded.state_dict().keys() == expected.keys()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, expected[key]), key


def test_incomplete_or_mismatched_checkpoints_fail_in_one_line(tiny, tmp_path):
    tensors = dict(tiny["tensors"])
    del tensors["first_stage_model.decoder.conv_out.weight"]
    path = _write(tmp_path / "incomplete.safetensors", tensors)
    with pytest.raises(ModelError, match=r"vae from incomplete.safetensors: some of its weights are missing"):
        load_single_file(path, torch.float32, config_dir=tiny["config_dir"])

    tensors = dict(tiny["tensors"])
    tensors["model.diffusion_model.out.2.weight"] = torch.zeros(4, 64, 3, 3)
    path = _write(tmp_path / "mismatched.safetensors", tensors)
    with pytest.raises(ModelError) as caught:
        load_single_file(path, torch.float32, config_dir=tiny["config_dir"])
    assert "conv_out.weight has shape" in str(caught.value) and "\n" not in str(caught.value)

    tensors = {key: value for key, value in tiny["tensors"].items() if not key.startswith("cond_stage_model")}
    path = _write(tmp_path / "no-text.safetensors", tensors)
    with pytest.raises(ModelError, match="text encoder"):
        load_single_file(path, torch.float32, config_dir=tiny["config_dir"])


# ---------------------------------------------------------------------------------------------
# A tiny SDXL-shaped model (ddsedit.tiny's), written in SDXL's original single-file layout

SDXL_TEXT_PREFIXES = {"text_encoder": "conditioner.embedders.0.", "text_encoder_2": "conditioner.embedders.1."}


def _sdxl_ldm_tensors(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    unet, vae = models["unet"], models["vae"]
    return {
        **unet_to_ldm(unet.state_dict(), unet.config),
        **vae_to_ldm(vae.state_dict(), vae.config),
        **clip_to_ldm(models["text_encoder"].state_dict(), prefix="conditioner.embedders.0.transformer."),
        **open_clip_to_ldm(
            models["text_encoder_2"].state_dict(), extra_layer=False, prefix="conditioner.embedders.1.model."
        ),
    }


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sdxl")
    folder = build_tiny_sdxl_pipeline(root / "pipeline")
    models = {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"),
    }
    # Give the norms non-default values so that a weight left unloaded, or loaded from its twin, would show.
    torch.manual_seed(2)
    with torch.no_grad():
        for model in models.values():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.add_(0.1 * torch.randn_like(parameter))
    tensors = _sdxl_ldm_tensors(models)
    path = root / "tiny-sdxl.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return {"folder": folder, "path": path, "tensors": tensors, "models": {k: m.eval() for k, m in models.items()}}


def _assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    expected = original.state_dict()
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key


def _bare_ldm_vae(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """A VAE's weights as a standalone original-layout VAE file holds them (no ``first_stage_model.``)."""
    prefixed = vae_to_ldm(vae.state_dict(), vae.config)
    return {key.removeprefix("first_stage_model."): value for key, value in prefixed.items()}


def test_sdxl_single_file_round_trip(tiny_sdxl):
    assert detect_sd_version(tiny_sdxl["path"]) == "sdxl"
    parts = load_single_file(tiny_sdxl["path"], torch.float32, config_dir=tiny_sdxl["folder"])
    assert set(parts) == {
        "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "family",
        "pipeline_config",
    }  # fmt: skip
    assert parts["family"] == "sdxl"
    assert parts["pipeline_config"] == {"force_zeros_for_empty_prompt": True}
    assert type(parts["text_encoder"]) is CLIPTextModel
    assert type(parts["text_encoder_2"]) is CLIPTextModelWithProjection
    for name, original in tiny_sdxl["models"].items():
        _assert_same_weights(parts[name], original)
    assert parts["vae"].config.force_upcast and parts["vae"].config.scaling_factor == 0.13025

    folder = tiny_sdxl["folder"]
    for name in ("tokenizer", "tokenizer_2"):
        reference = CLIPTokenizer.from_pretrained(folder / name)
        assert parts[name]("a photo of a cat").input_ids == reference("a photo of a cat").input_ids
        assert parts[name].pad_token_id == reference.pad_token_id

    scheduler = parts["scheduler"]
    assert isinstance(scheduler, DDPMScheduler) and scheduler.config.prediction_type == "epsilon"
    euler = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    assert torch.equal(scheduler.alphas_cumprod, euler.alphas_cumprod)

    with torch.no_grad():  # the pooled, projected output that SDXL's added conditioning reads
        ids = torch.tensor([parts["tokenizer_2"]("a photo of a cat").input_ids])
        torch.testing.assert_close(
            parts["text_encoder_2"](ids).text_embeds, tiny_sdxl["models"]["text_encoder_2"](ids).text_embeds
        )


def test_sdxl_in_half_precision_with_v_prediction(tiny_sdxl, tmp_path):
    parts = load_single_file(
        tiny_sdxl["path"], torch.bfloat16, config_dir=tiny_sdxl["folder"], prediction_type="v_prediction"
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert {parameter.dtype for parameter in parts[name].parameters()} == {torch.bfloat16}
    assert parts["scheduler"].config.prediction_type == "v_prediction"
    # a file that declares v-prediction gets it from the bundled sdxl-v configs' scheduler
    marked = _write(tmp_path / "vpred.safetensors", {"v_pred": torch.zeros(0), **_sdxl_stub()})
    assert detect_sd_version(marked) == "sdxl-v"


def test_sd_files_report_their_family(tiny):
    parts = load_single_file(tiny["path"], torch.float32, config_dir=tiny["config_dir"])
    assert parts["family"] == "sd" and parts["pipeline_config"] == {}
    assert "text_encoder_2" not in parts and "tokenizer_2" not in parts


def test_incomplete_sdxl_files_fail_in_one_line(tiny_sdxl, tmp_path):
    folder = tiny_sdxl["folder"]

    def load(tensors: dict[str, torch.Tensor], config_dir: Path = folder) -> str:
        path = _write(tmp_path / "broken.safetensors", {key: value.contiguous() for key, value in tensors.items()})
        with pytest.raises(ModelError) as caught:
            load_single_file(path, torch.float32, config_dir=config_dir)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    tensors = dict(tiny_sdxl["tensors"])
    del tensors["conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc.weight"]
    assert "text encoder 2 from broken.safetensors: some of its weights are missing" in load(tensors)

    tensors = dict(tiny_sdxl["tensors"])
    del tensors["model.diffusion_model.label_emb.0.2.bias"]
    assert load(tensors) == (
        "cannot load the unet from broken.safetensors: some of its weights are missing from the file "
        "(first label_emb.0.2.bias)"
    )

    tensors = dict(tiny_sdxl["tensors"])
    tensors["conditioner.embedders.1.model.text_projection"] = torch.zeros(32, 16)
    assert "cannot load the text encoder 2 from broken.safetensors" in load(tensors)

    no_second = tmp_path / "configs"
    shutil.copytree(folder, no_second, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    assert load(tiny_sdxl["tensors"], no_second) == (
        f"{no_second} holds no text_encoder_2, tokenizer_2 config, which an sdxl checkpoint needs"
    )

    # without config_dir the bundled full-size SDXL configs are used, which a tiny model does not fit
    message = load(tiny_sdxl["tensors"], None)
    assert message.startswith("cannot load the unet from broken.safetensors:") and "has shape" in message


# ---------------------------------------------------------------------------------------------
# Standalone VAE files

_OLD_ATTENTION_NAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def _old_diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict as diffusers < 0.14 named its attention projections."""
    renamed = {}
    for key, value in state.items():
        for new, old in _OLD_ATTENTION_NAMES.items():
            key = key.replace(new, old)
        renamed[key] = value
    return renamed


def test_standalone_vae_files(tiny_sdxl, tmp_path):
    vae = tiny_sdxl["models"]["vae"]
    bare = _bare_ldm_vae(vae)
    layouts = {
        "sdxl_vae.safetensors": bare,
        "with-prefix.safetensors": vae_to_ldm(vae.state_dict(), vae.config),
        "whole-checkpoint.safetensors": tiny_sdxl["tensors"],
        "diffusion_pytorch_model.safetensors": vae.state_dict(),
        "old-diffusers.safetensors": _old_diffusers_names(vae.state_dict()),
    }
    for name, tensors in layouts.items():
        path = _write(tmp_path / name, {key: value.contiguous() for key, value in tensors.items()})
        loaded = load_single_file_vae(path, vae.config, torch.float32)
        assert isinstance(loaded, AutoencoderKL) and not loaded.training
        _assert_same_weights(loaded, vae)

    half = _write(tmp_path / "sdxl.vae.safetensors", {key: value.half() for key, value in bare.items()})
    loaded = load_single_file_vae(half, dict(vae.config), torch.float32)
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float32}
    _assert_same_weights(loaded, copy.deepcopy(vae).half().float())  # only fp16's rounding differs
    loaded = load_single_file_vae(half, vae.config, torch.bfloat16)
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.bfloat16}

    pickled = tmp_path / "vae-ft-mse-840000-ema-pruned.ckpt"
    torch.save({"state_dict": bare}, pickled)
    with pytest.raises(InputError, match="pickle checkpoint"):
        load_single_file_vae(pickled, vae.config, torch.float32)
    _assert_same_weights(load_single_file_vae(pickled, vae.config, torch.float32, allow_pickle=True), vae)


def test_vae_files_that_do_not_fit_fail_in_one_line(tiny_sdxl, tiny, tmp_path):
    vae = tiny_sdxl["models"]["vae"]
    bare = _bare_ldm_vae(vae)

    def refused(name: str, tensors: dict[str, torch.Tensor]) -> str:
        path = _write(tmp_path / name, {key: value.contiguous() for key, value in tensors.items()})
        with pytest.raises(ModelError) as caught:
            load_single_file_vae(path, vae.config, torch.float32)
        message = str(caught.value)
        assert message.startswith(f"{name} is not a VAE for this model: ") and "\n" not in message
        return message

    other_vae = tiny["models"][1]  # 32/64 channels, not 16/32
    other = vae_to_ldm(other_vae.state_dict(), other_vae.config)
    assert "has shape" in refused("other.safetensors", other)
    assert "it lacks 1 of the model's" in refused(
        "incomplete.safetensors", {key: value for key, value in bare.items() if key != "decoder.conv_out.bias"}
    )
    extra = {**vae.state_dict(), "decoder.extra.weight": torch.zeros(1)}
    assert "that the model's VAE does not have (first decoder.extra.weight)" in refused("extra.safetensors", extra)
    assert "holds no VAE weights" in refused("lora.safetensors", {"lora_unet_down.weight": torch.zeros(2)})

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelError, match="not a valid safetensors file"):
        load_single_file_vae(corrupt, vae.config, torch.float32)


# ---------------------------------------------------------------------------------------------
# SD3 and Flux.1 single files


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """diffusers' final AdaLayerNormContinuous is (scale, shift); the original MMDiT's is (shift, scale)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def mmdit_to_original(state: dict[str, torch.Tensor], prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel keys -> the original MMDiT's (``joint_blocks.N.{x,context}_block.*``)."""
    plain = {
        "pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    }  # fmt: skip
    block = {
        "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
        "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
        "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
        "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    }  # fmt: skip
    converted: dict[str, torch.Tensor] = {}
    layers = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("transformer_blocks."))
    for key, value in state.items():
        stem, _, kind = key.rpartition(".")
        if key == "pos_embed.pos_embed":
            converted["pos_embed"] = value
        elif stem in plain:
            converted[f"{plain[stem]}.{kind}"] = value
        elif stem == "norm_out.linear":
            converted[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(value)
        elif match := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", stem):
            index, rest = int(match[1]), match[2]
            if rest in ("attn.to_q", "attn.add_q_proj"):  # q, k and v are one projection there
                names = ("to_q", "to_k", "to_v") if rest == "attn.to_q" else ("add_q_proj", "add_k_proj", "add_v_proj")
                parts = [state[f"transformer_blocks.{index}.attn.{name}.{kind}"] for name in names]
                side = "x_block" if rest == "attn.to_q" else "context_block"
                converted[f"joint_blocks.{index}.{side}.attn.qkv.{kind}"] = torch.cat(parts)
            elif rest in block:
                last_context = index == layers - 1 and rest == "norm1_context.linear"  # the last block's is continuous
                converted[f"joint_blocks.{index}.{block[rest]}.{kind}"] = _swap_halves(value) if last_context else value
            elif not re.fullmatch(r"attn\.(to_[kv]|add_[kv]_proj)", rest):
                raise AssertionError(f"no MMDiT name for {key}")
        else:
            raise AssertionError(f"no MMDiT name for {key}")
    return {prefix + key: value for key, value in converted.items()}


def _identity_projection(folder: Path) -> None:
    """SD3's CLIP-L pooled output is used unprojected: its single files hold no projection (diffusers loads an
    identity one), so the tiny folder's is made the identity for the round trip."""
    encoder = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder")
    with torch.no_grad():
        encoder.text_projection.weight.copy_(torch.eye(encoder.text_projection.weight.shape[0]))
    encoder.save_pretrained(folder / "text_encoder")


@pytest.fixture(scope="module")
def tiny_sd3_file(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny SD3 pipeline (T5 included) as one original-layout file, and its folder (also its configs)."""
    from diffusers import SD3Transformer2DModel
    from transformers import T5EncoderModel

    from ddsedit.tiny import build_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("tiny-sd3-file")
    folder = build_tiny_sd3_pipeline(root / "folder")
    _identity_projection(folder)
    transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    clip_l = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder")
    clip_g = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_3")
    clip_l_state = {key: value for key, value in clip_l.state_dict().items() if not key.startswith("text_projection")}
    tensors = {
        **mmdit_to_original(transformer.state_dict()),
        **vae_to_ldm(vae.state_dict(), vae.config),
        **clip_to_ldm(clip_l_state, "text_encoders.clip_l.transformer."),
        **clip_to_ldm(clip_g.state_dict(), "text_encoders.clip_g.transformer."),
        **{"text_encoders.clip_g.transformer.text_projection.weight": clip_g.text_projection.weight},
        **{f"text_encoders.t5xxl.transformer.{key}": value for key, value in t5.state_dict().items()},
    }
    tensors = {key: value.contiguous().clone() for key, value in tensors.items()}
    return _write(root / "sd3_tiny_incl_clips_t5.safetensors", tensors), folder


def _assert_equal_weights(mine: torch.nn.Module, theirs: torch.nn.Module, name: str) -> None:
    expected = theirs.state_dict()
    assert sorted(mine.state_dict()) == sorted(expected), name
    for key, value in mine.state_dict().items():
        assert torch.equal(value, expected[key]), f"{name}: {key}"


def test_sd3_single_file_round_trip(tiny_sd3_file) -> None:
    from ddsedit.loading import load_sd3_folder

    path, folder = tiny_sd3_file
    parts = load_single_file(path, torch.float32, config_dir=folder)
    expected = load_sd3_folder(folder, torch.float32)
    assert parts["family"] == "sd3" and parts["pipeline_config"] == {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        _assert_equal_weights(parts[name], expected[name], name)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        assert parts[name]("a red circle").input_ids == expected[name]("a red circle").input_ids, name
    assert parts["scheduler"].config.shift == 3.0


def _flow_stub(family: str, blocks: int = 24, width: int = 1536, prefix: str = UNET_PREFIX, **extra: bool):
    """Tensors named (and, where detection reads a shape, shaped) as an SD3 or Flux.1 file's."""
    one = torch.zeros(1)  # cloned below: safetensors refuses shared storage
    if family == "sd3":
        tensors = {f"{prefix}joint_blocks.{index}.x_block.attn.qkv.weight": one for index in range(blocks)}
        tensors[f"{prefix}x_embedder.proj.weight"] = torch.zeros(width, 1, 1, 1)
        if extra.get("mmdit_x"):
            tensors[f"{prefix}joint_blocks.0.x_block.attn2.qkv.weight"] = one
    else:
        tensors = {f"{prefix}double_blocks.0.img_attn.qkv.weight": one,
                   f"{prefix}img_in.weight": torch.zeros(1, 384 if extra.get("fill") else 64)}  # fmt: skip
        if extra.get("guidance"):
            tensors[f"{prefix}guidance_in.in_layer.weight"] = one
    for part in ("vae", "clip_l", "clip_g", "t5"):
        if extra.get(part):
            name = {"vae": "first_stage_model.decoder.conv_in.weight", "t5": "text_encoders.t5xxl.transformer.x"}.get(
                part, f"text_encoders.{part}.transformer.x"
            )
            tensors[name] = one
    return {key: value.clone() for key, value in tensors.items()}


@pytest.mark.parametrize(
    ("family", "options", "expected"),
    [
        ("sd3", {}, "sd3-medium"),
        ("sd3", {"blocks": 38, "width": 2432}, "sd3.5-large"),
        ("flux", {"guidance": True}, "flux-dev"),
        ("flux", {"guidance": True, "prefix": ""}, "flux-dev"),  # BFL's transformer-only layout
        ("flux", {}, "flux-schnell"),
    ],
)
def test_detect_flow_models(tmp_path, family, options, expected) -> None:
    path = _write(tmp_path / "model.safetensors", _flow_stub(family, **options))
    assert detect_sd_version(path) == expected
    assert checkpoints.VERSION_FAMILIES[expected] == family
    assert (checkpoints.MODEL_CONFIGS_DIR / expected / "transformer" / "config.json").is_file()


def test_flow_files_without_a_shipped_config_or_a_component_are_refused_in_one_line(tmp_path) -> None:
    cases = [
        (_flow_stub("sd3", mmdit_x=True), "SD3.5 medium .*ships no config"),
        (_flow_stub("sd3", blocks=12, width=768), "SD3 transformer of 12 blocks 768 wide"),
        (_flow_stub("flux", fill=True), "384 input features, not 64 .*Fill or Depth"),
    ]
    for tensors, message in cases:
        path = _write(tmp_path / "model.safetensors", tensors)
        with pytest.raises(ModelError, match=message):
            detect_sd_version(path)
    cases = [
        (_flow_stub("flux", guidance=True, prefix=""),
         r"Flux.1 file without its VAE, CLIP-L .*, T5 .*: pass .*\(black-forest-labs/FLUX.1-dev\)"),
        (_flow_stub("sd3", vae=True), r"Stable Diffusion 3 file without its CLIP-L .*, CLIP-G .*: pass"),
        (_flow_stub("sd3", vae=True, clip_l=True, clip_g=True, t5=True),
         r"holds T5 weights, but .*sd3-medium has no T5 tokenizer .*stable-diffusion-3-medium-diffusers"),
    ]  # fmt: skip
    for tensors, message in cases:
        path = _write(tmp_path / "model.safetensors", tensors)
        with pytest.raises(ModelError, match=message) as raised:
            load_single_file(path, torch.float32)
        assert "\n" not in str(raised.value)
    with pytest.raises(InputError, match="flow velocity"):
        load_single_file(path, torch.float32, prediction_type="epsilon")


def test_load_model_routes_an_sd3_file(tiny_sd3_file, monkeypatch) -> None:
    """With the shipped-config folder pointed at the tiny model's, the file loads as SD3."""
    from ddsedit import loading

    path, folder = tiny_sd3_file
    configs = path.parent / "configs"
    configs.mkdir(exist_ok=True)
    if not (configs / "sd3-medium").exists():
        (configs / "sd3-medium").symlink_to(folder)
    monkeypatch.setattr(checkpoints, "MODEL_CONFIGS_DIR", configs)
    monkeypatch.setitem(checkpoints.SD3_SIZES, (2, 32), "sd3-medium")
    components, _, _ = loading.load_model(path, device="cpu", dtype="fp32")
    assert components.family.name == "sd3" and components.prediction_type == "velocity"
    assert components.text_encoder_3 is not None and components.absent_text_encoders == ()
    assert components.scheduler_config["shift"] == 3.0 and components.alphas_cumprod is None


def flux_to_original(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel keys -> BFL's (``double_blocks.N.*``, ``single_blocks.N.*``), as the
    transformer-only files (no prefix) and ComfyUI's all-in-one ones (``model.diffusion_model.``) name them."""
    plain = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
    }  # fmt: skip
    double = {
        "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
        "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
        "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
        "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
        "ff_context.net.2": "txt_mlp.2", "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    }  # fmt: skip
    single = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
              "proj_out": "linear2"}  # fmt: skip
    fused = {  # diffusers' separate projections, concatenated in this order into one
        ("transformer_blocks", "attn.to_q"): ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
        ("transformer_blocks", "attn.add_q_proj"):
            ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        ("single_transformer_blocks", "attn.to_q"): ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    }  # fmt: skip
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        stem, _, kind = key.rpartition(".")
        kind = "scale" if stem.split(".")[-1].startswith("norm_") and kind == "weight" else kind  # RMSNorm scales
        if stem in plain:
            converted[f"{plain[stem]}.{kind}"] = value
        elif stem == "norm_out.linear":
            converted[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(value)
        elif match := re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", stem):
            blocks, index, rest = match[1], match[2], match[3]
            original = "double_blocks" if blocks == "transformer_blocks" else "single_blocks"
            renames = double if blocks == "transformer_blocks" else single
            if (blocks, rest) in fused:
                name, parts = fused[(blocks, rest)]
                converted[f"{original}.{index}.{name}.{kind}"] = torch.cat(
                    [state[f"{blocks}.{index}.{part}.{kind}"] for part in parts]
                )
            elif rest in renames:
                converted[f"{original}.{index}.{renames[rest]}.{kind}"] = value
            elif not any(rest == part for _, parts in fused.values() for part in parts):
                raise AssertionError(f"no BFL name for {key}")
        else:
            raise AssertionError(f"no BFL name for {key}")
    return {prefix + key: value for key, value in converted.items()}


@pytest.mark.parametrize("version", ["sd3-medium", "flux-dev", "flux-schnell"])
def test_the_tests_key_mappings_are_diffusers_inverse_at_full_size(version) -> None:
    """The full-size models on the meta device: the test's own mapping to the original layout, then diffusers'
    converter back, gives every tensor's name and shape. (diffusers' Flux converter assumes FLUX.1's width, 3072,
    so the tiny Flux round trip below cannot run its transformer through it: this is where that mapping is checked.)"""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    flux = version.startswith("flux")
    model_class = FluxTransformer2DModel if flux else SD3Transformer2DModel
    with init_empty_weights():
        model = model_class.from_config(model_class.load_config(MODEL_CONFIGS_DIR / version / "transformer"))
    state = model.state_dict()
    original = flux_to_original(state) if flux else mmdit_to_original(state, prefix="")
    convert = (
        checkpoints.single_file_utils.convert_flux_transformer_checkpoint_to_diffusers if flux
        else checkpoints.single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers
    )  # fmt: skip
    back = convert(dict(original))
    assert {key: tuple(value.shape) for key, value in back.items()} == {
        key: tuple(value.shape) for key, value in state.items()
    }


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_flux_all_in_one_file_round_trip(tmp_path, monkeypatch, guidance_embeds) -> None:
    """ComfyUI's all-in-one layout (``model.diffusion_model.*``, ``vae.*``, ``text_encoders.clip_l.*``,
    ``text_encoders.t5xxl.*``): every component loads back equal to the tiny folder's. diffusers' Flux converter
    splits single blocks at FLUX.1's width (3072), so here it is replaced by one that checks it is handed exactly
    the transformer's tensors in BFL's layout and answers the folder's; the mapping itself is checked at full
    size above."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
    from transformers import T5EncoderModel

    from ddsedit.loading import load_flux_folder
    from ddsedit.tiny import build_tiny_flux_pipeline

    folder = build_tiny_flux_pipeline(tmp_path / "folder", guidance_embeds=guidance_embeds)
    transformer_state = FluxTransformer2DModel.from_pretrained(folder / "transformer").state_dict()
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    clip_l = CLIPTextModel.from_pretrained(folder / "text_encoder")
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2")
    original_transformer = flux_to_original(transformer_state)
    vae_tensors = {"vae." + key.removeprefix("first_stage_model."): value
                   for key, value in vae_to_ldm(vae.state_dict(), vae.config).items()}  # fmt: skip
    tensors = {
        **{UNET_PREFIX + key: value for key, value in original_transformer.items()},
        **vae_tensors,
        **clip_to_ldm(clip_l.state_dict(), "text_encoders.clip_l.transformer."),
        **{f"text_encoders.t5xxl.transformer.{key}": value for key, value in t5.state_dict().items()},
    }
    tensors = {key: value.contiguous().clone() for key, value in tensors.items()}
    path = _write(tmp_path / "flux1-tiny-all-in-one.safetensors", tensors)

    def handed_the_transformer(checkpoint, **kwargs):
        received = {key.removeprefix(UNET_PREFIX): value for key, value in checkpoint.items()}
        assert received.keys() == original_transformer.keys()
        assert all(torch.equal(received[key], value) for key, value in original_transformer.items())
        return {key: value.clone() for key, value in transformer_state.items()}

    monkeypatch.setitem(SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"], "checkpoint_mapping_fn",
                        handed_the_transformer)  # fmt: skip
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / ("flux-dev" if guidance_embeds else "flux-schnell")).symlink_to(folder)
    monkeypatch.setattr(checkpoints, "MODEL_CONFIGS_DIR", configs)
    assert detect_sd_version(path) == ("flux-dev" if guidance_embeds else "flux-schnell")
    parts = load_single_file(path, torch.float32)
    expected = load_flux_folder(folder, torch.float32)
    assert parts["family"] == "flux" and parts["unet"].config.guidance_embeds == guidance_embeds
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_equal_weights(parts[name], expected[name], name)
    assert type(parts["text_encoder"]) is CLIPTextModel
    for name in ("tokenizer", "tokenizer_2"):
        assert parts[name]("a red circle").input_ids == expected[name]("a red circle").input_ids, name
    assert parts["scheduler"].config == expected["scheduler"].config


def test_an_sd3_file_without_t5_loads_without_it(tiny_sd3_file, tmp_path) -> None:
    """As sd3_medium_incl_clips.safetensors: T5 absent, as the folder loader leaves it (the model runs on its CLIPs)."""
    from safetensors.torch import load_file

    path, folder = tiny_sd3_file
    tensors = {key: value for key, value in load_file(path).items() if not key.startswith("text_encoders.t5xxl.")}
    parts = load_single_file(_write(tmp_path / "sd3_tiny_incl_clips.safetensors", tensors), torch.float32,
                             config_dir=folder)  # fmt: skip
    assert parts["text_encoder_3"] is None and parts["tokenizer_3"] is None
    assert parts["text_encoder_2"] is not None and parts["unet"].config.num_layers == 2


@pytest.mark.parametrize(
    ("version", "transformer_params", "guidance"),
    [("sd3-medium", 2_028_328_000, None), ("sd3.5-large", 8_056_627_520, None),
     ("flux-dev", 11_901_408_320, True), ("flux-schnell", 11_891_178_560, False)],
)  # fmt: skip
def test_shipped_flow_configs(version, transformer_params, guidance) -> None:
    """The hub models' sizes, counted on the meta device; each folder has what its single files need."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    folder = MODEL_CONFIGS_DIR / version
    model_class = FluxTransformer2DModel if version.startswith("flux") else SD3Transformer2DModel
    with init_empty_weights():
        transformer = model_class.from_config(model_class.load_config(folder / "transformer"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    assert _count(transformer) == transformer_params
    assert vae.config.latent_channels == 16 and not vae.config.use_quant_conv
    if guidance is not None:
        assert transformer.config.guidance_embeds == guidance
    assert read_pipeline_config(folder) == {}
    for tokenizer in ["tokenizer", "tokenizer_2"] if version.startswith("sd3") else ["tokenizer"]:
        _assert_clip_tokenizer(folder / tokenizer, pad_id=0 if tokenizer == "tokenizer_2" else 49407)
