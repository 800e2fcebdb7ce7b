"""Finding models, devices and dtypes; never the network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddsedit import loading
from ddsedit.errors import InputError, ModelError


def test_folder_model_loads_with_its_scheduler(tiny_model_dir) -> None:
    components, device, dtype = loading.load_model(tiny_model_dir, device="cpu", dtype="auto")
    assert device.type == "cpu" and dtype == torch.float32
    assert components.prediction_type == "epsilon"
    assert components.num_train_timesteps == 1000
    # scaled_linear betas 0.00085..0.012, from the model's own scheduler config
    assert components.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-4)
    assert not any(p.requires_grad for p in components.unet.parameters())


def test_unknown_model_name(tmp_path) -> None:
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        loading.locate_model("no-such-model")


def test_hub_id_missing_offline_says_how_to_get_it(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache.*hf download"):
        loading.locate_model("someone/missing-model")


def test_mistyped_folder_is_not_downloaded_as_a_hub_id(monkeypatch, tmp_path) -> None:
    """`runs/typo` beside a real `runs/` folder: a one-line error about the folder, no download attempt."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even online, it must not try the hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(loading, "_hub_snapshot", no_download)
    with pytest.raises(ModelError, match="no model folder runs/typo .*runs exists here"):
        loading.locate_model("runs/typo")


def test_folder_that_is_not_a_diffusers_model(tmp_path) -> None:
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        loading.locate_model(tmp_path)


def test_incomplete_folder(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelError, match="missing .*unet"):
        loading.load_model(tmp_path, device="cpu")


def test_pickle_checkpoints_need_permission(tmp_path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not really")
    with pytest.raises(InputError, match="pickle.*--allow-pickle"):
        loading.locate_model(checkpoint)
    assert loading.locate_model(checkpoint, allow_pickle=True) == ("file", checkpoint)
    other = tmp_path / "model.txt"
    other.write_text("x")
    with pytest.raises(ModelError, match="not a model"):
        loading.locate_model(other)


def test_environment_variable_sets_the_default(monkeypatch) -> None:
    monkeypatch.delenv(loading.MODEL_ENVIRONMENT_VARIABLE, raising=False)
    assert loading.default_model() == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    monkeypatch.setenv(loading.MODEL_ENVIRONMENT_VARIABLE, "/some/model")
    assert loading.default_model() == "/some/model"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_asked_for_but_absent() -> None:
    with pytest.raises(InputError, match="CUDA is not available"):
        loading.resolve_device("cuda")


def test_devices_and_dtypes() -> None:
    assert loading.resolve_device("cpu").type == "cpu"
    with pytest.raises(InputError, match="unknown device"):
        loading.resolve_device("tpu")
    cpu = torch.device("cpu")
    assert loading.resolve_dtype("auto", cpu) == torch.float32
    assert loading.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert loading.resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(InputError, match="unknown dtype"):
        loading.resolve_dtype("fp8", cpu)


def test_defaults_file(tmp_path) -> None:
    assert loading.read_defaults(tmp_path) == {}
    (tmp_path / "ddsedit.json").write_text(json.dumps({"steps": 120}))
    assert loading.read_defaults(tmp_path) == {"steps": 120}
    (tmp_path / "ddsedit.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="JSON object"):
        loading.read_defaults(tmp_path)


def test_a_folder_of_an_unsupported_family_is_one_line_before_its_weights_load(tmp_path: Path) -> None:
    folder = tmp_path / "sd3"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ModelError, match="StableDiffusion3Pipeline models are not supported yet"):
        loading.load_model(folder, device="cpu")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert loading.folder_family(folder).name == "sd"
