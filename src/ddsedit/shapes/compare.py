"""Compare two shapes eval reports run on the same cases, case by case.

    ddsedit eval-shapes --model shapes --out-dir runs/a
    ddsedit eval-shapes --model runs/candidate/final --out-dir runs/b
    python -m ddsedit.shapes.compare runs/a/report.json runs/b/report.json

For every run both reports hold (sds, dds, masked-dds, masked-dds-auto, DDS started at the right
answer, and the automatic masks' own figures) and every figure, it prints the first report's figure,
the second's, their difference and the difference's 95% paired-bootstrap interval: a difference whose
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
    parser.add_argument("second", type=Path, help="report.json of the candidate, run on the same cases")
    args = parser.parse_args(argv)
    try:
        rows = compare_reports(load_report(args.first), load_report(args.second))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(format_comparison(rows, str(args.first), str(args.second)))


if __name__ == "__main__":
    main()
