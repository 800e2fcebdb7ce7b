"""Batches over several processes (ddsedit.batch.processes): launching, sharing the rows, a real 2-process run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from batch_support import environment, manifest_rows, results, run_cli, write_jsonl

from ddsedit.batch import BatchOptions, processes, records


def test_processes_flag_relaunches_through_accelerate(tmp_path: Path, images: Path, tiny_model_dir, monkeypatch):
    manifest = write_jsonl(tmp_path / "manifest.jsonl", manifest_rows(2))
    launched = {}

    class FakeProcess:
        def __init__(self, command, env):
            launched.update(command=command, env=env)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(processes.subprocess, "Popen", FakeProcess)
    result = run_cli(manifest, tmp_path / "out", tiny_model_dir, "--processes", "2", "--device", "cpu", "--seed", "4")
    assert result.exit_code == 0, result.stderr
    command = launched["command"]
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2"
    arguments = command[command.index("ddsedit") + 1 :]
    assert arguments[:4] == ["batch", str(manifest), "--out-dir", str(tmp_path / "out")]
    assert "--processes" not in arguments and ["--seed", "4"] == arguments[arguments.index("--seed") :][:2]
    assert launched["env"][processes.RUN_ID_VARIABLE]


def test_processes_flag_exits_1_when_a_launched_run_recorded_an_invalid_row(
    tmp_path: Path, images: Path, tiny_model_dir, monkeypatch
) -> None:
    missing = {"src": "images/missing.png", "query": "q", "method": "sds"}
    manifest = write_jsonl(tmp_path / "manifest.jsonl", manifest_rows(1) + [missing])
    out_dir = tmp_path / "out"

    class FakeProcess:
        """Records what the launched processes would: one row done, one invalid."""

        def __init__(self, command, env):
            out_dir.mkdir()
            run = env[processes.RUN_ID_VARIABLE]
            records.append_records(out_dir / "results.jsonl", [
                {"line": 1, "status": "done", "run": run}, {"line": 2, "status": "invalid", "run": run},
            ])  # fmt: skip

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(processes.subprocess, "Popen", FakeProcess)
    result = run_cli(manifest, out_dir, tiny_model_dir, "--processes", "2", "--device", "cpu", "--skip-invalid")
    assert result.exit_code == 1, result.stderr


def test_shares_split_the_rows_to_edit_and_to_check_evenly_without_overlap() -> None:
    from accelerate import PartialState

    class Process:
        """Process ``index`` of ``count``, split by accelerate's own code."""

        def __init__(self, index: int, count: int) -> None:
            self.process_index, self.num_processes = index, count

        def split_between_processes(self, inputs):
            return PartialState.split_between_processes(self, inputs)

    jobs = list(range(10))
    present = [True] * 6 + [False] * 4  # a resumed run: the first six rows are done
    shares = [processes.my_share(Process(index, 2), jobs, present, overwrite=False) for index in (0, 1)]
    assert sorted(shares[0] + shares[1]) == jobs  # every row once
    assert [len([job for job in share if not present[job]]) for share in shares] == [2, 2]  # the work, halved
    redo = [processes.my_share(Process(index, 2), jobs, present, overwrite=True) for index in (0, 1)]
    assert redo == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_two_cpu_processes_through_accelerate_launch_split_the_rows(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    rows = 5
    manifest = write_jsonl(tmp_path / "manifest.jsonl", manifest_rows(rows))
    out_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "ddsedit", "batch", str(manifest), "--out-dir", str(out_dir), "--model", str(tiny_model_dir),
        "--steps", "2", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    recorded = results(out_dir)
    assert records.rank_files(out_dir) == []  # merged into results.jsonl by the main process
    by_rank = {rank: sorted(r["line"] for r in recorded if r["rank"] == rank) for rank in (0, 1)}
    assert by_rank == {0: [1, 2, 3], 1: [4, 5]}  # split_between_processes: no overlap, nothing left out
    assert all(record["status"] == "done" for record in recorded) and len({r["run"] for r in recorded}) == 1
    assert sorted(result.stdout.splitlines()) == sorted(str(out_dir / f"edit{i}.png") for i in range(rows))


def test_cuda_graph_on_a_cpu_is_one_clear_error_and_reaches_child_processes(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    manifest = write_jsonl(tmp_path / "manifest.jsonl", manifest_rows(1))
    result = run_cli(manifest, tmp_path / "out", tiny_model_dir, "--device", "cpu", "--cuda-graph")
    assert result.exit_code == 2
    assert "--cuda-graph needs a CUDA device" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "edit0.png").exists()
    options = BatchOptions(manifest=manifest, out_dir=tmp_path / "out", cuda_graph=True)
    assert "--cuda-graph" in options.child_arguments()


def test_child_processes_get_the_method_options(tmp_path: Path) -> None:
    options = BatchOptions(manifest=tmp_path / "m.jsonl", out_dir=tmp_path / "out",
                           method_options={"cut_patch_sizes": (1, 2), "identity_weight": 2.0, "cut_weight": 0.5})
    arguments = options.child_arguments()
    for flag, value in (("--cut-patch-sizes", "1,2"), ("--identity-weight", "2.0"), ("--cut-weight", "0.5")):
        assert arguments[arguments.index(flag) + 1] == value
    assert "--pds-grid" not in arguments  # not given: the children use the default too
