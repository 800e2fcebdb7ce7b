"""The cds, pds and ids commands end to end: outputs, recorded settings, bad flags, --mask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ddsedit.cli import app
from ddsedit.imageio import read_metadata

runner = CliRunner()

CUT_FIELDS = ("dds_weight", "cut_weight", "cut_patches", "cut_patch_sizes", "cut_temperature")
IDENTITY_FIELDS = ("identity_steps", "identity_weight")
ALL_METHOD_FIELDS = {*CUT_FIELDS, "pds_grid", *IDENTITY_FIELDS}


def _edit(method: str, files: dict[str, Path], model: Path, *extra: str) -> Any:
    args = [method, "--src", str(files["src"]), "--ref", "a red circle", "--query", "a blue circle",
            "--model", str(model), "--steps", "2"]  # fmt: skip
    return runner.invoke(app, [*args, *extra])


def _assert_one_line_error(result: Any, exit_code: int, text: str) -> None:
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert text in lines[0], lines[0]


@pytest.mark.parametrize(
    ("method", "flags", "recorded"),
    [
        ("cds", [], {"dds_weight": 1.0, "cut_weight": 3.0, "cut_patches": 256, "cut_patch_sizes": [1, 2],
                     "cut_temperature": 0.07}),
        ("cds", ["--cut-weight", "2", "--cut-patches", "64", "--cut-patch-sizes", "2", "--dds-weight", "0.5",
                 "--cut-temperature", "0.1"],
         {"dds_weight": 0.5, "cut_weight": 2.0, "cut_patches": 64, "cut_patch_sizes": [2], "cut_temperature": 0.1}),
        ("pds", ["--pds-grid", "100"], {"pds_grid": 100, "t_min": 1, "t_max": 999}),
        # Without the CUT term (IDS's default) its patch settings cannot act: they are not recorded.
        ("ids", ["--identity-steps", "2", "--identity-weight", "0.5"],
         {"identity_steps": 2, "identity_weight": 0.5, "cut_weight": 0.0, "dds_weight": 1.0}),
    ],
)  # fmt: skip
def test_each_method_writes_its_settings(
    method: str, flags: list[str], recorded: dict[str, Any], circle_files: dict[str, Path], tiny_model_dir: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The output records the method and its own settings (and none of the other methods')."""
    monkeypatch.chdir(tmp_path)
    result = _edit(method, circle_files, tiny_model_dir, "--seed", "5", "--quiet", *flags)
    assert result.exit_code == 0, result.stderr
    expected = tmp_path / f"circle.{method}.png"
    assert result.stdout == f"{expected}\n" and result.stderr == ""
    with Image.open(expected) as written:
        assert written.size == (60, 40)
    metadata = read_metadata(expected)
    parameters = json.loads(metadata["ddsedit"])
    assert parameters["method"] == method and parameters["seed"] == 5 and parameters["ref"] == "a red circle"
    assert {key: parameters[key] for key in recorded} == recorded
    assert not (ALL_METHOD_FIELDS - set(recorded)) & set(parameters)
    assert "mask_sha256" not in parameters and "paste_back" not in parameters  # no mask given
    assert f"Method: {method}" in metadata["parameters"]


@pytest.mark.parametrize(
    ("method", "flags", "text"),
    [
        ("cds", ["--cut-patch-sizes", "1,x"], "--cut-patch-sizes must be comma-separated integers, got '1,x'"),
        ("cds", ["--cut-patch-sizes", "1,0"], "--cut-patch-sizes must be in the range [1, 1024], got 0"),
        ("cds", ["--cut-patches", "0"], "--cut-patches must be in the range [1, 1000000], got 0"),
        ("cds", ["--cut-weight", "-1"], "--cut-weight must be in the range [0, 10000], got -1"),
        ("cds", ["--cut-temperature", "0"], "--cut-temperature must be in the range [0.001, 1000], got 0"),
        ("cds", ["--dds-weight", "nan"], "--dds-weight must be in the range [0, 10000], got nan"),
        ("ids", ["--identity-steps", "-1"], "--identity-steps must be in the range [0, 100], got -1"),
        ("ids", ["--identity-weight", "-0.5"], "--identity-weight must be in the range [0, 1000], got -0.5"),
        ("ids", ["--cut-patch-sizes", "a"], "--cut-patch-sizes must be comma-separated integers"),
        ("pds", ["--pds-grid", "1"], "--pds-grid must be in the range [50, 1000], got 1"),
        ("pds", ["--pds-grid", "1001"], "--pds-grid must be in the range [50, 1000], got 1001"),
    ],
)
def test_bad_method_flags_give_one_line(
    method: str, flags: list[str], text: str, circle_files: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "o.png"
    result = _edit(method, circle_files, tiny_model_dir, "-o", str(output), *flags)
    _assert_one_line_error(result, 2, text)
    assert not output.exists()


def test_a_pds_grid_without_a_point_in_the_timestep_range_is_a_one_line_input_error(
    circle_files: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # --pds-grid 2: spacing 500, the only grid point is 500, outside [600, 950).
    result = _edit("pds", circle_files, tiny_model_dir, "-o", str(tmp_path / "o.png"), "-q", "--pds-grid", "2",
                   "--t-min", "600")  # fmt: skip
    _assert_one_line_error(result, 2, "--pds-grid")


def test_patch_sizes_larger_than_every_feature_map_are_refused_or_contribute_nothing(
    circle_files: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The 60x40 source works at 32x22 px, a 16x11 latent: no 32x32 patch fits any decoder map. Either answer
    is sound (an input error naming the flag, or a CUT term of 0); a traceback's first line is not."""
    output = tmp_path / "o.png"
    result = _edit("cds", circle_files, tiny_model_dir, "-o", str(output), "-q", "--cut-patch-sizes", "32")
    _assert_one_line_error(result, 2, "--cut-patch-sizes 32: no size fits")
    assert not output.exists()


def _run_main(*arguments: str) -> subprocess.CompletedProcess:
    """``python -m ddsedit ARGS`` in a subprocess: through main(), which makes usage errors one line."""
    return subprocess.run(
        [sys.executable, "-m", "ddsedit", *arguments], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "60"},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("method", "flag"),
    [("pds", "--cut-weight"), ("pds", "--identity-steps"), ("cds", "--pds-grid"), ("cds", "--identity-weight"),
     ("ids", "--pds-grid"), ("dds", "--cut-weight")],
)  # fmt: skip
def test_another_methods_flag_is_an_unknown_option(method: str, flag: str, circle_files: dict[str, Path]) -> None:
    completed = _run_main(method, "--src", str(circle_files["src"]), "--ref", "a", "--query", "b", flag, "1")
    assert completed.returncode == 2 and completed.stdout == ""
    (line,) = completed.stderr.strip().splitlines()  # click may add "(Possible options: ...)" in between
    assert line.startswith(f"error: No such option: {flag} ") and line.endswith(f"(see 'ddsedit {method} --help')")


@pytest.mark.parametrize("method", ["cds", "pds"])
def test_mask_keeps_the_source_outside(
    method: str, circle_files: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With --mask, every pixel outside the mask is the source's and some inside changed; the mask is recorded."""
    output = tmp_path / "o.png"
    result = _edit(method, circle_files, tiny_model_dir, "--mask", str(circle_files["mask"]), "-o", str(output),
                   "-q", "--seed", "3", "--lr", "1", "--steps", "3")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    with Image.open(circle_files["src"]) as source, Image.open(circle_files["mask"]) as mask, Image.open(output) as out:
        source_pixels = np.asarray(source.convert("RGB"), dtype=np.int16)
        edited = np.asarray(out.convert("RGB"), dtype=np.int16)
        outside = np.asarray(mask.convert("L")) < 128
    assert outside.any() and (~outside).any()
    assert np.array_equal(edited[outside], source_pixels[outside])
    assert np.abs(edited[~outside] - source_pixels[~outside]).max() > 1
    parameters = json.loads(read_metadata(output)["ddsedit"])
    assert parameters["method"] == method and parameters["paste_back"] is True and "mask_sha256" in parameters


def test_help_shows_each_methods_own_defaults() -> None:
    """pds draws t from 1 to 998 by its declaration: its --help says so, and batch's help names the exception."""
    pds = runner.invoke(app, ["pds", "--help"], terminal_width=200, env={"COLUMNS": "200"}).stdout
    line = next(text for text in pds.splitlines() if "--t-min" in text)
    assert "[default: 1]" in line, line
    batch = runner.invoke(app, ["batch", "--help"], terminal_width=200, env={"COLUMNS": "200"}).stdout
    line = next(text for text in batch.splitlines() if "--t-min" in text)
    assert "[default: 50; pds 1]" in line, line
