"""SDXL on the family seam: ddsedit conditions SDXL's UNet exactly as diffusers' StableDiffusionXLPipeline does
(tiny random SDXL built in code, CPU, fp32, compared bit for bit), and every command runs on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from ddsedit import gradients
from ddsedit.conditioning import call_sdxl_unet
from ddsedit.editor import Editor
from ddsedit.errors import InputError, ModelError
from ddsedit.gradients import GradientInputs, PromptEmbeddings
from ddsedit.loading import load_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PROMPT, NEGATIVE = "a red circle", "a green square"


@pytest.fixture(scope="module")
def pipeline(tiny_sdxl_dir: Path) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def sdxl_editor(tiny_sdxl_dir: Path) -> Editor:
    return Editor.from_pretrained(tiny_sdxl_dir, device="cpu")


# ------------------------------------------------------------------ conditioning, against the pipeline


@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_prompt_conditioning_equals_the_pipelines(pipeline, sdxl_editor, negative: str | None) -> None:
    """Hidden states of both encoders and the pooled embedding, for the prompt and the negative (none: zeros,
    as the model's force_zeros_for_empty_prompt says)."""
    embeds, negative_embeds, pooled, negative_pooled = pipeline.encode_prompt(
        PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=True, negative_prompt=negative
    )
    ours = sdxl_editor.encode_prompt([negative or "", PROMPT])
    assert ours.hidden_states.shape == (2, 77, 64)
    assert torch.equal(ours.hidden_states[1:], embeds) and torch.equal(ours.extra["text_embeds"][1:], pooled)
    assert torch.equal(ours.hidden_states[:1], negative_embeds)
    assert torch.equal(ours.extra["text_embeds"][:1], negative_pooled)
    if negative is None:
        assert not negative_embeds.any() and not negative_pooled.any()


def test_the_empty_prompt_is_encoded_when_the_model_does_not_zero_it(tiny_sdxl_dir: Path, pipeline) -> None:
    editor = Editor.from_pretrained(tiny_sdxl_dir, device="cpu")
    editor.components.pipeline_config["force_zeros_for_empty_prompt"] = False
    pipeline.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        _, negative_embeds, _, negative_pooled = pipeline.encode_prompt(
            PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=True
        )
    finally:
        pipeline.register_to_config(force_zeros_for_empty_prompt=True)
    ours = editor.encode_prompt([""])
    assert negative_embeds.abs().sum() > 0
    assert torch.equal(ours.hidden_states, negative_embeds) and torch.equal(ours.extra["text_embeds"], negative_pooled)


def test_size_ids_equal_the_pipelines(pipeline, sdxl_editor) -> None:
    """Original size = the source's, crop (0, 0), target = the working size; (height, width) order."""
    expected = pipeline._get_add_time_ids(
        (40, 60), (0, 0), (22, 32), dtype=torch.float32,
        text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim,
    )  # fmt: skip
    ours = sdxl_editor.image_conditioning([((60, 40), (32, 22)), ((64, 48), (32, 24))])["time_ids"]
    assert torch.equal(ours[:1], expected)
    assert ours[1].tolist() == [48, 64, 0, 0, 24, 32]


class _UNetCalls:
    """Records the UNet's inputs and outputs, as a forward pre-hook and hook with keyword arguments."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handles = [
            unet.register_forward_pre_hook(self._before, with_kwargs=True),
            unet.register_forward_hook(self._after, with_kwargs=True),
        ]

    def _before(self, module, args, kwargs):
        self.calls.append({"args": args, "kwargs": dict(kwargs)})

    def _after(self, module, args, kwargs, output):
        self.calls[-1]["output"] = output[0] if isinstance(output, tuple) else output.sample

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_one_guided_noise_prediction_equals_the_pipelines(pipeline, sdxl_editor, negative: str | None) -> None:
    """The pipeline's own first step (source 64x48 worked at 32x24): ddsedit calls the UNet with the same
    hidden states, pooled text and size ids, and its guided prediction is the pipeline's, bit for bit."""
    recorder = _UNetCalls(pipeline.unet)
    try:
        pipeline(
            PROMPT, negative_prompt=negative, height=24, width=32, original_size=(48, 64), timesteps=[500],
            guidance_scale=7.5, output_type="latent", generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    finally:
        recorder.remove()
    (call,) = recorder.calls
    sample, timestep = call["args"][0], call["args"][1]
    assert float(timestep) == 500.0
    uncond, cond = call["output"].chunk(2)
    pipeline_guided = uncond + 7.5 * (cond - uncond)

    prompts = sdxl_editor.encode_prompt([negative or "", PROMPT])
    sizes = sdxl_editor.image_conditioning([((64, 48), (32, 24))])
    embeddings = PromptEmbeddings(
        unconditional=prompts.rows(0, 1).with_extra(sizes), source=prompts.rows(1, 2).with_extra(sizes),
        target=prompts.rows(1, 2).with_extra(sizes),
    )  # fmt: skip
    inputs = GradientInputs(
        sdxl_editor.components.unet, sample[:1], embeddings, sdxl_editor.components.alphas_cumprod, "epsilon", 7.5,
        call=call_sdxl_unet,
    )  # fmt: skip
    ours_recorder = _UNetCalls(sdxl_editor.components.unet)
    try:
        (guided,) = gradients.guided_predictions(inputs, [(sample[:1], embeddings.target)], timestep.reshape(1).long())
    finally:
        ours_recorder.remove()
    (ours_call,) = ours_recorder.calls
    theirs, mine = call["kwargs"], ours_call["kwargs"]
    assert torch.equal(mine["encoder_hidden_states"], theirs["encoder_hidden_states"])
    for key in ("text_embeds", "time_ids"):
        assert torch.equal(mine["added_cond_kwargs"][key], theirs["added_cond_kwargs"][key]), key
    assert torch.equal(guided, pipeline_guided)


# ------------------------------------------------------------------ loading


def test_the_family_is_read_and_both_text_encoders_are_freed_after_use(tiny_sdxl_dir: Path) -> None:
    editor = Editor.from_pretrained(tiny_sdxl_dir, device="cpu", keep_text_encoder=False)
    assert editor.family.name == "sdxl" and editor.components.pipeline_config == {"force_zeros_for_empty_prompt": True}
    assert editor.config().size == 32  # the model's ddsedit.json over the family's 1024
    editor.encode_prompt([PROMPT])
    assert editor.components.text_encoder is None and editor.components.text_encoder_2 is None
    assert editor.encode_prompt([PROMPT]).hidden_states.shape == (1, 77, 64)  # cached
    with pytest.raises(Exception, match="text encoders were freed"):
        editor.encode_prompt(["a blue circle"])


def test_the_vae_is_upcast_in_fp16_as_the_pipeline_does(tiny_sdxl_dir: Path) -> None:
    components, _, dtype = load_model(tiny_sdxl_dir, device="cpu", dtype="fp16")
    assert dtype == torch.float16 and components.unet.dtype == torch.float16
    assert components.vae.dtype == torch.float32 and components.text_encoder_2.dtype == torch.float16


def test_a_vae_in_place_of_the_models_is_loaded_and_recorded(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    editor = Editor.from_pretrained(tiny_sdxl_dir, device="cpu", vae=tiny_sdxl_dir / "vae")
    assert editor.components.vae_identity == str((tiny_sdxl_dir / "vae").resolve())
    result = editor.edit(Image.new("RGB", (32, 32), "white"), "dds", PROMPT, ref="a white circle",
                         config=editor.config(steps=1, seed=0))  # fmt: skip
    assert result.parameters["vae"] == str((tiny_sdxl_dir / "vae").resolve())
    assert result.parameters["model_family"] == "sdxl"
    with pytest.raises(InputError, match="--vae .*no such file or folder"):
        load_model(tiny_sdxl_dir, device="cpu", vae=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a VAE folder"):
        load_model(tiny_sdxl_dir, device="cpu", vae=tmp_path / "empty")


def _refiner(tmp_path: Path, tiny_sdxl_dir: Path) -> Path:
    index = json.loads((tiny_sdxl_dir / "model_index.json").read_text())
    index.update({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
                  "tokenizer": [None, None], "requires_aesthetics_score": True})  # fmt: skip
    folder = tmp_path / "refiner"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_the_refiner_is_refused_in_one_line(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is the SDXL refiner"):
        load_model(_refiner(tmp_path, tiny_sdxl_dir), device="cpu")


def test_a_unet_without_sdxl_size_conditioning_is_refused(tiny_sdxl_dir: Path) -> None:
    from ddsedit.conditioning import check_sdxl_unet

    components, _, _ = load_model(tiny_sdxl_dir, device="cpu")
    components.unet.register_to_config(addition_time_embed_dim=9)  # as if it took 7 ids (the refiner's 5 + ...)
    with pytest.raises(ModelError, match="not SDXL base's"):
        check_sdxl_unet(components.unet, components.text_encoder_2)


# ------------------------------------------------------------------ every command, through the CLI


def _cli(*args: str):
    from typer.testing import CliRunner

    from ddsedit.cli import app

    return CliRunner().invoke(app, list(args))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("method", ["sds", "dds", "masked-dds", "cds", "pds", "ids"])
def test_every_method_runs_on_sdxl_through_the_cli(method: str, tiny_sdxl_dir: Path, circle_files: dict[str, Path],
                                                   tmp_path: Path) -> None:  # fmt: skip
    """Size kept, model_family recorded, the same seed the same bytes, pixels outside a mask exact."""
    args = [method, "--src", str(circle_files["src"]), "--query", "a blue circle", "--model", str(tiny_sdxl_dir),
            "--steps", "2", "--seed", "3", "--quiet"]  # fmt: skip
    if method != "sds":
        args += ["--ref", PROMPT]
    if method == "masked-dds":
        args += ["--mask", str(circle_files["mask"])]
    outputs = [tmp_path / "first.png", tmp_path / "second.png"]
    for output in outputs:
        result = _cli(*args, "-o", str(output))
        assert result.exit_code == 0, result.stderr
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    with Image.open(outputs[0]) as written:
        assert written.size == (60, 40)
        parameters = json.loads(written.info["ddsedit"])
    assert parameters["model_family"] == "sdxl" and parameters["method"] == method
    assert parameters["model"] == str(tiny_sdxl_dir.resolve()) and parameters["working_size"] == "32x22"
    if method == "masked-dds":
        with Image.open(circle_files["mask"]) as mask_image:
            outside = np.asarray(mask_image.convert("L")) == 0
        assert np.array_equal(_pixels(outputs[0])[outside], _pixels(circle_files["src"])[outside])


def test_auto_mask_and_the_mask_command_on_sdxl(tiny_sdxl_dir: Path, circle_files: dict[str, Path],
                                                tmp_path: Path) -> None:  # fmt: skip
    mask_path, edited = tmp_path / "drawn.mask.png", tmp_path / "edited.png"
    common = ["--src", str(circle_files["src"]), "--ref", PROMPT, "--query", "a blue circle", "--model",
              str(tiny_sdxl_dir), "--seed", "4", "--quiet"]  # fmt: skip
    result = _cli("mask", *common, "-o", str(mask_path), "--mask-threshold", "0.5")
    assert result.exit_code == 0, result.stderr
    with Image.open(mask_path) as mask:
        assert mask.size == (60, 40) and json.loads(mask.info["ddsedit"])["model_family"] == "sdxl"
    result = _cli("masked-dds", *common, "--mask", "auto", "--mask-threshold", "0.5", "--steps", "2",
                  "-o", str(edited))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    with Image.open(edited) as image:
        assert json.loads(image.info["ddsedit"])["mask"] == "auto"


def test_batch_on_sdxl_with_batch_size_two(tiny_sdxl_dir: Path, circle_files: dict[str, Path], tmp_path: Path) -> None:
    manifest = tmp_path / "rows.csv"
    manifest.write_text(
        "src,method,ref,query,seed,out\n"
        f"{circle_files['src']},dds,{PROMPT},a blue circle,1,blue.png\n"
        f"{circle_files['src']},dds,{PROMPT},a green circle,2,green.png\n"
    )
    out = tmp_path / "out"
    args = ["batch", str(manifest), "--out-dir", str(out), "--model", str(tiny_sdxl_dir), "--steps", "2",
            "--batch-size", "2", "--quiet"]  # fmt: skip
    result = _cli(*args)
    assert result.exit_code == 0, result.stderr
    written = sorted(out.glob("*.png"))
    assert len(written) == 2
    for path in written:
        with Image.open(path) as image:
            assert image.size == (60, 40) and json.loads(image.info["ddsedit"])["model_family"] == "sdxl"
    written_at = [path.stat().st_mtime_ns for path in written]
    again = _cli(*args)  # resume: both rows recognised as done on the same SDXL model, nothing rewritten
    assert again.exit_code == 0, again.stderr
    assert [path.stat().st_mtime_ns for path in written] == written_at


def test_bad_sdxl_input_is_one_line(tiny_sdxl_dir: Path, circle_files: dict[str, Path], tmp_path: Path) -> None:
    base = ["dds", "--src", str(circle_files["src"]), "--ref", PROMPT, "--query", "a blue circle", "--quiet"]
    for args, text in [
        ([*base, "--model", str(_refiner(tmp_path, tiny_sdxl_dir))], "is the SDXL refiner"),
        ([*base, "--model", str(tiny_sdxl_dir), "--vae", str(tmp_path / "nowhere")], "no such file or folder"),
        ([*base, "--model", str(tiny_sdxl_dir), "--steps", "0"], "--steps"),
    ]:
        result = _cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert text in lines[0], lines[0]


def test_a_single_file_vae_is_read_with_the_models_vae_config(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    """``--vae file.safetensors`` (e.g. the fp16-fix VAE): weights as saved, the model's VAE config, recorded."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    own = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    changed = {key: value + 0.01 for key, value in own.state_dict().items()}
    path = tmp_path / "fixed.vae.safetensors"
    save_file(changed, str(path))
    components, _, _ = load_model(tiny_sdxl_dir, device="cpu", vae=path)
    assert all(torch.equal(value, changed[key]) for key, value in components.vae.state_dict().items())
    assert components.vae.config.scaling_factor == 0.13025 and components.vae_identity == str(path.resolve())


def test_make_tiny_model_writes_sdxl_and_every_output_records_its_family(tmp_path: Path, tiny_editor: Editor) -> None:
    result = _cli("make-tiny-model", str(tmp_path / "xl"), "--sdxl")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "xl" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    sd_result = tiny_editor.edit(Image.new("RGB", (32, 32), "white"), "sds", "a red circle",
                                 config=tiny_editor.config("sds", steps=1, seed=0))  # fmt: skip
    assert sd_result.parameters["model_family"] == "sd"


def test_a_folder_with_only_fp16_variant_weights_loads(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    """As ``hf download --include '*.fp16.safetensors'`` or ``variant="fp16"`` leave SDXL folders."""
    import shutil

    folder = shutil.copytree(tiny_sdxl_dir, tmp_path / "fp16-variant")
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    components, _, _ = load_model(folder, device="cpu")
    reference, _, _ = load_model(tiny_sdxl_dir, device="cpu")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(components, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name


def test_a_v_prediction_sdxl_model_is_read_from_its_scheduler_config(tmp_path: Path) -> None:
    from ddsedit.tiny import build_tiny_sdxl_pipeline

    folder = build_tiny_sdxl_pipeline(tmp_path / "xl-v", prediction_type="v_prediction")
    editor = Editor.from_pretrained(folder, device="cpu")
    result = editor.edit(Image.new("RGB", (32, 32), "white"), "dds", "a red circle", ref="a white circle",
                         config=editor.config(steps=2, seed=0))  # fmt: skip
    assert result.parameters["prediction_type"] == "v_prediction" and result.parameters["model_family"] == "sdxl"
