"""Batch edits: many rows of a manifest, one model load, resumable, spread over processes.

A manifest is JSONL (one JSON object a line) or CSV (a header line, then one row a line).
Each row names ``src``, ``query`` and optionally ``ref``, ``method``, ``mask``, ``seed``,
``steps``, ``guidance``, ``lr`` and ``out``; paths are relative to the manifest's folder,
absent columns take the command-line defaults.

The run goes:

1. :func:`ddsedit.manifest.load_manifest` reads and checks every row (files exist and are images, methods,
   prompts, numbers, unique output names) without torch; bad rows stop the run before
   anything loads, unless ``skip_invalid``: then the others run, the bad ones are recorded
   as ``invalid`` and the run still exits 1, since those rows were not done.
2. Each row becomes a :class:`Job`: its output path and its full :class:`EditConfig`, with a
   seed that is the same on every run (so that resuming can compare parameters).
3. Rows are split between processes with accelerate's ``PartialState.split_between_processes``
   (one process unless started by ``accelerate launch``): the rows whose output is missing and
   the rows whose output exists (to check) are each split evenly, so a resumed run stays balanced.
4. A row whose output exists with the same recorded parameters is skipped: the same edit
   settings, the same resolved model and prediction type, the same source and mask bytes
   (SHA-256). The model is loaded once, only if some row is left; rows run alone or K at a
   time in one UNet call.
5. Every finished row is appended to ``results.jsonl`` (``results.<rank>.jsonl`` per process
   when there are several, merged by the main process), flushed and fsynced.

Outputs are written atomically, so a run killed at any moment leaves each output either
complete or absent, and the same command run again does only what is left.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from ddsedit.checks import check_prediction_type
from ddsedit.errors import DDSEditError, InputError
from ddsedit.manifest import Manifest, ManifestRow, load_manifest
from ddsedit.names import DEFAULT_PREDICTION_TYPE, METHODS_WITH_REF

if TYPE_CHECKING:
    from ddsedit.editor import EditConfig, Editor, EditRequest

RESULTS_NAME = "results.jsonl"
STATUSES = ("done", "skipped", "failed", "invalid")  # skipped: done by an earlier run; invalid: a bad row, not run
NOT_DONE_STATUSES = ("failed", "invalid")  # any of these makes the run exit 1
NOT_RUN_LABEL = "(not run: invalid)"  # after each bad row's line with --skip-invalid
# Recorded by every output since outputs name the resolved model and their input files; an output
# without them was written by an older ddsedit, whose record cannot show that it is this row's edit.
IDENTITY_KEYS = ("prediction_type", "source_sha256")
RUN_ID_VARIABLE = "DDSEDIT_BATCH_RUN_ID"  # set by ``--processes`` for the processes it launches
_RANK_FILE = re.compile(r"^results\.(\d+)\.jsonl$")
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")  # imageio's atomic-write temp files
_POLL_SECONDS = 0.5


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class ExpectedModel:
    """What an output must record about the model to count as done, known without loading the weights."""

    identity: str  # ddsedit.loading.model_identity: the same however the model was typed
    prediction_type: str | None  # None: cannot be known without loading the weights, so not compared


def expected_prediction_type(kind: str, path: Path, prediction_type: str | None) -> str | None:
    """The prediction type the editor will use and record for a model, read without loading its weights.

    ``prediction_type`` (the flag) wins; a folder's is its scheduler config's; a ``.safetensors``
    file's is that of the bundled config its header selects. A pickle must be loaded whole to
    tell (None: resume then compares the other parameters only), as must an unreadable model,
    whose load reports the problem if some row is left to run.
    """
    if prediction_type is not None:
        return prediction_type
    if kind == "folder":
        config_path = path / "scheduler" / "scheduler_config.json"
    elif path.suffix.lower() == ".safetensors":
        from ddsedit.checkpoints import MODEL_CONFIGS_DIR, detect_sd_version

        try:
            config_path = MODEL_CONFIGS_DIR / detect_sd_version(path) / "scheduler" / "scheduler_config.json"
        except DDSEditError:
            return None
    else:
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return str(config.get("prediction_type") or DEFAULT_PREDICTION_TYPE)  # as loading.load_model reads it


def written_by_older_version(recorded: dict[str, Any]) -> bool:
    """Whether an output's recorded parameters lack the model/file identity that outputs record now."""
    return not all(key in recorded for key in IDENTITY_KEYS)


@dataclass(frozen=True)
class Job:
    """A row resolved against the defaults: where it writes and exactly what it runs."""

    row: ManifestRow
    output: Path
    config: EditConfig  # the row's settings over the defaults, with its seed

    @property
    def seed(self) -> int:
        assert self.config.seed is not None
        return self.config.seed

    def expected_parameters(self, model: ExpectedModel) -> dict[str, Any]:
        """The parameters (but not the file hashes) that the output's metadata records when this row has run."""
        from ddsedit.editor import edit_parameters

        ref = self.row.ref if self.row.method in METHODS_WITH_REF else ""
        parameters = edit_parameters(self.row.method, ref, self.row.query, self.seed, self.config)
        parameters["model"] = model.identity
        if model.prediction_type is not None:
            parameters["prediction_type"] = model.prediction_type
        return parameters

    def file_hashes(self) -> dict[str, str]:
        """The SHA-256 of the row's source (and mask) as they are now, keyed as outputs record them.

        Raises:
            InputError: a file cannot be read.
        """
        from ddsedit import imageio

        hashes = {"source_sha256": imageio.file_sha256(self.row.src)}
        if self.row.mask is not None:
            hashes["mask_sha256"] = imageio.file_sha256(self.row.mask)
        return hashes

    def recorded_parameters(self) -> dict[str, Any] | None:
        """The parameters recorded in the output's metadata; None if it has none or cannot be read."""
        from ddsedit import imageio

        try:
            recorded = json.loads(imageio.read_metadata(self.output)["ddsedit"])
        except (DDSEditError, KeyError, ValueError, OSError):
            return None
        return recorded if isinstance(recorded, dict) else None

    def output_matches(self, model: ExpectedModel) -> bool:
        """Whether the output exists, is complete and records this row's edit of these very files on this model.

        An output of an older ddsedit (see :func:`written_by_older_version`) never matches.
        """
        recorded = self.recorded_parameters()
        if recorded is None or written_by_older_version(recorded):
            return False
        if any(recorded.get(key) != value for key, value in self.expected_parameters(model).items()):
            return False
        try:
            hashes = self.file_hashes()  # read last: the cheap comparisons usually decide
        except DDSEditError:
            return False
        return all(recorded.get(key) == value for key, value in hashes.items())


def plan_jobs(rows: list[ManifestRow], defaults: EditConfig, out_dir: Path) -> list[Job]:
    """Resolve each row's settings and seed: the row's, else ``defaults``' (the flags and the model's).

    A row without a seed takes the default seed (``--seed``); with none, a seed derived from
    the row itself (:meth:`ManifestRow.derived_seed`), so that every run of the same manifest
    uses the same seeds and a finished row can be recognised by its output's metadata.
    """
    jobs = []
    for row in rows:
        seed = row.seed if row.seed is not None else defaults.seed
        if seed is None:
            seed = row.derived_seed()
        config = defaults.replace(steps=row.steps, guidance=row.guidance, lr=row.lr, seed=seed)
        jobs.append(Job(row=row, output=out_dir / row.out, config=config))
    return jobs


def group_jobs(jobs: list[Job], batch_size: int, stride: int) -> list[list[Job]]:
    """Groups of at most ``batch_size`` jobs that can share UNet calls: same method, settings and working size.

    Groups keep the order of their first job; with ``batch_size`` 1 every job is its own group.
    """
    if batch_size <= 1:
        return [[job] for job in jobs]
    from ddsedit import imageio

    buckets: dict[tuple[Any, ...], list[Job]] = {}
    for job in jobs:
        settings = dataclasses.astuple(dataclasses.replace(job.config, seed=0))
        try:
            working = imageio.working_size(*job.row.image_size, job.config.size, stride)
        except InputError:
            working = ("alone", job.row.line)  # fails when it runs, on its own
        buckets.setdefault((job.row.method, settings, working), []).append(job)
    groups = [bucket[i : i + batch_size] for bucket in buckets.values() for i in range(0, len(bucket), batch_size)]
    position = {id(job): index for index, job in enumerate(jobs)}
    return sorted(groups, key=lambda group: position[id(group[0])])


# --------------------------------------------------------------------------- results


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


class _RankFeed:
    """Follows the other processes' results files, counting this run's records by status."""

    def __init__(self, out_dir: Path, run: str, own_rank: int) -> None:
        self.out_dir = out_dir
        self.run = run
        self.own_rank = own_rank
        self.offsets: dict[Path, int] = {}
        self.counts: Counter[str] = Counter()

    def poll(self) -> Counter[str]:
        for path in rank_files(self.out_dir):
            if path.name == f"results.{self.own_rank}.jsonl":
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


# --------------------------------------------------------------------------- display


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
        self.others = Counter(counts)
        self._refresh()

    def row_started(self, description: str, steps: int | None) -> None:
        if self._progress is not None:
            self._progress.reset(self._row, total=steps, completed=0, description=description, info="", visible=True)

    def row_step(self, step: int, steps: int) -> None:
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


# --------------------------------------------------------------------------- running


@dataclass
class BatchOptions:
    """Everything ``ddsedit batch`` was given; the edit settings are defaults for the rows."""

    manifest: Path
    out_dir: Path
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    steps: int | None = None
    guidance: float | None = None
    lr: float | None = None
    t_min: int | None = None
    t_max: int | None = None
    seed: int | None = None
    negative: str | None = None
    size: int | None = None
    batch_size: int = 1
    processes: int = 1
    skip_invalid: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    prediction_type: str | None = None
    cuda_graph: bool = False
    quiet: bool = False
    verbose: bool = False

    def overrides(self) -> dict[str, Any]:
        """The edit settings that were given (``None``: not given)."""
        return dict(
            steps=self.steps, guidance=self.guidance, lr=self.lr, t_min=self.t_min, t_max=self.t_max,
            seed=self.seed, negative=self.negative, size=self.size,
        )  # fmt: skip

    def child_arguments(self) -> list[str]:
        """The ``ddsedit batch ...`` arguments that repeat these options, minus ``--processes``."""
        arguments = ["batch", str(self.manifest), "--out-dir", str(self.out_dir)]  # the processes share our cwd
        arguments += ["--device", self.device, "--dtype", self.dtype, "--batch-size", str(self.batch_size)]
        valued = {"--model": self.model, "--prediction-type": self.prediction_type, **{
            f"--{name.replace('_', '-')}": value for name, value in self.overrides().items()
        }}  # fmt: skip
        for flag, value in valued.items():
            if value is not None:
                arguments += [flag, str(value)]
        switches = {
            "--skip-invalid": self.skip_invalid, "--overwrite": self.overwrite, "--allow-pickle": self.allow_pickle,
            "--cuda-graph": self.cuda_graph, "--quiet": self.quiet, "--verbose": self.verbose,
        }  # fmt: skip
        return arguments + [flag for flag, on in switches.items() if on]


@dataclass
class _Run:
    """What one process needs while it works through its rows."""

    options: BatchOptions
    run: str
    rank: int
    results: Path
    expected_model: ExpectedModel
    display: BatchDisplay
    emit: Callable[[str], None]

    def record(self, job: Job, status: str, seconds: float, error: str | None = None) -> None:
        record = RowRecord(
            line=job.row.line, src=str(job.row.src), out=str(job.output), status=status, seconds=round(seconds, 3),
            error=error, seed=job.seed, run=self.run, rank=self.rank,
        )  # fmt: skip
        append_records(self.results, [record.to_json()])
        self.display.finished(status)
        if status in ("done", "skipped"):
            self.emit(str(job.output))
        elif status == "failed":
            self.display.error(f"{self.options.manifest}:{job.row.line}: failed: {error}")


def run_batch(options: BatchOptions, console: Console, emit: Callable[[str], None]) -> int:
    """Run a manifest in this process (or launch ``options.processes`` processes); returns the exit code.

    0: every row done or skipped (done before); 1: some row failed, or was invalid and not run
    (``skip_invalid``). Bad input (flags, the manifest, its rows unless ``skip_invalid``) raises
    :class:`InputError` before any model loads.
    """
    started = time.monotonic()
    launched_by_parent = os.environ.get(RUN_ID_VARIABLE)
    is_main_rank = int(os.environ.get("RANK", "0")) == 0
    _check_options(options)
    manifest = load_manifest(options.manifest)
    if manifest.errors and (is_main_rank and not launched_by_parent):
        suffix = f" {NOT_RUN_LABEL}" if options.skip_invalid else ""
        for line in manifest.error_lines():
            console.print(line + suffix, markup=False, highlight=False, soft_wrap=True)
    if manifest.errors and not options.skip_invalid:
        raise InputError(
            f"{len({e.line for e in manifest.errors})} bad row(s) in {options.manifest}: nothing was run "
            "(fix them, or pass --skip-invalid to run the others)"
        )
    if not manifest.rows:
        raise InputError(f"no rows to run in {options.manifest}")
    from ddsedit.loading import quiet_third_party_output

    quiet_third_party_output(options.verbose)  # imports the libraries: only now that the manifest is fine
    defaults, expected_model = resolve_defaults(options)

    if options.processes > 1:
        return launch_processes(options, console)

    state = _process_state(options.device)
    distributed = state.num_processes > 1
    device = _process_device(options.device, state)
    out_dir = Path(options.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create --out-dir {out_dir}: {error.strerror or error}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to --out-dir {out_dir}")

    run = launched_by_parent or uuid.uuid4().hex
    jobs = plan_jobs(manifest.rows, defaults, out_dir)
    present: list[bool] = []
    if state.is_main_process:
        merge_rank_files(out_dir)  # what a killed multi-process run left
        append_records(out_dir / RESULTS_NAME, _invalid_records(manifest, run))
        present = [job.output.exists() for job in jobs]
        if not options.overwrite:
            _note_older_outputs(console, [job for job, there in zip(jobs, present, strict=True) if there])
    if distributed:
        from accelerate.utils import broadcast_object_list

        # One view of which outputs exist, taken before any process writes (this is also a barrier).
        run, present = broadcast_object_list([run, present])
    my_jobs = _my_share(state, jobs, present, options.overwrite)
    results = out_dir / (f"results.{state.process_index}.jsonl" if distributed else RESULTS_NAME)

    quiet = options.quiet or not state.is_main_process
    with BatchDisplay(console, total=len(jobs), quiet=quiet) as display:
        context = _Run(options, run, state.process_index, results, expected_model, display, emit)
        feed = _RankFeed(out_dir, run, state.process_index) if distributed and state.is_main_process else None
        _work(context, my_jobs, device, feed)
        if feed is not None:
            _wait_for_other_processes(feed, display, len(jobs) - len(my_jobs))
    if distributed:
        state.destroy_process_group()  # no collective follows: the main process polls files instead
        if not state.is_main_process:
            return 0  # the main process reports this process's rows
        merge_rank_files(out_dir)

    records = run_records(out_dir, run)
    if not options.quiet:
        print_summary(console, records, time.monotonic() - started, options.manifest)
    not_done = any(record.get("status") in NOT_DONE_STATUSES for record in records)
    if launched_by_parent:
        return 0  # the launching process reads the results and sets the exit code
    return 1 if not_done else 0


def _check_options(options: BatchOptions) -> None:
    if options.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.processes < 1:
        raise InputError(f"--processes must be at least 1, got {options.processes}")
    if options.processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("--processes cannot be used under accelerate launch: use one or the other")
    check_prediction_type(options.prediction_type)


def resolve_defaults(options: BatchOptions) -> tuple[EditConfig, ExpectedModel]:
    """The rows' default settings (the model's ``ddsedit.json``, then the flags) and what outputs record of the model.

    Reads only the model's defaults and scheduler config (or a checkpoint's header), not its
    weights, so that finished rows can be recognised without loading the model.
    """
    from ddsedit.editor import EditConfig
    from ddsedit.loading import locate_model, model_identity, read_defaults

    overrides = options.overrides()
    EditConfig().replace(**overrides).validate()  # the flags, with their names in the message
    kind, path = locate_model(options.model, allow_pickle=options.allow_pickle)
    defaults = EditConfig().replace(**(read_defaults(path) if kind == "folder" else {})).replace(**overrides)
    defaults.validate()
    expected = ExpectedModel(
        identity=model_identity(options.model, kind, path),
        prediction_type=expected_prediction_type(kind, path, options.prediction_type),
    )
    return defaults, expected


def _note_older_outputs(console: Console, existing: list[Job]) -> None:
    """One line on stderr if some existing outputs were written without model/file identity (they will not match)."""
    older = 0
    for job in existing:
        recorded = job.recorded_parameters()
        older += recorded is not None and written_by_older_version(recorded)
    if older:
        subject, them = (f"{older} outputs were", "them") if older > 1 else ("1 output was", "it")
        console.print(
            f"{subject} written by an older ddsedit without model/file identity; "
            f"treating {them} as different (use --overwrite to redo {them})",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip


def _process_state(device: str) -> Any:
    """accelerate's PartialState for this process, on the CPU when the device is the CPU."""
    from accelerate import PartialState

    from ddsedit.loading import resolve_device

    return PartialState(cpu=resolve_device(device).type == "cpu")


def _process_device(device: str, state: Any) -> str:
    """The user's device in a single process; each process's own device (cuda:N, cpu) when there are several."""
    if state.num_processes == 1:
        return device
    if device.strip().lower() not in ("auto", "cuda", "cpu"):
        raise InputError(
            f"with several processes --device must be auto, cuda or cpu (each takes its own), got {device}"
        )
    return str(state.device)


def _my_share(state: Any, jobs: list[Job], present: list[bool], overwrite: bool) -> list[Job]:
    """This process's rows: the rows to edit and the rows to check are each split evenly between processes.

    So a resumed run spreads what is left over every process, not just over those whose
    share happened to be unfinished. Every process must get the same ``present``.
    """
    to_edit = [job for job, there in zip(jobs, present, strict=True) if overwrite or not there]
    to_check = [job for job, there in zip(jobs, present, strict=True) if not (overwrite or not there)]
    mine: list[Job] = []
    for part in (to_check, to_edit):
        with state.split_between_processes(part) as share:
            mine.extend(share)
    return mine


def _invalid_records(manifest: Manifest, run: str) -> list[str]:
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


def _work(context: _Run, jobs: list[Job], device: str, feed: _RankFeed | None) -> None:
    """Skip finished rows, then load the model (if anything is left) and run the rest in groups."""
    options = context.options
    _remove_stale_temp_files(jobs)
    pending = []
    for job in jobs:
        if not job.output.exists() or options.overwrite:
            pending.append(job)
        elif job.output_matches(context.expected_model):
            context.record(job, "skipped", 0.0)
        else:
            context.record(
                job, "failed", 0.0,
                f"output exists with other parameters: {job.output} (use --overwrite to replace it)",
            )  # fmt: skip
    if not pending:
        return
    from ddsedit.editor import Editor

    context.display.row_started("loading model", None)
    editor = Editor.from_pretrained(
        options.model, device=device, dtype=options.dtype, allow_pickle=options.allow_pickle,
        prediction_type=options.prediction_type, keep_text_encoder=True, cuda_graph=options.cuda_graph,
    )  # fmt: skip
    last_poll = 0.0

    def on_step(step: int, steps: int) -> None:
        nonlocal last_poll
        context.display.row_step(step, steps)
        if feed is not None and time.monotonic() - last_poll > _POLL_SECONDS:
            last_poll = time.monotonic()
            context.display.set_others(feed.poll())

    for group in group_jobs(pending, options.batch_size, editor.components.vae_scale_factor):
        _run_group(context, editor, group, on_step)
        _forget_prompts(editor)
        if feed is not None:
            context.display.set_others(feed.poll())


def _forget_prompts(editor: Editor, keep: int = 256) -> None:
    """Drop the editor's cached prompt embeddings once there are many: a long manifest would grow them unbounded."""
    if editor.cached_prompt_count() > keep:
        editor.clear_prompt_cache()


def _run_group(context: _Run, editor: Editor, group: list[Job], on_step: Callable[[int, int], None]) -> None:
    """Edit a group in one ``edit_batch`` call; if that fails, each row alone, so one bad row fails alone."""
    loaded: list[tuple[Job, EditRequest]] = []
    for job in group:
        started = time.monotonic()
        try:
            loaded.append((job, _request(job)))
        except Exception as error:  # noqa: BLE001 - a row's failure is recorded, the batch goes on
            context.record(job, "failed", time.monotonic() - started, _describe(error, context))
    if len(loaded) > 1 and _edit_and_save(context, editor, loaded, on_step, record_failures=False):
        return
    for job, request in loaded:
        _edit_and_save(context, editor, [(job, request)], on_step, record_failures=True)


def _edit_and_save(
    context: _Run, editor: Editor, items: list[tuple[Job, EditRequest]], on_step: Callable[[int, int], None],
    record_failures: bool,
) -> bool:  # fmt: skip
    """Run one ``edit_batch`` call and save its outputs; False if the call failed (recorded if asked)."""
    from ddsedit.editor import save_result

    jobs = [job for job, _ in items]
    names = ", ".join(job.output.name for job in jobs)
    context.display.row_started(f"line {jobs[0].row.line}: {names}" if len(jobs) == 1 else names, jobs[0].config.steps)
    started = time.monotonic()
    try:
        results = editor.edit_batch(
            [request for _, request in items], jobs[0].row.method, config=jobs[0].config, on_progress=on_step
        )
    except Exception as error:  # noqa: BLE001 - recorded, the batch goes on
        if record_failures:
            for job in jobs:
                context.record(job, "failed", time.monotonic() - started, _describe(error, context))
        return False
    seconds = (time.monotonic() - started) / len(jobs)
    for job, result in zip(jobs, results, strict=True):
        try:
            save_result(result, job.output, overwrite=context.options.overwrite)
        except Exception as error:  # noqa: BLE001
            context.record(job, "failed", seconds, _describe(error, context))
        else:
            context.record(job, "done", seconds)
    return True


def _request(job: Job) -> EditRequest:
    """Load a row's image (and mask) now, so that a bad file fails this row, not its group."""
    from ddsedit import imageio
    from ddsedit.editor import EditRequest

    row = job.row
    hashes = job.file_hashes()  # recorded with the output, so that a rerun notices a file changed in place
    source = imageio.load_image(row.src)
    mask = imageio.load_mask(row.mask, source.size) if row.mask is not None else None
    return EditRequest(
        image=source, query=row.query, ref=row.ref or None, mask=mask, seed=job.seed,
        source_sha256=hashes["source_sha256"], mask_sha256=hashes.get("mask_sha256"),
    )  # fmt: skip


def _describe(error: BaseException, context: _Run) -> str:
    """One line for a row's error (a traceback too on stderr with ``--verbose``)."""
    if context.options.verbose and not isinstance(error, DDSEditError):
        context.display.error("".join(traceback.format_exception(error)).rstrip())
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, DDSEditError):
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _remove_stale_temp_files(jobs: list[Job]) -> None:
    """Remove the temp files that a killed run's atomic writes left beside these jobs' outputs."""
    by_folder: dict[Path, set[str]] = {}
    for job in jobs:
        by_folder.setdefault(job.output.parent, set()).add(job.output.name)
    for folder, names in by_folder.items():
        for path in folder.iterdir():
            match = _TEMP_FILE.match(path.name)
            if match and match.group("name") in names:
                path.unlink(missing_ok=True)


def _wait_for_other_processes(feed: _RankFeed, display: BatchDisplay, expected: int) -> None:
    """Main process: wait until the other processes have recorded all their rows.

    Polls their results files rather than waiting in a collective, whose timeout a long
    share of rows would exceed. If another process dies, the launcher stops this one.
    """
    while True:
        counts = feed.poll()
        display.set_others(counts)
        if sum(counts.values()) >= expected:
            return
        time.sleep(_POLL_SECONDS)


def launch_processes(options: BatchOptions, console: Console) -> int:
    """Run the same batch in ``options.processes`` processes through ``accelerate launch``; returns the exit code.

    The processes get a shared run id, so that this process can read their records and
    exit 1 if any row failed.
    """
    import torch

    from ddsedit.loading import resolve_device

    count = options.processes
    device = resolve_device(options.device)
    if device.type == "cuda" and count > torch.cuda.device_count():
        raise InputError(f"--processes {count}, but only {torch.cuda.device_count()} CUDA device(s) here")
    run = uuid.uuid4().hex
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(count),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "ddsedit", *options.child_arguments(),
    ]  # fmt: skip
    if options.verbose:
        console.print("launching: " + " ".join(command), markup=False, soft_wrap=True)
    process = subprocess.Popen(command, env={**os.environ, RUN_ID_VARIABLE: run})
    try:
        returncode = process.wait()
    except KeyboardInterrupt:
        try:
            process.wait(timeout=30)  # the processes got the same SIGINT: let them stop cleanly
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    records = run_records(Path(options.out_dir), run)
    if any(record.get("status") in NOT_DONE_STATUSES for record in records) or returncode != 0:
        if returncode != 0:
            console.print(f"error: the launched processes exited with code {returncode}", markup=False)
        return 1
    return 0
