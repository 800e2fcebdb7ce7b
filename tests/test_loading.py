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
    folder = tmp_path / "hunyuan"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanDiTPipeline"}))
    with pytest.raises(ModelError, match="HunyuanDiTPipeline models are not supported yet"):
        loading.load_model(folder, device="cpu")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert loading.folder_family(folder).name == "sd"


# ------------------------------------------------------------------ hub ids of SD3 and Flux.1, from the cache

PROMPT = "a red circle"
# What the hub repos hold besides their diffusers folders (each weight once more, as one big file or a folder of
# single files) and the fp16 variants that some of them carry: none of it may be fetched.
HUB_EXTRAS = {
    "sd3": ["sd3.5_large.safetensors", "text_encoders/clip_g.safetensors", "text_encoders/t5xxl_fp16.safetensors",
            "text_encoder/model.fp16.safetensors", "text_encoder_3/model.fp16-00001-of-00002.safetensors",
            "text_encoder_3/model.fp16-00002-of-00002.safetensors", "text_encoder_3/model.safetensors.index.fp16.json",
            "mmdit.png", "README.md", ".gitattributes"],
    "flux": ["flux1-dev.safetensors", "ae.safetensors", "dev_grid.jpg", "LICENSE.md", "README.md", ".gitattributes"],
}  # fmt: skip


def _repo_files(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def _shard(folder: Path, component: str, model_class: type, variant: str | None = None) -> None:
    """Re-save a component of ``folder`` in shards of a few kB (as the big transformers and T5 are on the hub)."""
    import shutil

    model = model_class.from_pretrained(folder / component)
    if variant == "fp16":
        model.to(torch.float16)
    shutil.rmtree(folder / component)
    model.save_pretrained(folder / component, max_shard_size="20KB", variant=variant)


def _fake_hub_cache(cache: Path, repo_id: str, folder: Path, extras: list[str]) -> Path:
    """Lay ``folder`` out as huggingface_hub caches a repo (``models--org--name/snapshots/<commit>/``, refs/main),
    with the cached listing of the repo's files that huggingface_hub checks a snapshot against: the folder's files
    and ``extras``, which the snapshot lacks, as if never downloaded."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    listing = {name: {"size": 1, "blob_id": f"{index:040x}"} for index, name in enumerate(_repo_files(folder) + extras)}
    (storage / "trees").mkdir()
    (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snapshot


def _use_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read once, at import


def _load_flow(model: str | Path):
    components, _, _ = loading.load_model(model, device="cpu", dtype="fp32")
    return components


def _same_weights(mine: torch.nn.Module, theirs: torch.nn.Module, name: str) -> None:
    expected = theirs.state_dict()
    assert mine.state_dict().keys() == expected.keys(), name
    for key, value in mine.state_dict().items():
        assert torch.equal(value, expected[key]), f"{name}: {key}"


def test_the_hub_patterns_fetch_each_weight_once_in_the_loaders_layout() -> None:
    """FLUX.1-dev's and SD3-medium's repo listings (shortened): the sharded transformer and T5 with their indexes,
    the T5 tokenizer's files; not the root single files, ``text_encoders/``, or fp16 variants beside plain weights."""
    from huggingface_hub.utils import filter_repo_objects

    flux = [
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "text_encoder_2/config.json",
        "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.json", "tokenizer/merges.txt", "tokenizer/vocab.json",
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer_2/spiece.model",
        "tokenizer_2/tokenizer.json", "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer_config.json",
        "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    sd3 = [
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
        "text_encoder_3/config.json", "text_encoder_3/model-00001-of-00002.safetensors",
        "text_encoder_3/model-00002-of-00002.safetensors", "text_encoder_3/model.safetensors.index.json",
        "tokenizer_3/spiece.model", "tokenizer_3/tokenizer.json", "tokenizer_3/tokenizer_config.json",
        "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    for needed, extras in ((flux, HUB_EXTRAS["flux"]), (sd3, HUB_EXTRAS["sd3"])):
        fetched = filter_repo_objects(needed + extras, allow_patterns=list(loading.COMPONENT_FILES))
        assert sorted(fetched) == sorted(needed)
    fp16 = loading.model_file_patterns({"text_encoder_3": "fp16"})
    fetched = filter_repo_objects(sd3 + HUB_EXTRAS["sd3"], allow_patterns=list(fp16))
    assert [name for name in fetched if name.startswith("text_encoder_3/")] == [
        "text_encoder_3/config.json", *HUB_EXTRAS["sd3"][4:7]
    ]


def test_sd3_and_flux_load_by_hub_id_from_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_sd3_dir: Path, tiny_flux_dir: Path
) -> None:
    """Sharded transformers and T5s, SD3's T5 cached only as its fp16 variant (as diffusers' ``variant="fp16"``
    leaves it), offline: the components are the folders' (that T5 rounded to fp16), and the snapshot's missing
    root files and unused variants do not make it count as incomplete."""
    import shutil

    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import T5EncoderModel

    sd3_folder, flux_folder = tmp_path / "sd3", tmp_path / "flux"
    shutil.copytree(tiny_sd3_dir, sd3_folder)
    shutil.copytree(tiny_flux_dir, flux_folder)
    _shard(sd3_folder, "transformer", SD3Transformer2DModel)
    _shard(sd3_folder, "text_encoder_3", T5EncoderModel, variant="fp16")
    _shard(flux_folder, "transformer", FluxTransformer2DModel)
    _shard(flux_folder, "text_encoder_2", T5EncoderModel)
    assert loading.weights_variant(sd3_folder / "text_encoder_3") == "fp16"
    assert len(list((flux_folder / "transformer").glob("*-of-*.safetensors"))) > 1

    cache = tmp_path / "hub"
    plain_t5 = ["text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors",
                "text_encoder_3/model.safetensors.index.json"]  # fmt: skip
    _fake_hub_cache(cache, "org/tiny-sd3", sd3_folder, HUB_EXTRAS["sd3"][:4] + plain_t5)
    _fake_hub_cache(cache, "org/tiny-flux", flux_folder, HUB_EXTRAS["flux"])
    _use_cache(monkeypatch, cache)

    for repo_id, reference, rounded in (("org/tiny-sd3", tiny_sd3_dir, "text_encoder_3"),
                                        ("org/tiny-flux", tiny_flux_dir, None)):  # fmt: skip
        by_id, expected = _load_flow(repo_id), _load_flow(reference)
        assert by_id.identity == f"{repo_id}@0123456789abcdef0123456789abcdef01234567"
        assert by_id.family.name == expected.family.name and by_id.scheduler_config == expected.scheduler_config
        for name in ("unet", "vae", *expected.family.text_encoders):
            if name == rounded:  # the fp16 variant's weights: the folder's, rounded
                getattr(expected, name).to(torch.float16).to(torch.float32)
            _same_weights(getattr(by_id, name), getattr(expected, name), f"{repo_id} {name}")
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            if getattr(expected, name) is not None:
                assert getattr(by_id, name)(PROMPT).input_ids == getattr(expected, name)(PROMPT).input_ids, name

    with pytest.raises(ModelError, match="'org/other' is not in the local Hugging Face cache.*hf download"):
        loading.load_model("org/other", device="cpu")


def test_an_interrupted_download_is_not_taken_for_a_cached_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 tiny_flux_dir: Path) -> None:  # fmt: skip
    """A shard of the transformer is missing from the snapshot, which the cached listing names: not cached."""
    missing_shard = "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"
    _fake_hub_cache(tmp_path / "hub", "org/partial", tiny_flux_dir, [missing_shard])
    _use_cache(monkeypatch, tmp_path / "hub")
    assert loading._cached_snapshot("org/partial") is None
    with pytest.raises(ModelError, match="'org/partial' is not in the local Hugging Face cache"):
        loading.locate_model("org/partial")

