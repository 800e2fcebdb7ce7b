"""The drift measure: the expected DDS gradient at the right answer, on the bundled model."""

from __future__ import annotations

import pytest

from ddsedit.editor import Editor
from ddsedit.errors import InputError
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


def test_ids_does_not_drift_on_an_edit_that_changes_nothing(shapes_editor):
    # IDS noises the target with the corrected source noise: with source = target and one caption both
    # branches see the same latent again, so its gradient too is exactly zero, without the CUT term (which
    # the bundled model turns on: PatchNCE pulls even identical features apart from their neighbours).
    case = evaluate.recolour_cases(1, seed=5)[0]
    unchanged = evaluate.EditCase(0, case.source, case.source, seed=0)
    (row,) = drift.drift_table(shapes_editor, [unchanged], timesteps=(300,), draws=1, method="ids",
                               overrides={"cut_weight": 0.0})  # fmt: skip
    assert row.gradient == row.conditional == row.guided == 0.0
    (with_cut,) = drift.drift_table(shapes_editor, [unchanged], timesteps=(300,), draws=1, method="ids")
    assert with_cut.gradient > 0  # the model's own IDS: CUT weight 10


def test_pds_drift_on_a_spacing_1_grid_is_dds_drift_times_the_posterior_factor(shapes_editor):
    # On a grid of spacing 1 (t_prev = t - 1) the authors' posterior is the exact one: with the same noise for
    # both branches, x_prev's and x_t's source terms cancel in the difference of the two standardised posterior
    # samples, which leaves the DDS gradient times sqrt(beta / (alpha * (1 - abar_prev))) (derived by hand).
    cases = evaluate.recolour_cases(2, seed=5)
    timestep = 401  # on the 1000-step grid of the bundled scheduler (steps_offset 1)
    (dds_rows, pds_rows) = (drift.drift_table(shapes_editor, cases, timesteps=(timestep,), draws=1, method=method,
                                              overrides={"pds_grid": 1000})
                            for method in ("dds", "pds"))  # fmt: skip
    abar = shapes_editor.components.alphas_cumprod.double()
    previous = timestep - 1
    alpha = abar[timestep] / abar[previous]
    factor = float((1 - alpha) / (alpha * (1 - abar[previous])))  # squared: the rows hold mean squares
    for dds_row, pds_row in zip(dds_rows, pds_rows, strict=True):
        assert pds_row.gradient == pytest.approx(factor * dds_row.gradient, rel=1e-3)
        assert pds_row.conditional == pytest.approx(factor * dds_row.conditional, rel=1e-3)
        assert pds_row.error_at_target == pytest.approx(dds_row.error_at_target)


def test_pds_drift_needs_a_timestep_of_its_grid(shapes_editor):
    with pytest.raises(InputError, match="timestep 400 is not on its 500-step grid"):
        drift.drift_table(shapes_editor, evaluate.recolour_cases(1, seed=5), timesteps=(400,), draws=1, method="pds")


def test_bad_settings_are_one_line_not_a_traceback(capsys):
    for arguments in (["--timesteps", "1000"], ["--timesteps", "x"], ["--draws", "0"], ["--guidance", "-1"]):
        with pytest.raises(SystemExit) as stopped:
            drift.main(["--cases", "1", "--device", "cpu", *arguments])
        assert stopped.value.code == 2
    errors = capsys.readouterr().err
    assert "timesteps must be in [1, 999], got 1000" in errors and "--guidance must be in the range" in errors


def test_main_takes_the_method(capsys):
    drift.main(["--cases", "2", "--draws", "1", "--timesteps", "200", "--device", "cpu", "--method", "ids"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("| 200 |")


def test_a_method_without_a_reference_is_refused(shapes_editor):
    with pytest.raises(InputError, match="reference branch"):
        drift.drift_table(shapes_editor, evaluate.recolour_cases(1, seed=5), timesteps=(100,), draws=1, method="sds")
