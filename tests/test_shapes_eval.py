"""The shapes eval's measures on known answers, and the bundled model's edits (behaviour tests)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ddsedit.shapes import evaluate
from ddsedit.shapes.world import render


def test_the_ideal_edit_scores_perfectly() -> None:
    case = evaluate.recolour_cases(2, seed=3)[0]
    score = evaluate.score_edit(case, render(case.target)[0])
    assert score.recoloured and score.iou == 1.0
    assert score.background_change == 0.0 and score.dots_kept == score.dots
    assert score.old_colour_left == 0.0


def test_old_colour_left_counts_a_rim_of_the_source_colour() -> None:
    case = evaluate.recolour_cases(2, seed=3)[0]
    assert evaluate.score_edit(case, render(case.source)[0]).old_colour_left == 1.0  # nothing recoloured
    _, shape, _ = render(case.source)
    rim = shape & ~evaluate.dilate(~shape, 1)  # the shape's outermost pixels
    with_rim = np.array(render(case.target)[0])
    with_rim[rim] = evaluate.COLOURS[case.source.colour]
    left = evaluate.score_edit(case, Image.fromarray(with_rim)).old_colour_left
    assert left == pytest.approx(rim.sum() / shape.sum()) and 0 < left < 1


def test_no_edit_and_a_wiped_image_score_badly() -> None:
    case = evaluate.recolour_cases(2, seed=3)[1]
    unchanged = evaluate.score_edit(case, render(case.source)[0])
    assert not unchanged.recoloured and unchanged.iou == 0.0 and unchanged.dots_kept == unchanged.dots
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    wiped = evaluate.score_edit(case, grey)
    assert not wiped.recoloured and wiped.background_change > 50


def test_dots_count_as_lost_when_painted_over() -> None:
    case = evaluate.recolour_cases(1, seed=5)[0]
    image = np.array(render(case.target)[0])
    col, row = case.source.dots[0]
    image[row - 2 : row + 3, col - 2 : col + 3] = image[0, 0]
    score = evaluate.score_edit(case, Image.fromarray(image))
    assert score.dots_kept == score.dots - 1


def test_cases_are_balanced_and_seeded() -> None:
    cases = evaluate.recolour_cases(6, seed=0)
    assert [c.source.background for c in cases] == ["white", "black"] * 3
    assert all(c.target.colour != c.source.colour for c in cases)
    assert [c.source for c in evaluate.recolour_cases(6, seed=0)] == [c.source for c in cases]
    assert "background" in cases[0].ref and cases[0].query != cases[0].ref
    swaps = evaluate.swap_cases(4, seed=0, kind="shape")
    assert all(c.target.shape != c.source.shape for c in swaps)


def test_report_runs_end_to_end_on_the_tiny_model(tiny_model_dir) -> None:
    from ddsedit.automask import AutoMaskSettings
    from ddsedit.editor import Editor

    editor = Editor.from_pretrained(tiny_model_dir, device="cpu")
    mask_settings = AutoMaskSettings(threshold=1.1)  # the random model's map is nearly flat
    report, picture = evaluate.evaluate(editor, count=2, seed=0, overrides={"steps": 2, "size": 64}, swaps=1,
                                        mask_settings=mask_settings)  # fmt: skip
    methods = {"sds", "dds", "masked-dds", "cds", "pds", "ids", "masked-dds-auto"}
    assert set(report.methods) == methods  # every method, same cases
    # Each method ran with its own defaults (ids: no CUT term unless asked), and the report says so.
    assert report.method_settings["ids"]["cut_weight"] == 0.0 and report.method_settings["cds"]["cut_weight"] == 3.0
    assert report.methods["masked-dds"]["outside_mask_max_change"] <= 1
    assert report.methods["masked-dds-auto"]["outside_mask_max_change"] <= 1
    assert set(report.swaps) == {"background", "shape"}
    # source, target, then a column per method and one of the automatic masks; a header row names the columns
    assert picture.size == (10 * 128, evaluate.GRID_LABEL_HEIGHT + 2 * 128)
    assert "| dds |" in evaluate.format_report(report)
    assert {"iou_median_white", "iou_median_black", "background_change"} <= set(report.held)
    assert "DDS started at the right answer" in evaluate.format_report(report)
    # every figure has an interval around it, and every case's scores are kept for compare
    assert set(report.intervals) == {*methods, "held", "auto-mask"}
    assert report.mask_settings["threshold"] == 1.1 and "Automatic mask (strength 0.5" in evaluate.format_report(report)
    for run, figures in [*report.methods.items(), ("held", report.held), ("auto-mask", report.masks)]:
        for name, (low, high) in report.intervals[run].items():
            assert low <= figures[name] <= high, (run, name)
        assert [record["index"] for record in report.case_scores[run]] == [0, 1]


def test_summary_figures_come_from_the_case_scores() -> None:
    cases = evaluate.recolour_cases(4, seed=1)
    scores = [
        evaluate.CaseScore(recoloured=i != 3, iou=0.2 * (i + 1), background_change=float(i), dots_kept=i, dots=4)
        for i in range(4)
    ]
    summary = evaluate.summarise(cases, scores)
    assert summary["recolour_rate"] == 0.75
    # cases alternate white, black: white IoUs 0.2, 0.6; black 0.4, 0.8
    assert summary["iou_median_white"] == pytest.approx(0.4) and summary["iou_median_black"] == pytest.approx(0.6)
    assert summary["background_change"] == 1.5 and summary["dots_kept_rate"] == 6 / 16
    intervals = evaluate.summarise_intervals(cases, scores)
    assert intervals["dots_kept_rate"][0] <= 6 / 16 <= intervals["dots_kept_rate"][1]
    assert intervals["recolour_rate"][0] < intervals["recolour_rate"][1]


def test_mask_scores_measure_coverage_precision_and_dots() -> None:
    case = evaluate.recolour_cases(1, seed=2)[0].source
    hand = evaluate.edit_mask(case)  # the shape grown by MASK_MARGIN: all of it is near the shape
    score = evaluate.score_mask(case, hand)
    assert score.coverage == 1.0 and score.precision == 1.0 and score.dots_covered == 0.0
    everything = evaluate.score_mask(case, Image.new("L", (64, 64), 255))
    _, shape, _ = render(case)
    assert everything.coverage == 1.0 and everything.dots_covered == 1.0
    assert everything.precision == pytest.approx(evaluate.dilate(shape, evaluate.MASK_MARGIN).mean())
    half = np.asarray(hand).copy()
    rows = np.flatnonzero(shape.any(1))
    half[: (rows[0] + rows[-1]) // 2 + 1] = 0  # keep only the lower half of the shape
    lower = evaluate.score_mask(case, Image.fromarray(half))
    assert 0.2 < lower.coverage < 0.8 and lower.precision == 1.0
