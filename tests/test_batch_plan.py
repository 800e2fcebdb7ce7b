"""Batch planning (ddsedit.batch.plan): what counts as the same edit when resuming, and grouping rows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from batch_support import circle, last_run, manifest_rows, rewrite_parameters, run_cli, write_jsonl
from PIL import Image, ImageDraw

from ddsedit.batch import plan
from ddsedit.imageio import read_metadata


def test_resume_knows_the_model_however_it_is_typed(tmp_path: Path, images: Path, tiny_model_dir, monkeypatch):
    manifest = write_jsonl(tmp_path / "manifest.jsonl", manifest_rows(2))
    out_dir = tmp_path / "out"
    (tmp_path / "link").symlink_to(tiny_model_dir, target_is_directory=True)
    monkeypatch.chdir(tiny_model_dir.parent)
    first = run_cli(manifest, out_dir, tiny_model_dir.name, "--quiet")
    assert first.exit_code == 0, first.stderr
    assert read_metadata(out_dir / "edit0.png")["model"] == str(tiny_model_dir.resolve())
    for spelling in (f"./{tiny_model_dir.name}", str(tiny_model_dir), str(tmp_path / "link")):
        again = run_cli(manifest, out_dir, spelling, "--quiet")
        assert again.exit_code == 0, (spelling, again.stderr)
        assert [r["status"] for r in last_run(out_dir)] == ["skipped", "skipped"], spelling


def test_resume_compares_the_prediction_type(tmp_path: Path, images: Path, tiny_model_dir) -> None:
    manifest = write_jsonl(tmp_path / "manifest.jsonl", manifest_rows(2))
    out_dir = tmp_path / "out"
    assert run_cli(manifest, out_dir, tiny_model_dir, "--quiet").exit_code == 0
    assert read_metadata(out_dir / "edit0.png")["prediction_type"] == "epsilon"  # the model's scheduler's
    same = run_cli(manifest, out_dir, tiny_model_dir, "--prediction-type", "epsilon", "--quiet")
    assert same.exit_code == 0, same.stderr
    assert [r["status"] for r in last_run(out_dir)] == ["skipped", "skipped"]
    other = run_cli(manifest, out_dir, tiny_model_dir, "--prediction-type", "v_prediction", "--quiet")
    assert other.exit_code == 1
    assert other.stderr.count("output exists with other parameters") == 2
    assert [r["status"] for r in last_run(out_dir)] == ["failed", "failed"]


def test_resume_notices_a_source_or_mask_changed_under_the_same_name(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    manifest = write_jsonl(tmp_path / "manifest.jsonl", [
        {"src": "images/red.png", "ref": "a red circle", "query": "a blue circle", "out": "red.png"},
        {"src": "images/green.png", "ref": "a green circle", "query": "a blue circle", "method": "masked-dds",
         "mask": "images/mask.png", "out": "green.png"},
    ])  # fmt: skip
    out_dir = tmp_path / "out"
    first = run_cli(manifest, out_dir, tiny_model_dir, "--quiet")
    assert first.exit_code == 0, first.stderr
    recorded = read_metadata(out_dir / "green.png")
    assert recorded["source_sha256"] == hashlib.sha256((images / "green.png").read_bytes()).hexdigest()
    assert recorded["mask_sha256"] == hashlib.sha256((images / "mask.png").read_bytes()).hexdigest()

    circle(images / "red.png", "yellow")  # same name, same size, other pixels
    source_changed = run_cli(manifest, out_dir, tiny_model_dir, "--quiet")
    assert source_changed.exit_code == 1
    assert [r["status"] for r in last_run(out_dir)] == ["failed", "skipped"]
    assert "output exists with other parameters" in last_run(out_dir)[0]["error"]

    mask = Image.new("L", (60, 40), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 30, 39), fill=255)
    mask.save(images / "mask.png")
    mask_changed = run_cli(manifest, out_dir, tiny_model_dir, "--quiet")
    assert mask_changed.exit_code == 1
    assert [r["status"] for r in last_run(out_dir)] == ["failed", "failed"]


def test_outputs_of_an_older_ddsedit_are_redone_only_with_overwrite(
    tmp_path: Path, images: Path, tiny_model_dir
) -> None:
    manifest = write_jsonl(tmp_path / "manifest.jsonl", manifest_rows(3))
    out_dir = tmp_path / "out"
    assert run_cli(manifest, out_dir, tiny_model_dir, "--quiet").exit_code == 0
    older_keys = ("prediction_type", "source_sha256", "mask_sha256")
    for name in ("edit0.png", "edit1.png"):  # recorded before outputs named the model's identity and files
        rewrite_parameters(out_dir / name, lambda p: {k: v for k, v in p.items() if k not in older_keys})
    older = run_cli(manifest, out_dir, tiny_model_dir, "--quiet")
    assert older.exit_code == 1
    notes = [line for line in older.stderr.splitlines() if "older ddsedit" in line]
    assert notes == [
        "2 outputs were written by an older ddsedit without model/file identity; "
        "treating them as different (use --overwrite to redo them)"
    ]
    assert [r["status"] for r in last_run(out_dir)] == ["failed", "failed", "skipped"]
    redone = run_cli(manifest, out_dir, tiny_model_dir, "--quiet", "--overwrite")
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

    expected = plan.expected_prediction_type
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


def test_batch_size_shares_unet_calls_between_same_size_rows(
    tmp_path: Path, images: Path, tiny_model_dir, monkeypatch
) -> None:
    from ddsedit.editor import Editor

    circle(images / "wide.png", "red", size=(90, 30))
    rows = manifest_rows(3) + [{"src": "images/wide.png", "ref": "a red circle", "query": "a blue circle"}]
    rows.append({"src": "images/red.png", "query": "a blue circle", "method": "sds"})
    manifest = write_jsonl(tmp_path / "manifest.jsonl", rows)
    calls: list[tuple[str, int]] = []
    edit_batch = Editor.edit_batch

    def counting(self, requests, method, config=None, on_progress=None):
        calls.append((method, len(requests)))
        return edit_batch(self, requests, method, config=config, on_progress=on_progress)

    monkeypatch.setattr(Editor, "edit_batch", counting)
    grouped = run_cli(manifest, tmp_path / "grouped", tiny_model_dir, "--batch-size", "2", "--quiet")
    assert grouped.exit_code == 0, grouped.stderr
    assert calls == [("dds", 2), ("dds", 1), ("dds", 1), ("sds", 1)]  # 3 same-size DDS rows: 2 + 1
    single = run_cli(manifest, tmp_path / "single", tiny_model_dir, "--quiet")
    assert single.exit_code == 0, single.stderr
    for name in ("edit0.png", "edit1.png", "edit2.png", "wide.dds.png", "red.sds.png"):
        with Image.open(tmp_path / "grouped" / name) as a, Image.open(tmp_path / "single" / name) as b:
            difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert difference.max() <= 2, name  # same seeds, same edit, up to float rounding
