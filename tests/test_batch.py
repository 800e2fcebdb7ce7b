"""``ddsedit batch``: manifests, validation, resume, failures, kills and a 2-process accelerate run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, PngImagePlugin
from typer.testing import CliRunner

from ddsedit import batch
from ddsedit.cli import app
from ddsedit.imageio import read_metadata
from ddsedit.manifest import METHODS as MANIFEST_METHODS
from ddsedit.manifest import load_manifest

runner = CliRunner()
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def _circle(path: Path, colour: str, size: tuple[int, int] = (60, 40)) -> Path:
    image = Image.new("RGB", size, (245, 245, 245))
    ImageDraw.Draw(image).ellipse((10, 5, 40, 35), fill=COLOURS[colour])
    image.save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder with four circles, a mask, an all-black mask and a truncated PNG."""
    folder = tmp_path / "images"
    folder.mkdir()
    for colour in COLOURS:
        _circle(folder / f"{colour}.png", colour)
    mask = Image.new("L", (60, 40), 0)
    ImageDraw.Draw(mask).rectangle((5, 0, 45, 39), fill=255)
    mask.save(folder / "mask.png")
    Image.new("L", (60, 40), 0).save(folder / "black.png")
    data = (folder / "red.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) - 40])  # header fine, pixels cut short
    return folder


def _write_csv(path: Path, header: str, *lines: str) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _rows(count: int) -> list[dict]:
    """``count`` DDS rows over the four circles, each with its own output name."""
    colours = list(COLOURS)
    return [
        {"src": f"images/{colours[i % 4]}.png", "ref": f"a {colours[i % 4]} circle", "query": "a blue circle",
         "out": f"edit{i}.png"}
        for i in range(count)
    ]  # fmt: skip


def _batch(manifest: Path, out_dir: Path, model: Path | str, *extra: str):
    return runner.invoke(
        app, ["batch", str(manifest), "--out-dir", str(out_dir), "--model", str(model), "--steps", "2", *extra]
    )


def _records(out_dir: Path) -> list[dict]:
    return batch.read_records(out_dir / "results.jsonl")


def _last_run(out_dir: Path) -> list[dict]:
    records = _records(out_dir)
    return [record for record in records if record["run"] == records[-1]["run"]]


# --------------------------------------------------------------------------- manifests


def test_methods_match_the_optimizer() -> None:
    from ddsedit.optimize import METHODS

    assert MANIFEST_METHODS == METHODS


def test_jsonl_and_csv_manifests_read_the_same_rows(tmp_path: Path, images: Path) -> None:
    csv_path = _write_csv(
        tmp_path / "manifest.csv",
        "src,ref,query,method,mask,seed,steps,guidance,lr,out",
        "images/red.png,a red circle,a blue circle,,,,,,,",
        "",  # blank lines are skipped
        'images/green.png,,"a blue\ncircle",sds,,3,5,6.5,0.2,green-out.png',  # a quoted cell over two lines
        f"{images / 'blue.png'},a blue circle,a red circle,masked-dds,images/mask.png,,,,,",
    )
    jsonl_path = _write_jsonl(
        tmp_path / "manifest.jsonl",
        [
            {"src": "images/red.png", "ref": "a red circle", "query": "a blue circle"},
            {"src": "images/green.png", "query": "a blue\ncircle", "method": "sds", "seed": 3, "steps": "5",
             "guidance": 6.5, "lr": 0.2, "out": "green-out.png", "mask": None},
            {"src": str(images / "blue.png"), "ref": "a blue circle", "query": "a red circle",
             "method": "masked-dds", "mask": "images/mask.png"},
        ],
    )  # fmt: skip
    from_csv, from_jsonl = load_manifest(csv_path), load_manifest(jsonl_path)
    assert from_csv.errors == [] and from_jsonl.errors == []
    assert [row.line for row in from_csv.rows] == [2, 4, 6]  # where each row starts
    assert [row.line for row in from_jsonl.rows] == [1, 2, 3]
    for row_csv, row_jsonl in zip(from_csv.rows, from_jsonl.rows, strict=True):
        assert {**vars(row_csv), "line": 0} == {**vars(row_jsonl), "line": 0}

    red, green, blue = from_csv.rows
    assert red.src == tmp_path / "images/red.png" and red.method == "dds" and red.out == "red.dds.png"
    assert (red.seed, red.steps, red.guidance, red.lr, red.mask) == (None, None, None, None, None)
    assert red.image_size == (60, 40)
    assert (green.method, green.seed, green.steps, green.guidance, green.lr) == ("sds", 3, 5, 6.5, 0.2)
    assert green.out == "green-out.png" and green.query == "a blue\ncircle"
    assert blue.src == images / "blue.png" and blue.mask == tmp_path / "images/mask.png"
    assert blue.out == "blue.masked-dds.png"
    assert red.derived_seed() == load_manifest(csv_path).rows[0].derived_seed()  # stable across reads
    assert red.derived_seed() != blue.derived_seed()


def test_every_bad_row_is_reported_with_its_line_before_any_model_loads(tmp_path: Path, images: Path) -> None:
    manifest = _write_csv(
        tmp_path / "manifest.csv",
        "src,ref,query,method,mask,seed,steps,guidance,lr,out",
        "images/red.png,a red circle,a blue circle,,,,,,,",  # line 2: fine
        "images/missing.png,a red circle,a blue circle,,,,,,,",  # 3: missing file
        "images/red.png,a red circle,a blue circle,blend,,,,,,x.png",  # 4: unknown method
        "images/green.png,a green circle,   ,,,,,,,",  # 5: empty prompt
        "images/blue.png,a blue circle,a red circle,,,-1,2.5,abc,0,y.png",  # 6: bad numbers
        "images/yellow.png,a yellow circle,a red circle,,,,,,,red.dds.png",  # 7: duplicate output name
        "images/blue.png,,a red circle,dds,,,,,,z.png",  # 8: dds without ref
        "images/blue.png,a blue circle,a red circle,masked-dds,,,,,,w.png",  # 9: masked-dds without mask
    )
    out_dir = tmp_path / "out"
    # The model does not exist: the run must stop at the manifest, before trying to load it.
    result = _batch(manifest, out_dir, tmp_path / "no-such-model")
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    expected = {
        3: "src not found",
        4: "unknown method 'blend'",
        5: "query must not be empty",
        6: "seed must be an integer",
        7: "duplicate output name 'red.dds.png' (also line 2)",
        8: "ref must not be empty",
        9: "masked-dds needs a mask",
    }
    for line, reason in expected.items():
        assert any(text.startswith(f"{manifest}:{line}: ") and reason in text for text in lines), (line, lines)
    for reason in ("steps must be a positive integer, got '2.5'", "guidance must be a number >= 0, got 'abc'",
                   "lr must be a number > 0, got '0'"):  # fmt: skip
        assert f"{manifest}:6: {reason}" in lines
    assert not any(text.startswith(f"{manifest}:2:") for text in lines)
    assert lines[-1].startswith("error: 7 bad row(s)") and "--skip-invalid" in lines[-1]
    assert not out_dir.exists()  # nothing ran, nothing was written


def test_jsonl_format_errors_carry_line_numbers(tmp_path: Path, images: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        '{"src": "images/red.png", "ref": "a red circle", "query": "a blue circle"}\n'
        "{not json\n"
        '["a list"]\n'
        "\n"
        '{"src": "images/red.png", "query": "q", "colour": "red"}\n'
        '{"src": "images/red.png", "ref": "r", "query": 5, "seed": true, "out": "a/b.png"}\n'
    )
    loaded = load_manifest(manifest)
    assert [row.line for row in loaded.rows] == [1]
    reasons = {error.line: [] for error in loaded.errors}
    for error in loaded.errors:
        reasons[error.line].append(error.reason)
    assert reasons[2][0].startswith("invalid JSON") and reasons[3] == ["expected a JSON object, got list"]
    assert "unknown column(s) colour" in reasons[5][0]
    assert sorted(reasons[6]) == sorted(
        ["query must be text, got 5", "query must not be empty", "seed must be an integer in [0, 2^63), got true",
         "out must be a file name, not a path: 'a/b.png'"]
    )  # fmt: skip
    sources = {error.line: error.src for error in loaded.errors}  # src as written, when the line is a row
    assert sources == {2: "", 3: "", 5: "images/red.png", 6: "images/red.png"}
    with pytest.raises(batch.InputError, match="must be a .jsonl or .csv"):
        load_manifest(tmp_path / "manifest.txt")


def test_outputs_may_be_png_jpeg_or_webp_and_nothing_else(tmp_path: Path, images: Path) -> None:
    names = ["a.png", "b.jpg", "c.JPEG", "d.webp", "e.gif", "f.tiff", "g"]
    manifest = _write_jsonl(
        tmp_path / "manifest.jsonl", [{"src": "images/red.png", "query": "q", "method": "sds", "out": name}
                                      for name in names]
    )  # fmt: skip
    loaded = load_manifest(manifest)
    assert [row.out for row in loaded.rows] == names[:4]
    assert [(error.line, error.reason) for error in loaded.errors] == [
        (line, f"out must end in .png, .jpg, .jpeg or .webp (the format it is written in): {name!r}")
        for line, name in ((5, "e.gif"), (6, "f.tiff"), (7, "g"))
    ]


def test_csv_header_problems_are_reported_on_line_1(tmp_path: Path) -> None:
    manifest = _write_csv(tmp_path / "m.csv", "source,ref,ref", "a.png,b,c")
    errors = load_manifest(manifest).errors
    assert len(errors) == 1 and errors[0].line == 1
    assert "unknown column(s) source" in errors[0].reason and "repeated column(s) ref" in errors[0].reason
    assert "missing column(s) src, query" in errors[0].reason


# --------------------------------------------------------------------------- runs


def test_skip_invalid_runs_the_valid_rows_records_the_others_and_exits_1(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    missing = {"src": "images/missing.png", "query": "q", "method": "sds"}
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", _rows(2) + [missing])
    with open(manifest, "a", encoding="utf-8") as handle:
        handle.write("{not json\n")  # line 4: no src to record
    out_dir = tmp_path / "out"
    result = _batch(manifest, out_dir, tiny_model_dir, "--skip-invalid", "--quiet")
    assert result.exit_code == 1, result.stderr  # a script must see that some row was not done
    assert result.stdout.splitlines() == [str(out_dir / "edit0.png"), str(out_dir / "edit1.png")]
    lines = result.stderr.splitlines()
    assert lines[0] == f"{manifest}:3: src not found: {tmp_path / 'images/missing.png'} (not run: invalid)"
    assert lines[1].startswith(f"{manifest}:4: invalid JSON") and lines[1].endswith("(not run: invalid)")
    assert "(skipped)" not in result.stderr  # the word for rows already done
    records = {record["line"]: record for record in _records(out_dir)}
    assert {line: record["status"] for line, record in records.items()} == {
        1: "done", 2: "done", 3: "invalid", 4: "invalid"
    }  # fmt: skip
    assert records[3]["src"] == "images/missing.png" and records[4]["src"] == ""  # as written in the manifest

    again = _batch(manifest, out_dir, tiny_model_dir, "--skip-invalid", "--quiet")
    assert again.exit_code == 1  # the finished rows are skipped, the bad ones are still not done
    assert [r["status"] for r in _last_run(out_dir)] == ["invalid", "invalid", "skipped", "skipped"]


def test_resume_reruns_only_the_missing_output(tmp_path: Path, images: Path, tiny_model_dir) -> None:
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", _rows(3))
    out_dir = tmp_path / "out"
    first = _batch(manifest, out_dir, tiny_model_dir, "--quiet")
    assert first.exit_code == 0, first.stderr
    outputs = [out_dir / f"edit{i}.png" for i in range(3)]
    assert first.stdout.splitlines() == [str(path) for path in outputs]
    metadata = read_metadata(outputs[0])
    assert metadata["method"] == "dds" and metadata["steps"] == "2" and metadata["model"] == str(tiny_model_dir)
    # Without --seed each row gets a seed derived from the row, recorded with its output.
    assert metadata["seed"] == str(load_manifest(manifest).rows[0].derived_seed())
    before = {path: path.stat().st_mtime_ns for path in outputs}

    outputs[1].unlink()
    second = _batch(manifest, out_dir, tiny_model_dir)  # not quiet: bars and the summary table
    assert second.exit_code == 0, second.stderr
    assert {(r["line"], r["status"]) for r in _last_run(out_dir)} == {(1, "skipped"), (2, "done"), (3, "skipped")}
    assert outputs[0].stat().st_mtime_ns == before[outputs[0]] and outputs[2].stat().st_mtime_ns == before[outputs[2]]
    assert sorted(second.stdout.splitlines()) == sorted(str(path) for path in outputs)
    assert "skipped" in second.stderr and "status" in second.stderr  # the summary table

    # Other parameters: the existing outputs are not this row's edit, and are kept unless --overwrite.
    changed = _batch(manifest, out_dir, tiny_model_dir, "--guidance", "3", "--quiet")
    assert changed.exit_code == 1
    assert changed.stderr.count("output exists with other parameters") == 3
    assert outputs[0].stat().st_mtime_ns == before[outputs[0]]
    replaced = _batch(manifest, out_dir, tiny_model_dir, "--guidance", "3", "--quiet", "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert all(read_metadata(path)["guidance"] == "3.0" for path in outputs)
    assert [p.name for p in out_dir.iterdir() if p.suffix == ".tmp"] == []


def test_jpeg_and_webp_outputs_are_written_and_recognised_when_resuming(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    rows = _rows(3)
    rows[0]["out"], rows[1]["out"] = "edit0.jpg", "edit1.webp"
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", rows)
    out_dir = tmp_path / "out"
    first = _batch(manifest, out_dir, tiny_model_dir, "--quiet")
    assert first.exit_code == 0, first.stderr
    for name in ("edit0.jpg", "edit1.webp", "edit2.png"):
        assert read_metadata(out_dir / name)["method"] == "dds", name  # the parameters, read back
    again = _batch(manifest, out_dir, tiny_model_dir, "--quiet")
    assert again.exit_code == 0, again.stderr
    assert [r["status"] for r in _last_run(out_dir)] == ["skipped", "skipped", "skipped"]


def test_a_failed_row_is_recorded_and_the_others_run(tmp_path: Path, images: Path, tiny_model_dir) -> None:
    rows = _rows(3)
    rows.insert(1, {"src": "images/truncated.png", "ref": "a red circle", "query": "a blue circle"})
    rows.insert(3, {"src": "images/green.png", "ref": "a green circle", "query": "a blue circle",
                    "method": "masked-dds", "mask": "images/black.png"})  # fmt: skip
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", rows)
    out_dir = tmp_path / "out"
    result = _batch(manifest, out_dir, tiny_model_dir, "--quiet")
    assert result.exit_code == 1
    assert sorted(result.stdout.splitlines()) == sorted(str(out_dir / f"edit{i}.png") for i in range(3))
    failures = result.stderr.strip().splitlines()
    assert failures == [
        f"{manifest}:2: failed: source image is truncated or corrupt: {images / 'truncated.png'}",
        f"{manifest}:4: failed: mask is all black: nothing to edit: {images / 'black.png'}",
    ]
    records = {record["line"]: record for record in _records(out_dir)}
    assert [records[line]["status"] for line in range(1, 6)] == ["done", "failed", "done", "failed", "done"]
    assert "truncated" in records[2]["error"] and records[1]["error"] is None
    assert all(isinstance(record["seconds"], float) for record in records.values())
    assert not (out_dir / "truncated.dds.png").exists()


def test_batch_size_shares_unet_calls_between_same_size_rows(
    tmp_path: Path, images: Path, tiny_model_dir, monkeypatch
) -> None:
    from ddsedit.editor import Editor

    _circle(images / "wide.png", "red", size=(90, 30))
    rows = _rows(3) + [{"src": "images/wide.png", "ref": "a red circle", "query": "a blue circle"}]
    rows.append({"src": "images/red.png", "query": "a blue circle", "method": "sds"})
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", rows)
    calls: list[tuple[str, int]] = []
    edit_batch = Editor.edit_batch

    def counting(self, requests, method, config=None, on_progress=None):
        calls.append((method, len(requests)))
        return edit_batch(self, requests, method, config=config, on_progress=on_progress)

    monkeypatch.setattr(Editor, "edit_batch", counting)
    grouped = _batch(manifest, tmp_path / "grouped", tiny_model_dir, "--batch-size", "2", "--quiet")
    assert grouped.exit_code == 0, grouped.stderr
    assert calls == [("dds", 2), ("dds", 1), ("dds", 1), ("sds", 1)]  # 3 same-size DDS rows: 2 + 1
    single = _batch(manifest, tmp_path / "single", tiny_model_dir, "--quiet")
    assert single.exit_code == 0, single.stderr
    for name in ("edit0.png", "edit1.png", "edit2.png", "wide.dds.png", "red.sds.png"):
        with Image.open(tmp_path / "grouped" / name) as a, Image.open(tmp_path / "single" / name) as b:
            difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert difference.max() <= 2, name  # same seeds, same edit, up to float rounding


def test_an_interrupt_keeps_finished_rows_and_a_rerun_finishes(
    tmp_path: Path, images: Path, tiny_model_dir, monkeypatch
) -> None:
    from ddsedit.editor import Editor

    manifest = _write_jsonl(tmp_path / "manifest.jsonl", _rows(3))
    out_dir = tmp_path / "out"
    edit_batch = Editor.edit_batch
    calls = []

    def interrupted(self, requests, method, config=None, on_progress=None):
        calls.append(method)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return edit_batch(self, requests, method, config=config, on_progress=on_progress)

    monkeypatch.setattr(Editor, "edit_batch", interrupted)
    result = _batch(manifest, out_dir, tiny_model_dir, "--quiet")
    assert result.exit_code == 130
    assert "run the same command again" in result.stderr
    assert [record["status"] for record in _records(out_dir)] == ["done"]
    monkeypatch.setattr(Editor, "edit_batch", edit_batch)
    again = _batch(manifest, out_dir, tiny_model_dir, "--quiet")
    assert again.exit_code == 0, again.stderr
    assert [(r["line"], r["status"]) for r in _last_run(out_dir)] == [(1, "skipped"), (2, "done"), (3, "done")]


# --------------------------------------------------------------------------- resume: what counts as the same edit


def _rewrite_parameters(path: Path, change: Callable[[dict], dict]) -> None:
    """Re-save a PNG output with its recorded parameters changed (as another ddsedit would have written them)."""
    with Image.open(path) as image:
        recorded = json.loads(image.text["ddsedit"])
        pixels = image.copy()
    info = PngImagePlugin.PngInfo()
    info.add_itxt("ddsedit", json.dumps(change(recorded)))
    pixels.save(path, format="PNG", pnginfo=info)


def test_resume_knows_the_model_however_it_is_typed(tmp_path: Path, images: Path, tiny_model_dir, monkeypatch):
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", _rows(2))
    out_dir = tmp_path / "out"
    (tmp_path / "link").symlink_to(tiny_model_dir, target_is_directory=True)
    monkeypatch.chdir(tiny_model_dir.parent)
    first = _batch(manifest, out_dir, tiny_model_dir.name, "--quiet")
    assert first.exit_code == 0, first.stderr
    assert read_metadata(out_dir / "edit0.png")["model"] == str(tiny_model_dir.resolve())
    for spelling in (f"./{tiny_model_dir.name}", str(tiny_model_dir), str(tmp_path / "link")):
        again = _batch(manifest, out_dir, spelling, "--quiet")
        assert again.exit_code == 0, (spelling, again.stderr)
        assert [r["status"] for r in _last_run(out_dir)] == ["skipped", "skipped"], spelling


def test_resume_compares_the_prediction_type(tmp_path: Path, images: Path, tiny_model_dir) -> None:
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", _rows(2))
    out_dir = tmp_path / "out"
    assert _batch(manifest, out_dir, tiny_model_dir, "--quiet").exit_code == 0
    assert read_metadata(out_dir / "edit0.png")["prediction_type"] == "epsilon"  # the model's scheduler's
    same = _batch(manifest, out_dir, tiny_model_dir, "--prediction-type", "epsilon", "--quiet")
    assert same.exit_code == 0, same.stderr
    assert [r["status"] for r in _last_run(out_dir)] == ["skipped", "skipped"]
    other = _batch(manifest, out_dir, tiny_model_dir, "--prediction-type", "v_prediction", "--quiet")
    assert other.exit_code == 1
    assert other.stderr.count("output exists with other parameters") == 2
    assert [r["status"] for r in _last_run(out_dir)] == ["failed", "failed"]


def test_resume_notices_a_source_or_mask_changed_under_the_same_name(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", [
        {"src": "images/red.png", "ref": "a red circle", "query": "a blue circle", "out": "red.png"},
        {"src": "images/green.png", "ref": "a green circle", "query": "a blue circle", "method": "masked-dds",
         "mask": "images/mask.png", "out": "green.png"},
    ])  # fmt: skip
    out_dir = tmp_path / "out"
    first = _batch(manifest, out_dir, tiny_model_dir, "--quiet")
    assert first.exit_code == 0, first.stderr
    recorded = read_metadata(out_dir / "green.png")
    assert recorded["source_sha256"] == hashlib.sha256((images / "green.png").read_bytes()).hexdigest()
    assert recorded["mask_sha256"] == hashlib.sha256((images / "mask.png").read_bytes()).hexdigest()

    _circle(images / "red.png", "yellow")  # same name, same size, other pixels
    source_changed = _batch(manifest, out_dir, tiny_model_dir, "--quiet")
    assert source_changed.exit_code == 1
    assert [r["status"] for r in _last_run(out_dir)] == ["failed", "skipped"]
    assert "output exists with other parameters" in _last_run(out_dir)[0]["error"]

    mask = Image.new("L", (60, 40), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 30, 39), fill=255)
    mask.save(images / "mask.png")
    mask_changed = _batch(manifest, out_dir, tiny_model_dir, "--quiet")
    assert mask_changed.exit_code == 1
    assert [r["status"] for r in _last_run(out_dir)] == ["failed", "failed"]


def test_outputs_of_an_older_ddsedit_are_redone_only_with_overwrite(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", _rows(3))
    out_dir = tmp_path / "out"
    assert _batch(manifest, out_dir, tiny_model_dir, "--quiet").exit_code == 0
    older_keys = ("prediction_type", "source_sha256", "mask_sha256")
    for name in ("edit0.png", "edit1.png"):  # recorded before outputs named the model's identity and files
        _rewrite_parameters(out_dir / name, lambda p: {k: v for k, v in p.items() if k not in older_keys})
    older = _batch(manifest, out_dir, tiny_model_dir, "--quiet")
    assert older.exit_code == 1
    notes = [line for line in older.stderr.splitlines() if "older ddsedit" in line]
    assert notes == [
        "2 outputs were written by an older ddsedit without model/file identity; "
        "treating them as different (use --overwrite to redo them)"
    ]
    assert [r["status"] for r in _last_run(out_dir)] == ["failed", "failed", "skipped"]
    redone = _batch(manifest, out_dir, tiny_model_dir, "--quiet", "--overwrite")
    assert redone.exit_code == 0, redone.stderr
    assert "older ddsedit" not in redone.stderr
    assert "source_sha256" in read_metadata(out_dir / "edit0.png")


def test_expected_prediction_type_is_read_without_loading_weights(tmp_path: Path, tiny_v_model_dir) -> None:
    import torch
    from safetensors.torch import save_file

    def checkpoint(name: str, family: str) -> Path:
        """Just the tensors that tell SD 1.x from 2.x (as in test_checkpoints): no weights to load."""
        width = 768 if family == "sd15" else 1024
        text = "cond_stage_model.transformer.text_model.x" if family == "sd15" else "cond_stage_model.model.x"
        tensors = {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 1, 1),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(2, width),
            text: torch.zeros(1),
        }
        save_file(tensors, str(tmp_path / name))
        return tmp_path / name

    expected = batch.expected_prediction_type
    assert expected("folder", tiny_v_model_dir, None) == "v_prediction"
    assert expected("folder", tiny_v_model_dir, "epsilon") == "epsilon"  # the flag wins
    assert expected("file", checkpoint("v1-5.safetensors", "sd15"), None) == "epsilon"
    assert expected("file", checkpoint("v2-1_768-ema.safetensors", "sd2"), None) == "v_prediction"
    assert expected("file", checkpoint("v2-1_512-ema.safetensors", "sd2"), None) == "epsilon"
    (tmp_path / "model.ckpt").write_bytes(b"not loaded")
    assert expected("file", tmp_path / "model.ckpt", None) is None  # a pickle must be loaded to tell
    assert expected("file", tmp_path / "model.ckpt", "v_prediction") == "v_prediction"
    (tmp_path / "broken.safetensors").write_bytes(b"xx")
    assert expected("file", tmp_path / "broken.safetensors", None) is None  # loading reports it


# --------------------------------------------------------------------------- results files


def test_merging_rank_files_is_idempotent_and_skips_torn_lines(tmp_path: Path) -> None:
    def record(line: int, rank: int) -> dict:
        row = batch.RowRecord(line=line, src="s", out="o", status="done", seconds=1.0, error=None, seed=1,
                              run="r", rank=rank)  # fmt: skip
        return json.loads(row.to_json())

    first, second, third = record(1, 0), record(2, 1), record(3, 1)
    batch.append_records(tmp_path / "results.jsonl", [first])
    batch.append_records(tmp_path / "results.0.jsonl", [first])  # merged before, then killed before removal
    batch.append_records(tmp_path / "results.1.jsonl", [second, third])
    with open(tmp_path / "results.1.jsonl", "a") as handle:
        handle.write('{"line": 4, "sta')  # cut short by a kill
    assert batch.merge_rank_files(tmp_path) == 2
    assert batch.rank_files(tmp_path) == []
    assert [r["line"] for r in _records(tmp_path)] == [1, 2, 3]
    batch.append_records(tmp_path / "results.jsonl", [record(5, 0)])
    assert [r["line"] for r in _records(tmp_path)] == [1, 2, 3, 5]
    assert [r["line"] for r in batch.run_records(tmp_path, "r")] == [1, 2, 3, 5]


def test_processes_flag_relaunches_through_accelerate(tmp_path: Path, images: Path, tiny_model_dir, monkeypatch):
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", _rows(2))
    launched = {}

    class FakeProcess:
        def __init__(self, command, env):
            launched.update(command=command, env=env)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(batch.subprocess, "Popen", FakeProcess)
    result = _batch(manifest, tmp_path / "out", tiny_model_dir, "--processes", "2", "--device", "cpu", "--seed", "4")
    assert result.exit_code == 0, result.stderr
    command = launched["command"]
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2"
    arguments = command[command.index("ddsedit") + 1 :]
    assert arguments[:4] == ["batch", str(manifest), "--out-dir", str(tmp_path / "out")]
    assert "--processes" not in arguments and ["--seed", "4"] == arguments[arguments.index("--seed") :][:2]
    assert launched["env"][batch.RUN_ID_VARIABLE]


def test_processes_flag_exits_1_when_a_launched_run_recorded_an_invalid_row(
    tmp_path: Path, images: Path, tiny_model_dir, monkeypatch
) -> None:
    missing = {"src": "images/missing.png", "query": "q", "method": "sds"}
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", _rows(1) + [missing])
    out_dir = tmp_path / "out"

    class FakeProcess:
        """Records what the launched processes would: one row done, one invalid."""

        def __init__(self, command, env):
            out_dir.mkdir()
            run = env[batch.RUN_ID_VARIABLE]
            batch.append_records(out_dir / "results.jsonl", [
                {"line": 1, "status": "done", "run": run}, {"line": 2, "status": "invalid", "run": run},
            ])  # fmt: skip

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(batch.subprocess, "Popen", FakeProcess)
    result = _batch(manifest, out_dir, tiny_model_dir, "--processes", "2", "--device", "cpu", "--skip-invalid")
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
    shares = [batch._my_share(Process(index, 2), jobs, present, overwrite=False) for index in (0, 1)]
    assert sorted(shares[0] + shares[1]) == jobs  # every row once
    assert [len([job for job in share if not present[job]]) for share in shares] == [2, 2]  # the work, halved
    redo = [batch._my_share(Process(index, 2), jobs, present, overwrite=True) for index in (0, 1)]
    assert redo == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


# --------------------------------------------------------------------------- separate processes


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_killed_mid_batch_then_rerun_gives_every_output_exactly_once(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    rows = 5
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", _rows(rows))
    out_dir = tmp_path / "out"
    command = [sys.executable, "-m", "ddsedit", "batch", str(manifest), "--out-dir", str(out_dir),
               "--model", str(tiny_model_dir), "--steps", "12", "--quiet"]  # fmt: skip
    process = subprocess.Popen(command, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _records(out_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    recorded_before = len(_records(out_dir))
    assert 1 <= recorded_before < rows  # killed in the middle

    rerun = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    expected = {f"edit{i}.png" for i in range(rows)}
    assert {path.name for path in out_dir.iterdir()} == expected | {"results.jsonl"}  # no temp files left
    for name in expected:
        assert read_metadata(out_dir / name)["steps"] == "12"  # every output complete, with its metadata
    done = Counter(record["line"] for record in _records(out_dir) if record["status"] == "done")
    finished = {record["line"] for record in _records(out_dir) if record["status"] in ("done", "skipped")}
    assert finished == set(range(1, rows + 1)) and max(done.values()) == 1  # each row edited once


def test_two_cpu_processes_through_accelerate_launch_split_the_rows(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    rows = 5
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", _rows(rows))
    out_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "ddsedit", "batch", str(manifest), "--out-dir", str(out_dir), "--model", str(tiny_model_dir),
        "--steps", "2", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    result = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    records = _records(out_dir)
    assert batch.rank_files(out_dir) == []  # merged into results.jsonl by the main process
    by_rank = {rank: sorted(r["line"] for r in records if r["rank"] == rank) for rank in (0, 1)}
    assert by_rank == {0: [1, 2, 3], 1: [4, 5]}  # split_between_processes: no overlap, nothing left out
    assert all(record["status"] == "done" for record in records) and len({r["run"] for r in records}) == 1
    assert sorted(result.stdout.splitlines()) == sorted(str(out_dir / f"edit{i}.png") for i in range(rows))


def test_cuda_graph_on_a_cpu_is_one_clear_error_and_reaches_child_processes(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", _rows(1))
    result = _batch(manifest, tmp_path / "out", tiny_model_dir, "--device", "cpu", "--cuda-graph")
    assert result.exit_code == 2
    assert "--cuda-graph needs a CUDA device" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "edit0.png").exists()
    options = batch.BatchOptions(manifest=manifest, out_dir=tmp_path / "out", cuda_graph=True)
    assert "--cuda-graph" in options.child_arguments()
