"""Running a batch in this process: check the manifest, skip finished rows, edit the rest, record each row."""

from __future__ import annotations

import os
import re
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from ddsedit.batch.display import NOT_RUN_LABEL, BatchDisplay, print_summary
from ddsedit.batch.options import BatchOptions
from ddsedit.batch.plan import ExpectedModel, Job, count_older_outputs, group_jobs, plan_jobs, resolve_defaults
from ddsedit.batch.processes import (
    RUN_ID_VARIABLE,
    launch_processes,
    my_share,
    process_device,
    process_state,
    wait_for_other_processes,
)
from ddsedit.batch.records import (
    NOT_DONE_STATUSES,
    POLL_SECONDS,
    RESULTS_NAME,
    RankFeed,
    RowRecord,
    append_records,
    invalid_records,
    merge_rank_files,
    rank_file,
    run_records,
)
from ddsedit.errors import DDSEditError, InputError
from ddsedit.manifest import load_manifest

if TYPE_CHECKING:
    from ddsedit.editor import Editor, EditRequest

_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")  # imageio's atomic-write temp files


@dataclass
class _ProcessContext:
    """What one process needs while it works through its rows."""

    options: BatchOptions
    run: str
    rank: int
    results: Path
    expected_model: ExpectedModel
    display: BatchDisplay
    emit: Callable[[str], None]

    def record(self, job: Job, status: str, seconds: float, error: str | None = None) -> None:
        """Append the row's record to this process's results file, count it, and report it."""
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
    options.validate()
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
    defaults, expected_model = resolve_defaults(options, tuple(dict.fromkeys(row.method for row in manifest.rows)))

    if options.processes > 1:
        return launch_processes(options, console)

    state = process_state(options.device)
    distributed = state.num_processes > 1
    device = process_device(options.device, state)
    out_dir = Path(options.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create --out-dir {out_dir}: {error.strerror or error}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to --out-dir {out_dir}")

    run = launched_by_parent or uuid.uuid4().hex
    jobs = plan_jobs(manifest.rows, defaults, out_dir, options.mask_settings())
    present: list[bool] = []
    if state.is_main_process:
        merge_rank_files(out_dir)  # what a killed multi-process run left
        append_records(out_dir / RESULTS_NAME, invalid_records(manifest, run))
        present = [job.output.exists() for job in jobs]
        if not options.overwrite:
            existing = [job for job, there in zip(jobs, present, strict=True) if there]
            _note_older_outputs(console, count_older_outputs(existing))
    if distributed:
        from accelerate.utils import broadcast_object_list

        # One view of which outputs exist, taken before any process writes (this is also a barrier).
        run, present = broadcast_object_list([run, present])
    my_jobs = my_share(state, jobs, present, options.overwrite)
    results = rank_file(out_dir, state.process_index) if distributed else out_dir / RESULTS_NAME

    quiet = options.quiet or not state.is_main_process
    with BatchDisplay(console, total=len(jobs), quiet=quiet) as display:
        context = _ProcessContext(options, run, state.process_index, results, expected_model, display, emit)
        feed = RankFeed(out_dir, run, state.process_index) if distributed and state.is_main_process else None
        _work(context, my_jobs, device, feed)
        if feed is not None:
            wait_for_other_processes(feed, display, len(jobs) - len(my_jobs))
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


def _note_older_outputs(console: Console, older: int) -> None:
    """One line on stderr for outputs written without model/file identity: they will not match, and why."""
    if older:
        subject, them = (f"{older} outputs were", "them") if older > 1 else ("1 output was", "it")
        console.print(
            f"{subject} written by an older ddsedit without model/file identity; "
            f"treating {them} as different (use --overwrite to redo {them})",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip


def _work(context: _ProcessContext, jobs: list[Job], device: str, feed: RankFeed | None) -> None:
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
        vae=options.vae,
    )  # fmt: skip
    last_poll = 0.0

    def on_step(step: int, steps: int) -> None:
        nonlocal last_poll
        context.display.row_step(step, steps)
        if feed is not None and time.monotonic() - last_poll > POLL_SECONDS:
            last_poll = time.monotonic()
            context.display.set_others(feed.poll())

    for group in group_jobs(pending, options.batch_size, editor.latent_stride):
        _run_group(context, editor, group, on_step)
        _forget_prompts(editor)
        if feed is not None:
            context.display.set_others(feed.poll())


def _forget_prompts(editor: Editor, keep: int = 256) -> None:
    """Drop the editor's cached prompt embeddings once there are many: a long manifest would grow them unbounded."""
    if editor.cached_prompt_count() > keep:
        editor.clear_prompt_cache()


def _run_group(context: _ProcessContext, editor: Editor, group: list[Job], on_step: Callable[[int, int], None]) -> None:
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
    context: _ProcessContext, editor: Editor, items: list[tuple[Job, EditRequest]], on_step: Callable[[int, int], None],
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
    mask = imageio.load_mask(row.mask, source.size) if row.mask is not None else job.auto_mask
    return EditRequest(
        image=source, query=row.query, ref=row.ref or None, mask=mask, seed=job.seed,
        source_sha256=hashes["source_sha256"], mask_sha256=hashes.get("mask_sha256"),
    )  # fmt: skip


def _describe(error: BaseException, context: _ProcessContext) -> str:
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
