"""What a batch shows on stderr: the progress bars while it runs and the summary table at the end."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console

from ddsedit.batch.records import NOT_DONE_STATUSES, STATUSES

NOT_RUN_LABEL = "(not run: invalid)"  # after each bad row's line with --skip-invalid; "skipped" means done before


class BatchDisplay:
    """One overall bar (rows done, failed, ETA) with a per-row step bar beneath it, on stderr.

    With ``quiet`` nothing is drawn; messages passed to :meth:`error` are always printed.
    """

    def __init__(self, console: Console, total: int, quiet: bool) -> None:
        self.console = console
        self.total = total
        self.quiet = quiet
        self.counts: Counter[str] = Counter()  # this process's rows
        self.others: Counter[str] = Counter()  # the other processes' rows (main process only)
        self._progress: Any = None
        self._overall: Any = None
        self._row: Any = None

    def __enter__(self) -> BatchDisplay:
        if self.quiet:
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )  # fmt: skip
        self._progress.__enter__()
        self._overall = self._progress.add_task("rows", total=self.total, info="")
        self._row = self._progress.add_task("", total=None, info="", visible=False)
        self._refresh()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.update(self._row, visible=False)
            self._progress.__exit__(*exc_info)
            self._progress = None

    def error(self, message: str) -> None:
        """Print one line on stderr, above the bars."""
        console = self._progress.console if self._progress is not None else self.console
        console.print(message, markup=False, highlight=False, soft_wrap=True)

    def finished(self, status: str) -> None:
        """Count a finished row of this process."""
        self.counts[status] += 1
        self._refresh()

    def set_others(self, counts: Counter[str]) -> None:
        """Show the other processes' finished rows (main process), by status."""
        self.others = Counter(counts)
        self._refresh()

    def row_started(self, description: str, steps: int | None) -> None:
        """Start the step bar for a row or group (``steps`` None: an activity without steps, like loading)."""
        if self._progress is not None:
            self._progress.reset(self._row, total=steps, completed=0, description=description, info="", visible=True)

    def row_step(self, step: int, steps: int) -> None:
        """Advance the step bar, with the speed in steps a second."""
        if self._progress is not None:
            speed = self._progress.tasks[self._row].speed
            self._progress.update(self._row, completed=step, total=steps, info=f"{speed:.1f} it/s" if speed else "")

    def _refresh(self) -> None:
        if self._progress is None:
            return
        counts = self.counts + self.others
        done = sum(counts[status] for status in ("done", "skipped", "failed"))
        parts = [f"{counts[status]} {status}" for status in ("done", "skipped", "failed") if counts[status]]
        self._progress.update(self._overall, completed=done, info=", ".join(parts))


def print_summary(console: Console, records: list[dict[str, Any]], seconds: float, manifest: Path) -> None:
    """The table at the end of a run: rows and seconds per status, then the failed rows."""
    from rich.table import Table

    console.print(f"batch {manifest}: {len(records)} rows in {seconds:.1f} s", markup=False, highlight=False)
    table = Table()
    table.add_column("status")
    table.add_column("rows", justify="right")
    table.add_column("seconds", justify="right")
    for status in STATUSES:
        chosen = [record for record in records if record.get("status") == status]
        if chosen:
            total = sum(float(record.get("seconds") or 0.0) for record in chosen)
            table.add_row(status, str(len(chosen)), f"{total:.1f}")
    console.print(table)
    failed = [record for record in records if record.get("status") in NOT_DONE_STATUSES]
    if failed:
        shown = 20
        console.print("rows not done (see results.jsonl):", markup=False, highlight=False)
        failures = Table()
        for name in ("line", "src", "error"):
            failures.add_column(name, overflow="fold")
        for record in sorted(failed, key=lambda r: int(r.get("line") or 0))[:shown]:
            failures.add_row(str(record.get("line")), str(record.get("src")), str(record.get("error")))
        console.print(failures)
        if len(failed) > shown:
            console.print(f"... and {len(failed) - shown} more")
