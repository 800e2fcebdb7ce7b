"""Behaviour tests on the bundled shapes model: the edits are right, not only runnable."""

from __future__ import annotations

import pytest

from ddsedit.shapes import evaluate


@pytest.fixture(scope="module")
def shapes_editor():
    from ddsedit.editor import Editor

    return Editor.from_pretrained("shapes", device="cpu")


@pytest.fixture(scope="module")
def edited_cases(shapes_editor):
    """Four recolour cases (two white, two black), each edited by SDS, DDS and masked DDS with the same seeds."""
    cases = evaluate.recolour_cases(4, seed=11)
    config = shapes_editor.config()
    edited = {}
    for method in evaluate.METHODS:
        images, masks = evaluate.run_edits(shapes_editor, cases, method, config, batch_size=4)
        edited[method] = [evaluate.score_edit(c, i, m) for c, i, m in zip(cases, images, masks, strict=True)]
    return cases, edited


def test_dds_recolours(edited_cases) -> None:
    # Shape IoU is not asserted: the v1 model does not yet keep shapes better than SDS (issue 3).
    _, edited = edited_cases
    assert sum(s.recoloured for s in edited["dds"]) >= 3


def test_dds_keeps_the_dots_that_sds_erases(edited_cases) -> None:
    _, edited = edited_cases
    assert sum(s.dots_kept for s in edited["dds"]) > sum(s.dots_kept for s in edited["sds"])


def test_masked_dds_leaves_outside_the_mask_unchanged(edited_cases) -> None:
    _, edited = edited_cases
    scores = edited["masked-dds"]
    assert max(s.outside_mask_change for s in scores) <= 1
    assert sum(s.recoloured for s in scores) >= 3
