"""Several processes: launching them through accelerate, each one's device and share of rows, waiting for them.

``--processes N`` relaunches the same command through ``accelerate launch``; a command started
by ``accelerate launch`` directly works the same way. Every process reads the manifest, takes
its share of the rows and writes its own results file; the main process shows the progress of
all of them and reports the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from ddsedit.batch.records import NOT_DONE_STATUSES, POLL_SECONDS, RankFeed, run_records
from ddsedit.errors import InputError

if TYPE_CHECKING:
    from ddsedit.batch.display import BatchDisplay
    from ddsedit.batch.options import BatchOptions
    from ddsedit.batch.plan import Job

RUN_ID_VARIABLE = "DDSEDIT_BATCH_RUN_ID"  # set by ``--processes`` for the processes it launches


def launch_processes(options: BatchOptions, console: Console) -> int:
    """Run the same batch in ``options.processes`` processes through ``accelerate launch``; returns the exit code.

    The processes get a shared run id, so that this process can read their records and
    exit 1 if any row failed or was invalid.
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


def process_state(device: str) -> Any:
    """accelerate's PartialState for this process, on the CPU when the device is the CPU."""
    from accelerate import PartialState

    from ddsedit.loading import resolve_device

    return PartialState(cpu=resolve_device(device).type == "cpu")


def process_device(device: str, state: Any) -> str:
    """The user's device in a single process; each process's own device (cuda:N, cpu) when there are several."""
    if state.num_processes == 1:
        return device
    if device.strip().lower() not in ("auto", "cuda", "cpu"):
        raise InputError(
            f"with several processes --device must be auto, cuda or cpu (each takes its own), got {device}"
        )
    return str(state.device)


def my_share(state: Any, jobs: list[Job], present: list[bool], overwrite: bool) -> list[Job]:
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


def wait_for_other_processes(feed: RankFeed, display: BatchDisplay, expected: int) -> None:
    """Main process: wait until the other processes have recorded all their rows.

    Polls their results files rather than waiting in a collective, whose timeout a long
    share of rows would exceed. If another process dies, the launcher stops this one.
    """
    while True:
        counts = feed.poll()
        display.set_others(counts)
        if sum(counts.values()) >= expected:
            return
        time.sleep(POLL_SECONDS)
