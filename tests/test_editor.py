"""The Python API end to end on the tiny random model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddsedit import imageio
from ddsedit.editor import EditConfig, Editor, EditRequest, save_result, webui_parameters
from ddsedit.errors import InputError


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_model_defaults_apply_and_overrides_win(tiny_editor: Editor) -> None:
    assert tiny_editor.components.defaults == {"size": 32}
    assert tiny_editor.config().size == 32
    assert tiny_editor.config(size=48, steps=None).size == 48  # None means "flag not given"
    assert tiny_editor.config().steps == 200


def test_dds_returns_the_source_size_and_is_reproducible(tiny_editor: Editor, circle_image: Image.Image) -> None:
    first = tiny_editor.dds(circle_image, ref="a red circle", query="a blue circle", steps=5, seed=7)
    second = tiny_editor.dds(circle_image, ref="a red circle", query="a blue circle", steps=5, seed=7)
    other = tiny_editor.dds(circle_image, ref="a red circle", query="a blue circle", steps=5, seed=8)
    assert first.size == circle_image.size
    assert np.array_equal(_pixels(first), _pixels(second))  # bit-identical on CPU
    assert not np.array_equal(_pixels(first), _pixels(other))
    assert first.info["seed"] == "7" and first.info["method"] == "dds"


def test_keep_working_size_uses_multiples_of_the_vae_stride(tiny_editor: Editor, circle_image) -> None:
    result = tiny_editor.sds(circle_image, query="a blue circle", steps=2, seed=0, keep_working_size=True)
    stride = tiny_editor.components.vae_scale_factor
    assert stride == 2  # from the tiny VAE's config, not a hard-coded 8
    assert max(result.size) == 32 and result.size[0] % stride == 0 and result.size[1] % stride == 0


def test_masked_dds_keeps_pixels_outside_the_mask(tiny_editor: Editor, circle_files) -> None:
    source = imageio.load_image(circle_files["src"])
    mask = imageio.load_mask(circle_files["mask"], source.size)
    edited = tiny_editor.masked_dds(source, mask, ref="a red circle", query="a blue circle", steps=10, seed=1)
    outside = np.asarray(mask) == 0
    difference = np.abs(_pixels(edited) - _pixels(source))
    assert difference[outside].max() <= 1
    assert difference[~outside].max() > 1  # and something did change inside


def test_keep_working_size_holds_for_masked_dds_with_paste_back(tiny_editor: Editor, circle_files) -> None:
    """The paste-back used to resize to the source's 60x40 even with --keep-working-size."""
    source = imageio.load_image(circle_files["src"])
    mask = imageio.load_mask(circle_files["mask"], source.size)
    kept = tiny_editor.masked_dds(
        source, mask, ref="a red circle", query="a blue circle", steps=2, seed=1, keep_working_size=True
    )
    assert kept.size == (32, 22)  # 60x40 scaled to a longest side of 32, in multiples of the stride 2
    # Outside the mask the pixels are the source's, at the working size.
    small_source = _pixels(source.resize(kept.size, Image.Resampling.LANCZOS))
    outside = np.asarray(mask.resize(kept.size, Image.Resampling.NEAREST)) == 0
    assert np.abs(_pixels(kept) - small_source)[outside].max() <= 1


def test_masked_dds_without_paste_back_changes_the_whole_decode(tiny_editor: Editor, circle_files) -> None:
    source = imageio.load_image(circle_files["src"])
    mask = imageio.load_mask(circle_files["mask"], source.size)
    edited = tiny_editor.masked_dds(
        source, mask, ref="a red circle", query="a blue circle", steps=3, seed=1, paste_back=False
    )
    outside = np.asarray(mask) == 0
    assert np.abs(_pixels(edited) - _pixels(source))[outside].max() > 1  # VAE round trip is lossy


def test_metadata_round_trip_reproduces_the_edit(tiny_editor: Editor, circle_image, tmp_path) -> None:
    config = tiny_editor.config(steps=4, guidance=5.0, lr=0.2, t_min=20, t_max=980, negative="blurry")
    result = tiny_editor.edit(circle_image, "dds", query="a blue circle", ref="a red circle", config=config)
    path = save_result(result, tmp_path / "out.png")
    metadata = imageio.read_metadata(path)
    for key in ("method", "ref", "query", "seed", "steps", "guidance", "lr", "t_min", "t_max", "model"):
        assert key in metadata
    assert metadata["negative"] == "blurry" and metadata["t_max"] == "980"
    again = tiny_editor.edit(
        circle_image, metadata["method"], query=metadata["query"], ref=metadata["ref"],
        config=tiny_editor.config(
            steps=int(metadata["steps"]), guidance=float(metadata["guidance"]), lr=float(metadata["lr"]),
            t_min=int(metadata["t_min"]), t_max=int(metadata["t_max"]), seed=int(metadata["seed"]),
            negative=metadata["negative"],
        ),
    )  # fmt: skip
    assert np.array_equal(_pixels(again.image), _pixels(Image.open(path)))
    with pytest.raises(InputError, match="output exists"):
        save_result(result, path)


def test_webui_parameters_text_is_what_image_browsers_parse(tiny_editor: Editor, circle_image, tmp_path) -> None:
    config = tiny_editor.config(steps=4, guidance=5.0, seed=11, negative="blurry, dark")
    result = tiny_editor.edit(circle_image, "dds", query="a blue circle", ref="a red circle", config=config)
    text = imageio.read_metadata(save_result(result, tmp_path / "out.png"))["parameters"]
    prompt, negative, fields = text.split("\n")
    assert prompt == "a blue circle"
    assert negative == "Negative prompt: blurry, dark"
    assert fields.startswith("Steps: 4, CFG scale: 5.0, Seed: 11, Size: 60x40, Model: ")
    assert "Method: dds, Ref prompt: a red circle, Learning rate: 0.1, Timesteps: 50-949, " in fields
    assert f"Model: {tiny_editor.components.identity}, " in fields  # the resolved folder (no comma: not quoted)
    # A value with a comma, colon or quote is quoted, as web UIs do.
    assert "Model: \"bundled:shapes\"" in webui_parameters({**result.parameters, "model": "bundled:shapes"}, (8, 8))


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp"])
def test_jpeg_and_webp_outputs_carry_the_parameters(tiny_editor: Editor, circle_image, tmp_path, suffix) -> None:
    result = tiny_editor.edit(circle_image, "sds", query="a blue circlé", config=tiny_editor.config(steps=2, seed=4))
    path = save_result(result, tmp_path / f"out{suffix}")
    with Image.open(path) as written:
        assert written.format == {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[suffix]
    metadata = imageio.read_metadata(path)
    assert json.loads(metadata["ddsedit"]) == json.loads(json.dumps(result.parameters))
    assert metadata["parameters"].startswith("a blue circlé\nSteps: 2,")


def test_other_output_extensions_are_refused(tiny_editor: Editor, circle_image, tmp_path) -> None:
    result = tiny_editor.edit(circle_image, "sds", query="a blue circle", config=tiny_editor.config(steps=1, seed=4))
    for name in ("out.gif", "out"):
        with pytest.raises(InputError, match="must end in .png, .jpg, .jpeg or .webp"):
            save_result(result, tmp_path / name)
        assert not (tmp_path / name).exists()


def test_outputs_record_the_files_hashes_the_model_and_its_prediction_type(tiny_editor: Editor, circle_files):
    result = tiny_editor.edit(
        circle_files["src"], "masked-dds", query="a blue circle", ref="a red circle", mask=circle_files["mask"],
        config=tiny_editor.config(steps=1, seed=0),
    )  # fmt: skip
    expected_source = hashlib.sha256(circle_files["src"].read_bytes()).hexdigest()
    expected_mask = hashlib.sha256(circle_files["mask"].read_bytes()).hexdigest()
    assert result.parameters["source_sha256"] == expected_source
    assert result.parameters["mask_sha256"] == expected_mask
    assert result.parameters["prediction_type"] == "epsilon"
    folder = tiny_editor.components.source
    assert result.parameters["model"] == str(Path(folder).resolve())


def test_frames_are_kept_every_n_steps(tiny_editor: Editor, circle_image) -> None:
    result = tiny_editor.edit(
        circle_image, "sds", query="a blue circle", config=tiny_editor.config(steps=5, save_every=2, seed=0)
    )
    assert [step for step, _ in result.frames] == [0, 2, 4, 5]


def test_v_prediction_model_edits(tiny_v_model_dir) -> None:
    editor = Editor.from_pretrained(tiny_v_model_dir, device="cpu")
    assert editor.components.prediction_type == "v_prediction"
    edited = editor.dds(Image.new("RGB", (16, 16), (200, 0, 0)), ref="a red circle", query="a blue circle", steps=3)
    assert edited.size == (16, 16)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "--steps"),
        ({"steps": -3}, "--steps"),
        ({"guidance": -1.0}, "--guidance"),
        ({"lr": 0.0}, "--lr"),
        ({"lr": float("nan")}, "--lr"),
        ({"t_min": 0}, "--t-min"),
        ({"t_max": 1000}, "--t-max"),
        ({"t_min": 500, "t_max": 500}, "--t-min"),
        ({"size": 0}, "--size"),
    ],
)
def test_bad_settings_are_refused(overrides, message) -> None:
    with pytest.raises(InputError, match=message):
        EditConfig().replace(**overrides).validate()


def test_empty_prompts_and_missing_mask_are_refused(tiny_editor: Editor, circle_image) -> None:
    with pytest.raises(InputError, match="--query"):
        tiny_editor.dds(circle_image, ref="a red circle", query="  ")
    with pytest.raises(InputError, match="--ref"):
        tiny_editor.dds(circle_image, ref="", query="a blue circle")
    with pytest.raises(InputError, match="--mask"):
        tiny_editor.edit(circle_image, "masked-dds", query="a", ref="b")
    with pytest.raises(InputError, match="dds has no setting 'iterations'"):
        tiny_editor.config(iterations=3)


def test_text_encoder_can_be_freed_after_encoding(tiny_model_dir, circle_image) -> None:
    editor = Editor.from_pretrained(tiny_model_dir, device="cpu", keep_text_encoder=False)
    editor.dds(circle_image, ref="a red circle", query="a blue circle", steps=1, seed=0)
    assert editor.components.text_encoder is None
    # The same prompts still work from the cache; new ones say why they cannot.
    editor.dds(circle_image, ref="a red circle", query="a blue circle", steps=1, seed=0)
    with pytest.raises(Exception, match="text encoder was freed"):
        editor.dds(circle_image, ref="a red circle", query="a green circle", steps=1)


def test_vae_overflow_in_half_precision_reruns_in_fp32(tiny_model_dir) -> None:
    """SD 2.x VAEs can give inf in fp16: the decode is rerun in fp32 and the VAE stays there."""
    import torch

    editor = Editor.from_pretrained(tiny_model_dir, device="cpu", dtype="bf16")
    vae = editor.components.vae
    real_decode = vae.decode

    def overflowing_decode(latents, return_dict=False):
        decoded = real_decode(latents, return_dict=return_dict)
        if latents.dtype != torch.float32:
            return (torch.full_like(decoded[0], float("inf")),)
        return decoded

    vae.decode = overflowing_decode
    pixels = editor.decode(torch.zeros(1, 4, 8, 8))
    assert torch.isfinite(pixels).all()
    assert vae.dtype == torch.float32


def test_tiny_tokenizer_words_are_single_tokens() -> None:
    from ddsedit.tiny import TINY_WORDS
    from ddsedit.wordtokenizer import build_tokenizer

    tokenizer = build_tokenizer(TINY_WORDS)
    ids = tokenizer("a red circle on a white background").input_ids
    assert len(ids) == 2 + 7  # start, seven words, end
    assert tokenizer.model_max_length == 77
    for word in TINY_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1


def test_batch_gives_each_image_what_a_single_run_gives(tiny_editor: Editor) -> None:
    from ddsedit.editor import EditRequest

    colours = [(220, 40, 40), (40, 80, 220), (40, 170, 60)]
    requests = [
        EditRequest(Image.new("RGB", (24, 24), colour), query="a blue circle", ref="a red circle", seed=20 + i)
        for i, colour in enumerate(colours)
    ]
    config = tiny_editor.config(steps=4)
    batched = tiny_editor.edit_batch(requests, "dds", config=config)
    for request, result in zip(requests, batched, strict=True):
        alone = tiny_editor.edit(request.image, "dds", query=request.query, ref=request.ref,
                                 config=config.replace(seed=request.seed))  # fmt: skip
        assert result.parameters["seed"] == request.seed
        assert np.abs(_pixels(result.image) - _pixels(alone.image)).max() <= 1
    with pytest.raises(InputError, match="same working size"):
        tiny_editor.edit_batch(
            [requests[0], EditRequest(Image.new("RGB", (24, 12)), query="a", ref="b")], "dds", config=config
        )


def test_cpu_offload_gives_the_same_edit(tiny_model_dir, circle_image) -> None:
    """Offloaded weights (accelerate hooks) must not change the result."""
    plain = Editor.from_pretrained(tiny_model_dir, device="cpu")
    offloaded = Editor.from_pretrained(tiny_model_dir, device="cpu", cpu_offload=True)
    first = plain.dds(circle_image, ref="a red circle", query="a blue circle", steps=3, seed=2)
    second = offloaded.dds(circle_image, ref="a red circle", query="a blue circle", steps=3, seed=2)
    assert np.array_equal(_pixels(first), _pixels(second))


def test_cuda_graph_is_refused_where_it_cannot_run(tiny_model_dir) -> None:
    with pytest.raises(InputError, match="needs a CUDA device"):
        Editor.from_pretrained(tiny_model_dir, device="cpu", cuda_graph=True)
    with pytest.raises(InputError, match="cannot be combined"):
        Editor.from_pretrained(tiny_model_dir, device="cpu", cuda_graph=True, compile_unet=True)


def test_an_edit_can_start_from_another_image(tiny_editor: Editor, circle_image) -> None:
    """``start`` moves where the optimisation begins; the source still anchors DDS."""
    config = tiny_editor.config(steps=2, seed=5, lr=0.01)
    plain = tiny_editor.edit_batch([EditRequest(circle_image, query="a blue circle", ref="a red circle")], "dds",
                                   config=config)[0]  # fmt: skip
    same = tiny_editor.edit_batch([EditRequest(circle_image, query="a blue circle", ref="a red circle",
                                               start=circle_image)], "dds", config=config)[0]  # fmt: skip
    assert np.array_equal(_pixels(plain.image), _pixels(same.image))
    other = Image.new("RGB", circle_image.size, (20, 200, 20))
    started = tiny_editor.edit_batch([EditRequest(circle_image, query="a blue circle", ref="a red circle",
                                                  start=other)], "dds", config=config)[0]  # fmt: skip
    green = _pixels(other)
    assert np.abs(_pixels(started.image) - green).mean() < np.abs(_pixels(plain.image) - green).mean()


def test_edit_takes_a_start_image_of_the_source_size(tiny_editor: Editor, circle_image) -> None:
    config = tiny_editor.config(steps=2, seed=5, lr=0.01)
    other = Image.new("RGB", circle_image.size, (20, 200, 20))
    single = tiny_editor.edit(circle_image, "dds", query="a blue circle", ref="a red circle", config=config,
                              start=other)  # fmt: skip
    batched = tiny_editor.edit_batch([EditRequest(circle_image, query="a blue circle", ref="a red circle",
                                                  start=other)], "dds", config=config)[0]  # fmt: skip
    assert np.array_equal(_pixels(single.image), _pixels(batched.image))
    assert single.parameters["start"] == "image"
    with pytest.raises(InputError, match="same size"):
        tiny_editor.edit(circle_image, "dds", query="a blue circle", ref="a red circle", config=config,
                         start=other.resize((8, 8)))  # fmt: skip
