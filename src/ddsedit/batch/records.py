"""The results files: one JSON line per row and run, appended durably, one file per process when several.

``results.jsonl`` in the output folder holds every run's records; with several processes each
writes ``results.<rank>.jsonl``, which the main process follows while the run goes and merges
into ``results.jsonl`` at the end (or at the start of the next run, after a kill).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddsedit.manifest import Manifest

RESULTS_NAME = "results.jsonl"
STATUSES = ("done", "skipped", "failed", "invalid")  # skipped: done by an earlier run; invalid: a bad row, not run
NOT_DONE_STATUSES = ("failed", "invalid")  # any of these makes the run exit 1
POLL_SECONDS = 0.5  # how often the main process reads the other processes' results files
_RANK_FILE = re.compile(r"^results\.(\d+)\.jsonl$")


@dataclass
class RowRecord:
    """One line of ``results.jsonl``: what happened to a row in one run."""

    line: int
    src: str
    out: str | None
    status: str  # done | skipped | failed | invalid
    seconds: float
    error: str | None
    seed: int | None
    run: str
    rank: int = 0
    finished: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def append_records(path: Path, records: list[dict[str, Any]] | list[str]) -> None:
    """Append JSON lines to ``path``, flushed and fsynced, so a killed run keeps what it recorded.

    A last line cut short by a kill is closed with a newline first (readers skip it).
    """
    if not records:
        return
    lines = [item if isinstance(item, str) else json.dumps(item, ensure_ascii=False) for item in records]
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write("".join(line + "\n" for line in lines).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a results file; lines that are not whole JSON objects are skipped."""
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for text in handle:
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def rank_file(out_dir: Path, rank: int) -> Path:
    """The results file of process ``rank`` when there are several: ``results.<rank>.jsonl``."""
    return out_dir / f"results.{rank}.jsonl"


def rank_files(out_dir: Path) -> list[Path]:
    """The per-process results files (``results.<rank>.jsonl``) in ``out_dir``, by rank."""
    if not out_dir.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in out_dir.iterdir() if (match := _RANK_FILE.match(path.name))]
    return [path for _, path in sorted(found)]


def merge_rank_files(out_dir: Path) -> int:
    """Append the per-process results files to ``results.jsonl`` and remove them; returns the records added.

    Records already in ``results.jsonl`` (same id) are not added again, so a merge cut short
    by a kill can simply be redone.
    """
    files = rank_files(out_dir)
    if not files:
        return 0
    results = out_dir / RESULTS_NAME
    known = {record.get("id") for record in read_records(results)}
    new = [record for path in files for record in read_records(path) if record.get("id") not in known]
    append_records(results, new)
    for path in files:
        path.unlink(missing_ok=True)
    return len(new)


def run_records(out_dir: Path, run: str) -> list[dict[str, Any]]:
    """The records of one run, from ``results.jsonl`` and any per-process files not merged yet."""
    paths = [out_dir / RESULTS_NAME, *rank_files(out_dir)]
    return [record for path in paths for record in read_records(path) if record.get("run") == run]


class RankFeed:
    """Follows the other processes' results files, counting this run's records by status."""

    def __init__(self, out_dir: Path, run: str, own_rank: int) -> None:
        self.out_dir = out_dir
        self.run = run
        self.own_rank = own_rank
        self.offsets: dict[Path, int] = {}
        self.counts: Counter[str] = Counter()

    def poll(self) -> Counter[str]:
        """Read what the other processes appended since the last poll; returns the counts so far."""
        for path in rank_files(self.out_dir):
            if path == rank_file(self.out_dir, self.own_rank):
                continue
            offset = self.offsets.get(path, 0)
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
            except OSError:
                continue
            complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
            self.offsets[path] = offset + len(complete)
            for text in complete.decode("utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("run") == self.run:
                    self.counts[str(record.get("status"))] += 1
        return self.counts


def invalid_records(manifest: Manifest, run: str) -> list[str]:
    """Records for the bad lines that ``--skip-invalid`` leaves out, one per line, with src as written."""
    reasons: dict[int, list[str]] = {}
    sources: dict[int, str] = {}
    for error in manifest.errors:
        reasons.setdefault(error.line, []).append(error.reason)
        sources[error.line] = error.src
    return [
        RowRecord(line=line, src=sources[line], out=None, status="invalid", seconds=0.0, error="; ".join(why),
                  seed=None, run=run).to_json()
        for line, why in sorted(reasons.items())
    ]  # fmt: skip
