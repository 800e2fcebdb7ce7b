"""Comparing two eval reports case by case, without editing anything."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from ddsedit.errors import InputError
from ddsedit.shapes import compare, evaluate


def _report(tmp_path: Path, name: str, ious: list[float], seed: int = 0) -> Path:
    """A report.json of DDS on len(ious) cases (alternately white and black) with the given IoUs."""
    cases = evaluate.recolour_cases(len(ious), seed=seed)
    scores = [evaluate.CaseScore(recoloured=True, iou=v, background_change=2.0, dots_kept=4, dots=4) for v in ious]
    report = evaluate.Report(cases=len(ious), seed=seed)
    report.methods["dds"] = evaluate.summarise(cases, scores)
    report.case_scores["dds"] = evaluate.case_records(cases, scores)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(asdict(report)))
    return path


def test_a_uniform_gain_on_black_is_settled_and_white_is_unchanged(tmp_path: Path) -> None:
    ious = [0.9, 0.5, 0.8, 0.6, 0.85, 0.4, 0.95, 0.7]
    better_black = [v + 0.1 * (i % 2) for i, v in enumerate(ious)]
    rows = compare.compare_reports(compare.load_report(_report(tmp_path, "a", ious)),
                                   compare.load_report(_report(tmp_path, "b", better_black)))  # fmt: skip
    by_figure = {row.figure: row for row in rows if row.run == "dds"}
    black, white = by_figure["iou_median_black"], by_figure["iou_median_white"]
    assert black.difference == pytest.approx(0.1) and black.settled
    assert white.difference == 0.0 and not white.settled
    assert "| dds | iou_median_black |" in compare.format_comparison(rows, "a", "b")


def test_reports_on_different_cases_are_refused(tmp_path: Path) -> None:
    first = compare.load_report(_report(tmp_path, "a", [0.5, 0.6, 0.7, 0.8]))
    other_seed = compare.load_report(_report(tmp_path, "b", [0.5, 0.6, 0.7, 0.8], seed=1))
    with pytest.raises(InputError, match="different cases"):
        compare.compare_reports(first, other_seed)


def test_bad_report_files_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"cases": 4, "methods": {}}))  # written before per-case scores were kept
    good = _report(tmp_path, "good", [0.5, 0.6, 0.7, 0.8])
    for bad in (tmp_path / "missing.json", old):
        with pytest.raises(SystemExit) as exit_info:
            compare.main([str(bad), str(good)])
        assert exit_info.value.code == 1
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1
    compare.main([str(good), str(good)])
    assert "| dds | recolour_rate | 1.000 | 1.000 | +0.000 |" in capsys.readouterr().out


def test_automatic_mask_figures_are_compared_too(tmp_path: Path) -> None:
    cases = evaluate.recolour_cases(4, seed=0)

    def written(name: str, coverage: float) -> Path:
        report = evaluate.Report(cases=4, seed=0)
        scores = [evaluate.MaskScore(coverage=coverage, precision=0.9, dots_covered=0.0) for _ in cases]
        report.case_scores[evaluate.AUTO_MASK_FIGURES] = [
            {"index": case.index, "background": case.source.background, **asdict(score)}
            for case, score in zip(cases, scores, strict=True)
        ]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(asdict(report)))
        return path

    rows = compare.compare_reports(compare.load_report(written("a", 0.9)), compare.load_report(written("b", 1.0)))
    by_figure = {row.figure: row for row in rows if row.run == "auto-mask"}
    assert by_figure["coverage_median_white"].difference == pytest.approx(0.1)
    assert by_figure["precision_median_black"].difference == 0.0
    with_dds = json.loads(written("c", 0.9).read_text())
    dds_report = json.loads(_report(tmp_path, "d", [0.5, 0.6, 0.7, 0.8]).read_text())
    with_dds["case_scores"]["dds"] = dds_report["case_scores"]["dds"]
    assert compare.compare_methods(with_dds, "dds") == []  # the masks' scores are not a method's edits


def test_methods_of_one_report_are_compared_against_a_baseline(tmp_path: Path, capsys) -> None:
    ious = [0.9, 0.5, 0.8, 0.6, 0.85, 0.4, 0.95, 0.7]
    path = _report(tmp_path, "a", ious)
    report = json.loads(path.read_text())
    cases = evaluate.recolour_cases(len(ious), seed=0)
    better = [evaluate.CaseScore(recoloured=True, iou=v + 0.05, background_change=2.0, dots_kept=4, dots=4)
              for v in ious]  # fmt: skip
    report["case_scores"]["cds"] = evaluate.case_records(cases, better)
    path.write_text(json.dumps(report))
    rows = compare.compare_methods(compare.load_report(path), "dds")
    by_figure = {row.figure: row for row in rows if row.run == "cds"}
    assert by_figure["iou_median_white"].difference == pytest.approx(0.05) and by_figure["iou_median_white"].settled
    assert {row.run for row in rows} == {"cds"}
    compare.main([str(path), "--baseline", "dds"])
    assert "| cds | iou_median_black |" in capsys.readouterr().out
    with pytest.raises(InputError, match="no pds run"):
        compare.compare_methods(compare.load_report(path), "pds")
