"""Automatic masks (DiffEdit): the map and threshold against a slow reference written from the equations,
seeding, the flat-map error, what an edit records, and the bundled model's masks on shapes-world cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ddsedit import automask
from ddsedit.automask import AutoMaskSettings
from ddsedit.editor import Editor, edit_parameters, save_result
from ddsedit.errors import InputError
from ddsedit.imageio import read_metadata

REF, QUERY = "a red circle", "a blue square"
# The random tiny model's map has little structure (its peak is about 1.5 x its mean over 10 noises),
# so the tests that run it end to end threshold lower than DiffEdit's 1.5.
TINY_THRESHOLD = 1.1
MODEL_CONFIGS = Path(automask.__file__).parent / "model_configs"


@pytest.fixture
def square_source() -> Image.Image:
    """A 32x32 source (the tiny model's working size: no resizing), a red circle on light grey."""
    image = Image.new("RGB", (32, 32), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((6, 8, 22, 24), fill=(220, 40, 40))
    return image


# --------------------------------------------------------------------------- the slow reference


def _encode_text(components, prompt: str) -> torch.Tensor:
    tokenizer = components.tokenizer
    tokens = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return components.text_encoder(tokens)[0]


def _reference_timestep(model_dir: Path, strength: float) -> int:
    """DiffEdit's encode timestep as diffusers computes it: a DDIM grid of 50 steps, the first kept step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    scheduler.set_timesteps(50)
    kept = min(int(50 * strength), 50)
    return int(scheduler.timesteps[50 - kept])


def reference_guided_map(
    editor: Editor, image: Image.Image, seed: int, noises: int = 3, strength: float = 0.5,
    guidance: float = 7.5,
) -> torch.Tensor:  # fmt: skip
    """DiffEdit's map from its equations, one UNet call per prediction: for each noise, predict under the
    empty prompt, the ref and the query, guide both, and average |guided query - guided ref| over the
    noises and channels. Shares nothing with ddsedit.automask but the convention of the seeded draw."""
    components = editor.components
    # SD 1.x/2.x's grid (steps_offset 1), which ddsedit uses for every model (the tiny one's config says 0).
    timestep = _reference_timestep(MODEL_CONFIGS / "sd15", strength)
    alpha_bar = float(components.alphas_cumprod[timestep])
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    vae = components.vae
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((noises, *latents.shape[1:]), generator=generator)
    embeddings = {name: _encode_text(components, prompt) for name, prompt in (("u", ""), ("r", REF), ("q", QUERY))}
    total = torch.zeros(latents.shape[-2:])
    for i in range(noises):
        noisy = alpha_bar**0.5 * latents + (1 - alpha_bar) ** 0.5 * noise[i : i + 1]
        predictions = {}
        for name, embedding in embeddings.items():
            with torch.no_grad():
                output = components.unet(noisy, timestep, encoder_hidden_states=embedding).sample
            if components.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0
                output = alpha_bar**0.5 * output + (1 - alpha_bar) ** 0.5 * noisy
            predictions[name] = output
        guided_ref = predictions["u"] + guidance * (predictions["r"] - predictions["u"])
        guided_query = predictions["u"] + guidance * (predictions["q"] - predictions["u"])
        for channel in range(latents.shape[1]):
            total += (guided_query - guided_ref)[0, channel].abs() / latents.shape[1]
    return total / noises


def reference_threshold(guided_map: torch.Tensor) -> torch.Tensor:
    """diffusers' rule, cell by cell: clamp(map, 0, 3 * mean) / (3 * mean) > 0.5."""
    ceiling = 3 * float(guided_map.mean())
    selected = torch.zeros(guided_map.shape, dtype=torch.bool)
    for row in range(guided_map.shape[0]):
        for col in range(guided_map.shape[1]):
            selected[row, col] = min(max(float(guided_map[row, col]), 0.0), ceiling) / ceiling > 0.5
    return selected


def _model_map(editor: Editor, image: Image.Image, seed: int, noises: int = 3, chunk_size: int = 8) -> torch.Tensor:
    from ddsedit import imageio

    latents = editor.encode_image(imageio.image_to_tensor(image, image.size))
    embeddings = editor.encode_prompt([REF, QUERY])
    ref_eps, query_eps = automask.noise_predictions(
        editor.components.unet, latents, embeddings.rows(0, 1), embeddings.rows(1, 2),
        automask.strength_timestep(0.5, editor.components.num_train_timesteps), editor.components.alphas_cumprod,
        editor.components.prediction_type, noises, torch.Generator().manual_seed(seed), chunk_size,
    )  # fmt: skip
    return automask.difference_map(ref_eps, query_eps)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_map_and_threshold_match_the_slow_reference(prediction, tiny_model_dir, tiny_v_model_dir, square_source):
    model_dir = tiny_model_dir if prediction == "epsilon" else tiny_v_model_dir
    editor = Editor.from_pretrained(model_dir, device="cpu")
    assert editor.components.prediction_type == prediction
    guided = reference_guided_map(editor, square_source, seed=11)
    ours = _model_map(editor, square_source, seed=11)
    # The shared unconditional prediction cancels: the guided map is exactly guidance x the conditional one.
    torch.testing.assert_close(ours * 7.5, guided, rtol=1e-4, atol=1e-5)
    assert float(guided.std()) > 0.05 * float(guided.mean())  # a map with structure, not a constant
    # The threshold: the same cells, except any within float rounding of the level (none in practice).
    level = 1.5 * float(guided.mean())
    undecided = (guided - level).abs() < 1e-4 * level
    selected = automask.threshold_map(ours, 1.5)
    assert torch.equal(selected[~undecided], reference_threshold(guided)[~undecided])
    assert 0 < int(selected.sum()) < selected.numel()
    # The editor's mask (grow 0) is the reference map resized bilinearly to the source and thresholded alike.
    mask = editor.auto_mask(square_source, ref=REF, query=QUERY, seed=11, noises=3, grow=0, size=32)
    resized = torch.nn.functional.interpolate(guided[None, None], size=(32, 32), mode="bilinear")[0, 0]
    expected = resized > level
    near = (resized - level).abs() < 1e-4 * level
    assert mask.size == (32, 32) and mask.mode == "L"
    assert np.array_equal((np.asarray(mask) == 255)[~near.numpy()], expected.numpy()[~near.numpy()])


def test_chunking_does_not_change_the_map(tiny_editor, square_source) -> None:
    """The 2N samples go through the UNet in chunks: each prediction must keep its own prompt."""
    whole = _model_map(tiny_editor, square_source, seed=3, noises=4, chunk_size=8)
    for chunk_size in (1, 3, 5):
        torch.testing.assert_close(_model_map(tiny_editor, square_source, 3, noises=4, chunk_size=chunk_size), whole,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_strength_picks_the_timestep_of_diffusers_ddim_grid() -> None:
    sd15 = MODEL_CONFIGS / "sd15"
    assert automask.strength_timestep(0.5) == 481 == _reference_timestep(sd15, 0.5)  # SD 1.5: index 25 of 50
    for strength in (0.02, 0.1, 0.33, 0.5, 0.77, 0.9, 1.0):
        assert automask.strength_timestep(strength, 1000) == _reference_timestep(sd15, strength), strength
    assert automask.strength_timestep(0.5, 1000) == _reference_timestep(MODEL_CONFIGS / "sd2-v", 0.5)
    with pytest.raises(InputError, match="keeps no step"):
        automask.strength_timestep(0.01)


def test_difference_map_threshold_and_growth_on_known_values() -> None:
    ref = torch.zeros(2, 4, 3, 3)
    query = torch.zeros(2, 4, 3, 3)
    query[0, :, 1, 1] = 8.0  # one noise, every channel: a mean of 4 at the centre
    query[1, 0, 0, 0] = -4.0  # the other noise, one channel: a mean of 0.5 in a corner
    difference = automask.difference_map(ref, query)
    assert difference[1, 1] == 4.0 and difference[0, 0] == 0.5 and difference.sum() == 4.5
    assert automask.threshold_map(difference, 1.5).nonzero().tolist() == [[1, 1]]  # 4 > 1.5 * 0.5; 0.5 is not
    assert automask.threshold_map(difference, 0.9).sum() == 2  # 0.5 > 0.9 * 0.5 too
    mask = np.asarray(automask.map_to_mask(difference, 1.5, (3, 3))) == 255  # the latent size: no resizing
    assert mask.nonzero() == (np.array([1]), np.array([1]))
    grown = np.asarray(automask.map_to_mask(difference, 1.5, (30, 30), grow=3)) == 255
    plain = np.asarray(automask.map_to_mask(difference, 1.5, (30, 30))) == 255
    rows, cols = plain.nonzero()
    grown_rows, grown_cols = grown.nonzero()
    assert grown_rows.min() == rows.min() - 3 and grown_rows.max() == rows.max() + 3
    assert grown_cols.min() == cols.min() - 3 and grown_cols.max() == cols.max() + 3


def test_the_same_seed_gives_the_same_mask_bit_for_bit(tiny_editor, circle_image) -> None:
    settings = AutoMaskSettings(threshold=TINY_THRESHOLD, grow=0)
    first = tiny_editor.auto_mask(circle_image, ref=REF, query=QUERY, settings=settings, seed=5)
    again = tiny_editor.auto_mask(circle_image, ref=REF, query=QUERY, settings=settings, seed=5)
    other = tiny_editor.auto_mask(circle_image, ref=REF, query=QUERY, settings=settings, seed=6)
    assert first.size == circle_image.size  # the source's size, not the working size
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()
    assert set(np.unique(np.asarray(first))) == {0, 255}
    assert first.info["mask_seed"] == "5" and first.info["mask"] == "auto"


def test_prompts_that_say_the_same_thing_give_one_clear_error(tiny_editor, circle_image) -> None:
    with pytest.raises(InputError, match="say the same thing to the model: no mask can be drawn"):
        tiny_editor.auto_mask(circle_image, ref="a red circle", query=" a red circle ", seed=0)
    # Different text, the same tokens (CLIP lowercases and splits on spaces): the map itself is flat.
    with pytest.raises(InputError, match="say the same thing to the model: no mask can be drawn"):
        tiny_editor.auto_mask(circle_image, ref="a red circle", query="A  RED circle", seed=0)
    with pytest.raises(InputError, match="the automatic mask is empty"):
        tiny_editor.auto_mask(circle_image, ref=REF, query=QUERY, seed=0, threshold=1000.0)
    with pytest.raises(InputError, match="covers the whole image"):
        tiny_editor.auto_mask(circle_image, ref=REF, query=QUERY, seed=0, threshold=TINY_THRESHOLD, grow=100)
    with pytest.raises(InputError, match="--mask-noises"):
        tiny_editor.auto_mask(circle_image, ref=REF, query=QUERY, seed=0, noises=0)


def test_an_edit_with_an_automatic_mask_records_it(tiny_editor, circle_image, tmp_path) -> None:
    config = tiny_editor.config(steps=3, seed=9)
    settings = AutoMaskSettings(threshold=TINY_THRESHOLD)
    result = tiny_editor.edit(circle_image, "masked-dds", query=QUERY, ref=REF, mask=settings, config=config)
    expected_mask = tiny_editor.auto_mask(circle_image, ref=REF, query=QUERY, settings=settings, seed=9)  # the edit's
    assert result.mask is not None and result.mask.tobytes() == expected_mask.tobytes()
    assert {key: result.parameters[key] for key in settings.recorded()} == {
        "mask": "auto", "mask_strength": 0.5, "mask_noises": 10, "mask_threshold": TINY_THRESHOLD,
        "mask_grow": settings.grow, "mask_seed": 9,
    }  # fmt: skip
    assert "mask_sha256" not in result.parameters
    assert result.parameters == {
        **result.parameters, **edit_parameters("masked-dds", REF, QUERY, 9, config, settings.replace(seed=9))
    }
    outside = np.asarray(result.mask) == 0
    change = np.abs(np.asarray(result.image, dtype=np.int16) - np.asarray(circle_image, dtype=np.int16))
    assert change[outside].max() <= 1  # the source is kept exactly outside the automatic mask
    written = save_result(result, tmp_path / "edit.png")
    metadata = read_metadata(written)
    assert json.loads(metadata["ddsedit"])["mask"] == "auto" and metadata["mask_grow"] == str(settings.grow)
    assert "Mask: auto, Mask strength: 0.5, Mask noises: 10, Mask threshold: 1.1, Mask grow:" in metadata["parameters"]
    # Settings of its own, and a mask file, are recorded as such.
    own = tiny_editor.edit(circle_image, "masked-dds", query=QUERY, ref=REF, config=config,
                           mask=AutoMaskSettings(threshold=TINY_THRESHOLD, grow=0, noises=4, seed=1))  # fmt: skip
    assert own.parameters["mask_grow"] == 0 and own.parameters["mask_seed"] == 1 and own.parameters["seed"] == 9
    by_hand = tiny_editor.edit(circle_image, "masked-dds", query=QUERY, ref=REF, mask=result.mask, config=config)
    assert "mask" not in by_hand.parameters and "Mask: auto" not in by_hand.metadata()["parameters"]


def test_an_automatic_mask_edit_survives_a_freed_text_encoder(tiny_model_dir, circle_image) -> None:
    """The command line frees the text encoder after the first encoding: the mask's must serve the edit too."""
    editor = Editor.from_pretrained(tiny_model_dir, device="cpu", keep_text_encoder=False)
    config = editor.config(steps=2, seed=1, negative="a green circle")
    mask = AutoMaskSettings(threshold=TINY_THRESHOLD)
    result = editor.edit(circle_image, "masked-dds", query=QUERY, ref=REF, mask=mask, config=config)
    assert editor.components.text_encoder is None and result.parameters["mask"] == "auto"


# --------------------------------------------------------------------------- the bundled model


@pytest.fixture(scope="module")
def shapes_editor() -> Editor:
    return Editor.from_pretrained("shapes", device="cpu")


def test_the_bundled_models_masks_cover_the_shape_and_miss_the_dots(shapes_editor) -> None:
    from ddsedit.shapes import evaluate
    from ddsedit.shapes.world import render

    coverages = []
    for case in evaluate.recolour_cases(6, seed=0):  # three on white, three on black
        mask = shapes_editor.auto_mask(render(case.source)[0], ref=case.ref, query=case.query, seed=case.seed)
        score = evaluate.score_mask(case.source, mask)
        coverages.append(score.coverage)
        assert score.coverage >= 0.85, (case.index, score)  # at worst a 1-px rim of a square's edge is left out
        assert score.precision >= 0.7, (case.index, score)
        # A grown edge may graze a dot's rim (dots lie 3 px clear of the shape's square); none is inside.
        assert score.dots_covered <= 0.05, (case.index, score)
        centres = [np.asarray(mask)[row, col] for col, row in case.source.dots]
        assert max(centres) == 0, (case.index, centres)
    assert np.median(coverages) >= 0.95, coverages
