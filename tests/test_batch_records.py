"""Batch results files (ddsedit.batch.records): appending, reading and merging the per-process files."""

from __future__ import annotations

import json
from pathlib import Path

from batch_support import results

from ddsedit.batch import records


def test_merging_rank_files_is_idempotent_and_skips_torn_lines(tmp_path: Path) -> None:
    def record(line: int, rank: int) -> dict:
        row = records.RowRecord(line=line, src="s", out="o", status="done", seconds=1.0, error=None, seed=1,
                              run="r", rank=rank)  # fmt: skip
        return json.loads(row.to_json())

    first, second, third = record(1, 0), record(2, 1), record(3, 1)
    records.append_records(tmp_path / "results.jsonl", [first])
    records.append_records(tmp_path / "results.0.jsonl", [first])  # merged before, then killed before removal
    records.append_records(tmp_path / "results.1.jsonl", [second, third])
    with open(tmp_path / "results.1.jsonl", "a") as handle:
        handle.write('{"line": 4, "sta')  # cut short by a kill
    assert records.merge_rank_files(tmp_path) == 2
    assert records.rank_files(tmp_path) == []
    assert [r["line"] for r in results(tmp_path)] == [1, 2, 3]
    records.append_records(tmp_path / "results.jsonl", [record(5, 0)])
    assert [r["line"] for r in results(tmp_path)] == [1, 2, 3, 5]
    assert [r["line"] for r in records.run_records(tmp_path, "r")] == [1, 2, 3, 5]
