"""Every method is a function of its seed: same seed, same bytes; another seed, other bytes.

Including CDS's patch draws: they must come from the image's seeded generator, not from torch's
global one (the tests move the global generator between runs to catch that), and an image in a
batch must draw the same positions as when it is edited alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ddsedit.editor import Editor, EditRequest
from ddsedit.methods import get_method, method_names

QUERY, REF = "a blue square", "a red circle"


def _picture(colour: tuple[int, int, int] = (220, 40, 40)) -> Image.Image:
    image = Image.new("RGB", (32, 32), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((6, 6, 24, 24), fill=colour)
    return image


def _mask() -> Image.Image:
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((4, 4, 27, 27), fill=255)
    return mask


# cut_patches 16, far below the feature maps' 256 and 64 positions: which positions are drawn matters.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    **{method: (method, {}) for method in method_names() if "sd" in get_method(method).families},
    "cds-few-patches": ("cds", {"cut_patches": 16}),
    "ids-with-cut": ("ids", {"cut_weight": 3.0, "cut_patches": 16}),
}


def _edit(editor: Editor, method: str, seed: int, global_seed: int, **settings: Any) -> bytes:
    """One 3-step edit's output bytes; torch's global generator is seeded with ``global_seed`` first."""
    torch.manual_seed(global_seed)
    config = editor.config(method, steps=3, seed=seed, lr=0.5, **settings)
    result = editor.edit(
        _picture(), method, query=QUERY, ref=None if method == "sds" else REF,
        mask=_mask() if method == "masked-dds" else None, config=config,
    )  # fmt: skip
    return result.image.tobytes()


@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_bytes_other_seed_other_bytes(case: str, tiny_editor: Editor) -> None:
    method, settings = CASES[case]
    first = _edit(tiny_editor, method, seed=11, global_seed=0, **settings)
    assert _edit(tiny_editor, method, seed=11, global_seed=12345, **settings) == first
    assert _edit(tiny_editor, method, seed=12, global_seed=0, **settings) != first


FLOW_CASES = {method: {"n_max": 3} if method == "flowedit" else {} for method in method_names()
              if "sd3" in get_method(method).families}  # fmt: skip


@pytest.fixture(scope="module")
def sd3_editor(tiny_sd3_dir) -> Editor:
    return Editor.from_pretrained(tiny_sd3_dir, device="cpu")


@pytest.mark.parametrize("method", list(FLOW_CASES))
def test_flow_methods_are_functions_of_their_seed(method: str, sd3_editor: Editor) -> None:
    settings = {"size": 32, **FLOW_CASES[method]}
    first = _edit(sd3_editor, method, seed=11, global_seed=0, **settings)
    assert _edit(sd3_editor, method, seed=11, global_seed=12345, **settings) == first
    assert _edit(sd3_editor, method, seed=12, global_seed=0, **settings) != first


def test_cds_in_a_batch_draws_each_images_own_patches(tiny_editor: Editor) -> None:
    """Two images with their own seeds in one batch: each gets its result alone (to rounding: the UNet
    batches differently), so each image's patch positions come from its own generator."""
    pictures = [_picture(), _picture((40, 40, 220))]
    config = tiny_editor.config("cds", steps=3, lr=0.5, cut_patches=16)
    requests = [EditRequest(image=picture, query=QUERY, ref=REF, seed=seed)
                for picture, seed in zip(pictures, (5, 6), strict=True)]  # fmt: skip
    batched = tiny_editor.edit_batch(requests, "cds", config=config)
    for request, together in zip(requests, batched, strict=True):
        alone = tiny_editor.edit_batch([request], "cds", config=config)[0]
        difference = np.abs(np.asarray(together.image, dtype=np.int16) - np.asarray(alone.image, dtype=np.int16))
        assert difference.max() <= 1
    # The seeds matter here: another seed for the second image changes it well beyond rounding.
    other = tiny_editor.edit_batch([EditRequest(image=pictures[1], query=QUERY, ref=REF, seed=7)], "cds", config=config)
    assert np.abs(np.asarray(other[0].image, dtype=np.int16) - np.asarray(batched[1].image, dtype=np.int16)).max() > 1
