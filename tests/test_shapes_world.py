"""The procedural shapes world: geometry, colours, details, captions and determinism."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ddsedit.shapes import metrics, world
from ddsedit.shapes.world import BACKGROUNDS, COLOURS, DOT_GREY, SHAPES


def cases(n: int = 200, seed: int = 0) -> list[world.ShapeCase]:
    rng = np.random.default_rng(seed)
    return [world.sample_case(rng) for _ in range(n)]


def test_palette_is_the_documented_one():
    assert COLOURS == {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40)}
    assert BACKGROUNDS == {"white": (245, 245, 245), "black": (20, 20, 20)}
    assert list(SHAPES) == ["circle", "square", "triangle"]
    assert DOT_GREY == (128, 128, 128)


def test_render_sizes_and_types():
    img, mask, dots = world.render(cases(1)[0])
    assert img.mode == "RGB" and img.size == (64, 64)
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert isinstance(dots, list) and all(len(d) == 2 for d in dots)


def test_colour_exact_at_shape_centre():
    for case in cases():
        img, mask, _ = world.render(case)
        cx, cy = case.centre
        assert mask[int(cy), int(cx)]
        assert tuple(np.asarray(img)[int(cy), int(cx)]) == COLOURS[case.colour]
        assert (np.asarray(img)[mask] == COLOURS[case.colour]).all()


def test_shape_inside_frame_and_sized():
    for case in cases():
        _, mask, _ = world.render(case)
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert 16 <= cols[-1] - cols[0] + 1 <= 44
        assert 16 <= rows[-1] - rows[0] + 1 <= 44
        assert abs(mask.sum() / case.size**2 - SHAPES[case.shape]) < 0.08


def test_triangle_is_upright():
    rng = np.random.default_rng(1)
    for _ in range(50):
        case = world.sample_case(rng, shape="triangle")
        _, mask, _ = world.render(case)
        widths = mask.sum(1)[mask.any(1)]
        assert (np.diff(widths) >= 0).all(), "rows widen from apex (top) to base (bottom)"
        assert widths[0] <= 2 and widths[-1] >= case.size - 1


def test_dots_grey_clear_of_shape_and_each_other():
    for case in cases():
        img, mask, dots = world.render(case)
        arr = np.asarray(img)
        assert 3 <= len(dots) <= 6
        dmask = world.dots_mask(dots)
        assert (arr[dmask] == DOT_GREY).all()
        assert not (metrics.dilate(mask, 2) & dmask).any(), "a dot touches the shape"
        for i, (c1, r1) in enumerate(dots):
            assert tuple(arr[r1, c1]) == DOT_GREY
            for c2, r2 in dots[i + 1 :]:
                assert (c1 - c2) ** 2 + (r1 - r2) ** 2 > (2 * world.DOT_RADIUS + 1) ** 2


def test_ramp_within_ten_levels_on_every_background():
    strengths = []
    for case in cases():
        img, mask, dots = world.render(case)
        background = ~mask & ~world.dots_mask(dots)
        diff = np.asarray(img).astype(int)[background] - np.array(BACKGROUNDS[case.background])
        assert np.abs(diff).max() <= 10
        assert (diff == diff[:, :1]).all(), "the ramp changes brightness, not hue"
        strengths.append(np.abs(diff).max())
    assert max(strengths) >= 8, "the ramp is visible"


def test_captions():
    case = world.ShapeCase("square", "blue", "black", 10, 10, 20, 0.0, 5.0, ((2, 2),))
    assert world.caption(case) == "a blue square on a black background"
    assert world.caption(case, with_background=False) == "a blue square"
    captions = world.all_captions()
    assert len(captions) == 37 and "" in captions
    assert "a yellow triangle on a white background" in captions


def test_seeded_determinism_numpy_and_random():
    a = cases(20, seed=7)
    b = cases(20, seed=7)
    assert a == b
    for ca, cb in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(world.render(ca)[0]), np.asarray(world.render(cb)[0]))
    assert cases(5, seed=8) != cases(5, seed=7)
    assert world.sample_case(random.Random(3)) == world.sample_case(random.Random(3))


def test_edited_keeps_everything_but_the_edit():
    for case in cases(60):
        src_img, src_mask, src_dots = world.render(case)
        for shape in SHAPES:
            for colour in COLOURS:
                target = case.edited(shape=shape, colour=colour)
                img, mask, dots = world.render(target)
                assert dots == src_dots
                assert not (metrics.dilate(mask, 2) & world.dots_mask(dots)).any()
                outside = ~(mask | src_mask)
                assert np.array_equal(np.asarray(img)[outside], np.asarray(src_img)[outside])
                if shape == case.shape:
                    assert np.array_equal(mask, src_mask)
        other = "white" if case.background == "black" else "black"
        assert world.render(case.edited(background=other))[1].tolist() == src_mask.tolist()
    with pytest.raises(ValueError):
        cases(1)[0].edited(colour="purple")


def test_sample_batch():
    images, captions = world.sample_batch(8, np.random.default_rng(0))
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert all(c in world.all_captions() and c.endswith("background") for c in captions)
    _, empty = world.sample_batch(4, np.random.default_rng(0), empty_caption_prob=1.0)
    assert empty == [""] * 4
    _, short = world.sample_batch(4, np.random.default_rng(0), short_caption_prob=1.0)
    assert all(c.count(" ") == 2 for c in short)


def test_metrics_read_rendered_images_exactly():
    for case in cases(100, seed=3):
        img, mask, _ = world.render_array(case)
        reading = metrics.read_image(img)
        assert (reading.background, reading.colour, reading.shape) == (case.background, case.colour, case.shape)
        assert metrics.iou(reading.mask, mask) == 1.0
        assert metrics.dots_kept(img, list(case.dots)) == 1.0
