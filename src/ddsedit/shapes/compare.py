"""Compare two shapes eval reports run on the same cases, case by case.

    ddsedit eval-shapes --model shapes --out-dir runs/a
    ddsedit eval-shapes --model runs/candidate/final --out-dir runs/b
    python -m ddsedit.shapes.compare runs/a/report.json runs/b/report.json

    python -m ddsedit.shapes.compare runs/a/report.json --baseline dds   # each method against DDS, same cases

For every run both reports hold (every method, masked-dds-auto, DDS started at the right answer, and
the automatic masks' own figures) and every figure, it prints the first report's figure, the
second's, their difference and the difference's 95% paired-bootstrap interval: a difference whose
interval holds 0 is not shown to be real by these cases. Nothing is edited, so it takes a second.
Both reports must have been run on the same cases (the same ``--cases`` and ``--seed``); their
settings may differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ddsedit.errors import InputError
from ddsedit.shapes.evaluate import AUTO_MASK_FIGURES, CaseScore, MaskScore, figure_values, mask_figure_values
from ddsedit.shapes.stats import paired_difference


@dataclass
class FigureComparison:
    """One figure of one run in both reports."""

    run: str
    figure: str
    first: float
    second: float
    difference: float  # second - first
    low: float
    high: float

    @property
    def settled(self) -> bool:
        """The interval leaves 0 out: on these cases the difference is not chance."""
        return self.low > 0 or self.high < 0


def load_report(path: Path) -> dict[str, Any]:
    """A report.json written by ``ddsedit eval-shapes``, with the per-case scores it needs."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"report not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {path} as a report: {error}") from None
    if not isinstance(report, dict) or not report.get("case_scores"):
        raise InputError(f"{path} has no per-case scores: rerun `ddsedit eval-shapes` to write them")
    return report


def _scores(records: list[dict[str, Any]], kind: type = CaseScore) -> tuple[list[int], list[str], list[Any]]:
    names = {f.name for f in fields(kind)}
    return (
        [int(r["index"]) for r in records],
        [str(r["background"]) for r in records],
        [kind(**{k: v for k, v in r.items() if k in names}) for r in records],
    )


def compare_reports(first: dict[str, Any], second: dict[str, Any]) -> list[FigureComparison]:
    """Every figure of every run in both reports, compared case by case.

    Raises:
        InputError: the reports were not run on the same cases.
    """
    if (first.get("cases"), first.get("seed")) != (second.get("cases"), second.get("seed")):
        raise InputError(
            f"the reports edited different cases ({first.get('cases')} cases, seed {first.get('seed')} against "
            f"{second.get('cases')} cases, seed {second.get('seed')}): run both with the same --cases and --seed"
        )
    rows = []
    for run, first_records in first["case_scores"].items():
        if run not in second["case_scores"]:
            continue
        # The automatic masks' own scores are of another kind than an edit's.
        kind, figures = (MaskScore, mask_figure_values) if run == AUTO_MASK_FIGURES else (CaseScore, figure_values)
        first_index, backgrounds, first_scores = _scores(first_records, kind)
        second_index, _, second_scores = _scores(second["case_scores"][run], kind)
        if first_index != second_index:
            raise InputError(f"the reports' {run} runs hold different cases")
        second_figures = figures(backgrounds, second_scores)
        for figure, (first_values, statistic) in figures(backgrounds, first_scores).items():
            second_values = second_figures[figure][0]
            difference, low, high = paired_difference(first_values, second_values, statistic)
            rows.append(FigureComparison(run, figure, statistic(first_values), statistic(second_values),
                                         difference, low, high))  # fmt: skip
    return rows


def compare_methods(report: dict[str, Any], baseline: str) -> list[FigureComparison]:
    """Every other method of one report against ``baseline`` (e.g. dds), case by case on its cases.

    Raises:
        InputError: the report has no ``baseline`` run.
    """
    runs = report["case_scores"]
    if baseline not in runs:
        raise InputError(f"the report has no {baseline} run (it has {', '.join(runs)})")
    rows = []
    base_index, backgrounds, base_scores = _scores(runs[baseline])
    base_figures = figure_values(backgrounds, base_scores)
    for run, records in runs.items():
        if run in (baseline, "held", AUTO_MASK_FIGURES):  # not a method's edits
            continue
        index, _, run_scores = _scores(records)
        if index != base_index:
            raise InputError(f"the report's {run} and {baseline} runs hold different cases")
        for figure, (values, statistic) in figure_values(backgrounds, run_scores).items():
            base_values = base_figures[figure][0]
            difference, low, high = paired_difference(base_values, values, statistic)
            rows.append(FigureComparison(run, figure, statistic(base_values), statistic(values), difference, low, high))
    return rows


def format_comparison(rows: list[FigureComparison], first: str, second: str) -> str:
    """A markdown table: one line per run and figure."""
    lines = [
        f"first: {first}",
        f"second: {second}",
        "| run | figure | first | second | second - first | 95% interval | settled |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.run} | {row.figure} | {row.first:.3f} | {row.second:.3f} | {row.difference:+.3f} "
            f"| {row.low:+.3f} to {row.high:+.3f} | {'yes' if row.settled else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddsedit.shapes.compare", description=__doc__.split("\n")[0])
    parser.add_argument("first", type=Path, help="report.json of the baseline")
    parser.add_argument(
        "second", type=Path, nargs="?", help="report.json of the candidate, run on the same cases (or --baseline)"
    )
    parser.add_argument(
        "--baseline", help="with one report: compare each of its methods against this one (e.g. dds), case by case"
    )
    args = parser.parse_args(argv)
    if (args.second is None) == (args.baseline is None):
        parser.error("give a second report, or --baseline METHOD to compare the methods of one report")
    try:
        if args.second is not None:
            rows = compare_reports(load_report(args.first), load_report(args.second))
            print(format_comparison(rows, str(args.first), str(args.second)))
        else:
            rows = compare_methods(load_report(args.first), args.baseline)
            print(format_comparison(rows, f"{args.baseline} in {args.first}", "each run in the same report"))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
