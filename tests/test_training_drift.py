"""The drift measure: the expected DDS gradient at the right answer, on the bundled model."""

from __future__ import annotations

import pytest

from ddsedit.editor import Editor
from ddsedit.shapes import evaluate
from shapes_training import drift


@pytest.fixture(scope="module")
def shapes_editor() -> Editor:
    return Editor.from_pretrained("shapes", device="cpu")


def test_an_edit_that_changes_nothing_has_no_drift(shapes_editor):
    # Source and target the same image and caption: both branches see the same input, so the
    # gradient is exactly zero at every timestep (what makes DDS keep what the prompts agree on).
    case = evaluate.recolour_cases(1, seed=5)[0]
    unchanged = evaluate.EditCase(0, case.source, case.source, seed=0)
    rows = drift.drift_table(shapes_editor, [unchanged], timesteps=(100, 700), draws=1)
    assert [(row.timestep, row.background) for row in rows] == [(100, case.source.background),
                                                                (700, case.source.background)]  # fmt: skip
    for row in rows:
        assert row.gradient == row.conditional == row.guided == 0.0
        assert row.error_at_target == pytest.approx(row.error_at_source)


def test_a_recolour_drifts_and_guidance_one_has_no_guided_part(shapes_editor):
    cases = evaluate.recolour_cases(2, seed=5)  # one white, one black
    guided = drift.drift_table(shapes_editor, cases, timesteps=(100,), draws=2, guidance=7.5)
    plain = drift.drift_table(shapes_editor, cases, timesteps=(100,), draws=2, guidance=1.0)
    assert {row.background for row in guided} == {"white", "black"}
    for with_guidance, without in zip(guided, plain, strict=True):
        assert with_guidance.gradient > 0 and with_guidance.guided > 0
        assert without.guided == pytest.approx(0.0, abs=1e-10)
        assert without.gradient == pytest.approx(with_guidance.conditional)
        # the query caption fits the target better than the unedited source
        assert with_guidance.error_at_source > with_guidance.error_at_target


def test_main_prints_one_line_per_timestep(capsys):
    drift.main(["--cases", "2", "--draws", "1", "--timesteps", "100,500", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 100 |") and lines[3].startswith("| 500 |")
