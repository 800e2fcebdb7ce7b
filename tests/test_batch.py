"""``ddsedit batch`` runs (ddsedit.batch.run): invalid rows, resume, failures, interrupts and kills."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from batch_support import environment, last_run, manifest_rows, results, run_cli, write_jsonl

from ddsedit.imageio import read_metadata
from ddsedit.manifest import load_manifest


def test_skip_invalid_runs_the_valid_rows_records_the_others_and_exits_1(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    missing = {"src": "images/missing.png", "query": "q", "method": "sds"}
    manifest = write_jsonl(tmp_path / "manifest.jsonl", manifest_rows(2) + [missing])
    with open(manifest, "a", encoding="utf-8") as handle:
        handle.write("{not json\n")  # line 4: no src to record
    out_dir = tmp_path / "out"
    result = run_cli(manifest, out_dir, tiny_model_dir, "--skip-invalid", "--quiet")
    assert result.exit_code == 1, result.stderr  # a script must see that some row was not done
    assert result.stdout.splitlines() == [str(out_dir / "edit0.png"), str(out_dir / "edit1.png")]
    lines = result.stderr.splitlines()
    assert lines[0] == f"{manifest}:3: src not found: {tmp_path / 'images/missing.png'} (not run: invalid)"
    assert lines[1].startswith(f"{manifest}:4: invalid JSON") and lines[1].endswith("(not run: invalid)")
    assert "(skipped)" not in result.stderr  # the word for rows already done
    records = {record["line"]: record for record in results(out_dir)}
    assert {line: record["status"] for line, record in records.items()} == {
        1: "done", 2: "done", 3: "invalid", 4: "invalid"
    }  # fmt: skip
    assert records[3]["src"] == "images/missing.png" and records[4]["src"] == ""  # as written in the manifest

    again = run_cli(manifest, out_dir, tiny_model_dir, "--skip-invalid", "--quiet")
    assert again.exit_code == 1  # the finished rows are skipped, the bad ones are still not done
    assert [r["status"] for r in last_run(out_dir)] == ["invalid", "invalid", "skipped", "skipped"]


def test_resume_reruns_only_the_missing_output(tmp_path: Path, images: Path, tiny_model_dir) -> None:
    manifest = write_jsonl(tmp_path / "manifest.jsonl", manifest_rows(3))
    out_dir = tmp_path / "out"
    first = run_cli(manifest, out_dir, tiny_model_dir, "--quiet")
    assert first.exit_code == 0, first.stderr
    outputs = [out_dir / f"edit{i}.png" for i in range(3)]
    assert first.stdout.splitlines() == [str(path) for path in outputs]
    metadata = read_metadata(outputs[0])
    assert metadata["method"] == "dds" and metadata["steps"] == "2" and metadata["model"] == str(tiny_model_dir)
    # Without --seed each row gets a seed derived from the row, recorded with its output.
    assert metadata["seed"] == str(load_manifest(manifest).rows[0].derived_seed())
    before = {path: path.stat().st_mtime_ns for path in outputs}

    outputs[1].unlink()
    second = run_cli(manifest, out_dir, tiny_model_dir)  # not quiet: bars and the summary table
    assert second.exit_code == 0, second.stderr
    assert {(r["line"], r["status"]) for r in last_run(out_dir)} == {(1, "skipped"), (2, "done"), (3, "skipped")}
    assert outputs[0].stat().st_mtime_ns == before[outputs[0]] and outputs[2].stat().st_mtime_ns == before[outputs[2]]
    assert sorted(second.stdout.splitlines()) == sorted(str(path) for path in outputs)
    assert "skipped" in second.stderr and "status" in second.stderr  # the summary table

    # Other parameters: the existing outputs are not this row's edit, and are kept unless --overwrite.
    changed = run_cli(manifest, out_dir, tiny_model_dir, "--guidance", "3", "--quiet")
    assert changed.exit_code == 1
    assert changed.stderr.count("output exists with other parameters") == 3
    assert outputs[0].stat().st_mtime_ns == before[outputs[0]]
    replaced = run_cli(manifest, out_dir, tiny_model_dir, "--guidance", "3", "--quiet", "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert all(read_metadata(path)["guidance"] == "3.0" for path in outputs)
    assert [p.name for p in out_dir.iterdir() if p.suffix == ".tmp"] == []


def test_jpeg_and_webp_outputs_are_written_and_recognised_when_resuming(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    rows = manifest_rows(3)
    rows[0]["out"], rows[1]["out"] = "edit0.jpg", "edit1.webp"
    manifest = write_jsonl(tmp_path / "manifest.jsonl", rows)
    out_dir = tmp_path / "out"
    first = run_cli(manifest, out_dir, tiny_model_dir, "--quiet")
    assert first.exit_code == 0, first.stderr
    for name in ("edit0.jpg", "edit1.webp", "edit2.png"):
        assert read_metadata(out_dir / name)["method"] == "dds", name  # the parameters, read back
    again = run_cli(manifest, out_dir, tiny_model_dir, "--quiet")
    assert again.exit_code == 0, again.stderr
    assert [r["status"] for r in last_run(out_dir)] == ["skipped", "skipped", "skipped"]


def test_a_failed_row_is_recorded_and_the_others_run(tmp_path: Path, images: Path, tiny_model_dir) -> None:
    rows = manifest_rows(3)
    rows.insert(1, {"src": "images/truncated.png", "ref": "a red circle", "query": "a blue circle"})
    rows.insert(3, {"src": "images/green.png", "ref": "a green circle", "query": "a blue circle",
                    "method": "masked-dds", "mask": "images/black.png"})  # fmt: skip
    manifest = write_jsonl(tmp_path / "manifest.jsonl", rows)
    out_dir = tmp_path / "out"
    result = run_cli(manifest, out_dir, tiny_model_dir, "--quiet")
    assert result.exit_code == 1
    assert sorted(result.stdout.splitlines()) == sorted(str(out_dir / f"edit{i}.png") for i in range(3))
    failures = result.stderr.strip().splitlines()
    assert failures == [
        f"{manifest}:2: failed: source image is truncated or corrupt: {images / 'truncated.png'}",
        f"{manifest}:4: failed: mask is all black: nothing to edit: {images / 'black.png'}",
    ]
    records = {record["line"]: record for record in results(out_dir)}
    assert [records[line]["status"] for line in range(1, 6)] == ["done", "failed", "done", "failed", "done"]
    assert "truncated" in records[2]["error"] and records[1]["error"] is None
    assert all(isinstance(record["seconds"], float) for record in records.values())
    assert not (out_dir / "truncated.dds.png").exists()


def test_an_interrupt_keeps_finished_rows_and_a_rerun_finishes(
    tmp_path: Path, images: Path, tiny_model_dir, monkeypatch
) -> None:
    from ddsedit.editor import Editor

    manifest = write_jsonl(tmp_path / "manifest.jsonl", manifest_rows(3))
    out_dir = tmp_path / "out"
    edit_batch = Editor.edit_batch
    calls = []

    def interrupted(self, requests, method, config=None, on_progress=None):
        calls.append(method)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return edit_batch(self, requests, method, config=config, on_progress=on_progress)

    monkeypatch.setattr(Editor, "edit_batch", interrupted)
    result = run_cli(manifest, out_dir, tiny_model_dir, "--quiet")
    assert result.exit_code == 130
    assert "run the same command again" in result.stderr
    assert [record["status"] for record in results(out_dir)] == ["done"]
    monkeypatch.setattr(Editor, "edit_batch", edit_batch)
    again = run_cli(manifest, out_dir, tiny_model_dir, "--quiet")
    assert again.exit_code == 0, again.stderr
    assert [(r["line"], r["status"]) for r in last_run(out_dir)] == [(1, "skipped"), (2, "done"), (3, "done")]


def test_killed_mid_batch_then_rerun_gives_every_output_exactly_once(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    rows = 5
    manifest = write_jsonl(tmp_path / "manifest.jsonl", manifest_rows(rows))
    out_dir = tmp_path / "out"
    command = [sys.executable, "-m", "ddsedit", "batch", str(manifest), "--out-dir", str(out_dir),
               "--model", str(tiny_model_dir), "--steps", "12", "--quiet"]  # fmt: skip
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not results(out_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    recorded_before = len(results(out_dir))
    assert 1 <= recorded_before < rows  # killed in the middle

    rerun = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    expected = {f"edit{i}.png" for i in range(rows)}
    assert {path.name for path in out_dir.iterdir()} == expected | {"results.jsonl"}  # no temp files left
    for name in expected:
        assert read_metadata(out_dir / name)["steps"] == "12"  # every output complete, with its metadata
    done = Counter(record["line"] for record in results(out_dir) if record["status"] == "done")
    finished = {record["line"] for record in results(out_dir) if record["status"] in ("done", "skipped")}
    assert finished == set(range(1, rows + 1)) and max(done.values()) == 1  # each row edited once


def test_method_options_reach_the_rows_that_read_them_and_resume_compares_them(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    rows = [{**row, "method": method} for row, method in zip(manifest_rows(3), ("cds", "ids", "dds"), strict=True)]
    manifest = write_jsonl(tmp_path / "manifest.jsonl", rows)
    out_dir = tmp_path / "out"
    options = ("--cut-weight", "1.5", "--cut-patch-sizes", "1", "--identity-steps", "2", "--quiet")
    first = run_cli(manifest, out_dir, tiny_model_dir, *options)
    assert first.exit_code == 0, first.stderr
    cds, ids, dds = (read_metadata(out_dir / f"edit{i}.png") for i in range(3))
    assert (cds["method"], cds["cut_weight"], cds["cut_patch_sizes"]) == ("cds", "1.5", "[1]")
    assert (ids["cut_weight"], ids["identity_steps"]) == ("1.5", "2")
    assert "cut_weight" not in dds  # DDS reads none of them

    again = run_cli(manifest, out_dir, tiny_model_dir, *options)
    assert [r["status"] for r in last_run(out_dir)] == ["skipped"] * 3
    changed = run_cli(manifest, out_dir, tiny_model_dir, "--overwrite", "--cut-weight", "2", "--cut-patch-sizes", "1",
                      "--identity-steps", "2", "--quiet")  # fmt: skip
    assert again.exit_code == changed.exit_code == 0, changed.stderr
    assert read_metadata(out_dir / "edit0.png")["cut_weight"] == "2.0"


def test_a_bad_method_option_is_one_line_before_any_row_runs(tmp_path: Path, images: Path, tiny_model_dir) -> None:
    manifest = write_jsonl(tmp_path / "manifest.jsonl", manifest_rows(1))
    for flag, value, message in (("--cut-patch-sizes", "1,x", "--cut-patch-sizes must be comma-separated integers"),
                                 ("--identity-steps", "-1", "--identity-steps must be in the range [0, 100]"),
                                 ("--pds-grid", "1", "--pds-grid must be in")):  # fmt: skip
        result = run_cli(manifest, tmp_path / "out", tiny_model_dir, flag, value)
        assert result.exit_code == 2 and message in result.stderr, (flag, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "edit0.png").exists()
