"""Automatic masks from the command line: ``ddsedit mask``, ``--mask auto`` and ``--save-mask`` on an edit,
one-line errors before the model loads, and batch rows whose mask is ``auto`` (resume included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from batch_support import last_run, run_cli, write_csv
from engine_support import main_in_fresh_process
from PIL import Image
from typer.testing import CliRunner

from ddsedit.batch import BatchOptions, plan
from ddsedit.cli import app
from ddsedit.imageio import read_metadata
from ddsedit.manifest import load_manifest

runner = CliRunner()
PROMPTS = ["--ref", "a red circle", "--query", "a blue square"]
TINY = ["--mask-threshold", "1.1"]  # the random tiny model's map is nearly flat: DiffEdit's 1.5 may select nothing


def _assert_one_line_error(result, text: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert text in lines[0], lines[0]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_mask_command_and_an_edit_with_mask_auto_draw_the_same_mask(circle_files, tiny_model_dir, tmp_path) -> None:
    model = ["--model", str(tiny_model_dir)]
    drawn = runner.invoke(app, ["mask", "--src", str(circle_files["src"]), *PROMPTS, *model, *TINY, "--seed", "4",
                                "-o", str(tmp_path / "drawn.png")])  # fmt: skip
    assert drawn.exit_code == 0, drawn.stderr
    assert drawn.stdout == f"{tmp_path / 'drawn.png'}\n"
    with Image.open(tmp_path / "drawn.png") as mask:
        assert mask.size == (60, 40) and mask.mode == "L"  # the source's size
        assert set(np.unique(np.asarray(mask))) == {0, 255}
    recorded = read_metadata(tmp_path / "drawn.png")
    assert recorded["mask"] == "auto" and recorded["mask_seed"] == "4" and recorded["mask_threshold"] == "1.1"
    assert recorded["ref"] == "a red circle" and recorded["query"] == "a blue square"

    edited = tmp_path / "edited.png"
    result = runner.invoke(app, ["masked-dds", "--src", str(circle_files["src"]), *PROMPTS, *model, *TINY,
                                 "--mask", "auto", "--save-mask", str(tmp_path / "used.png"), "--seed", "4",
                                 "--steps", "2", "-o", str(edited), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{edited}\n" and result.stderr == ""  # stdout: only the edit's path
    assert np.array_equal(_pixels(tmp_path / "used.png"), _pixels(tmp_path / "drawn.png"))  # seed -> same mask
    metadata = read_metadata(edited)
    assert metadata["mask"] == "auto" and metadata["mask_seed"] == "4" and "Mask: auto" in metadata["parameters"]
    outside = _pixels(tmp_path / "used.png")[..., 0] == 0
    assert np.abs(_pixels(edited) - _pixels(circle_files["src"]))[outside].max() <= 1

    # Neither file is replaced without --overwrite; a hand mask can be saved too.
    again = runner.invoke(app, ["mask", "--src", str(circle_files["src"]), *PROMPTS, *model, *TINY,
                                "-o", str(tmp_path / "drawn.png")])  # fmt: skip
    _assert_one_line_error(again, "output exists")
    by_hand = runner.invoke(app, ["masked-dds", "--src", str(circle_files["src"]), *PROMPTS, *model, "--steps", "1",
                                  "--mask", str(circle_files["mask"]), "--save-mask", str(tmp_path / "used.png"),
                                  "-o", str(tmp_path / "other.png")])  # fmt: skip
    _assert_one_line_error(by_hand, "output exists: " + str(tmp_path / "used.png"))
    assert not (tmp_path / "other.png").exists()


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        (["--mask", "auto", "--mask-grow", "-1"], "--mask-grow must be in the range [0, 10000], got -1"),
        (["--mask", "auto", "--mask-noises", "0"], "--mask-noises must be in the range [1, 10000], got 0"),
        (["--mask", "auto", "--mask-strength", "0"], "--mask-strength must be in"),
        (["--mask", "auto", "--mask-threshold", "0"], "--mask-threshold must be in the range (0, 1000], got 0"),
        (["--mask", "MASK", "--mask-grow", "2"], "--mask-grow sets the automatic mask: it needs --mask auto"),
        (["--mask", "auto", "--query", "a red circle"], "say the same thing to the model: no mask can be drawn"),
        (["--mask", "auto", "--save-mask", "m.gif"], "--save-mask must end in .png"),
        (["--mask", "auto", "--save-mask", "OUT"], "--save-mask and -o name the same file"),
    ],
)
def test_bad_automatic_mask_flags_are_one_line_before_the_model_loads(extra, text, circle_files, tmp_path) -> None:
    output = tmp_path / "o.png"
    extra = [str(circle_files["mask"]) if e == "MASK" else str(output) if e == "OUT" else e for e in extra]
    # a model that does not exist: the flags must be refused before it would be looked for
    args = ["masked-dds", "--src", str(circle_files["src"]), *PROMPTS, "--model", str(tmp_path / "none"),
            "-o", str(output), *extra]  # fmt: skip
    _assert_one_line_error(runner.invoke(app, args), text)
    assert not output.exists()


def test_only_commands_with_a_mask_take_the_mask_flags() -> None:
    masked = runner.invoke(app, ["masked-dds", "--help"], terminal_width=200).stdout
    assert "--mask-grow" in masked and "--save-mask" in masked and "auto" in masked
    for command in ("dds", "sds"):
        shown = runner.invoke(app, [command, "--help"], terminal_width=200).stdout
        assert "--mask-grow" not in shown and "--save-mask" not in shown
    assert "--mask-noises" in runner.invoke(app, ["mask", "--help"], terminal_width=200).stdout


def test_mask_command_checks_cheaply_before_torch(tmp_path) -> None:
    """A missing source or equal prompts fail at once, without the heavy imports."""
    for arguments in (["--src", str(tmp_path / "none.png"), "--ref", "a", "--query", "b"],
                      ["--src", str(tmp_path / "none.png"), "--ref", "a cat", "--query", "a cat "]):  # fmt: skip
        completed, printed = main_in_fresh_process(["mask", *arguments])
        assert printed == "2 False", completed
        assert len(completed.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- batch


def test_batch_rows_with_mask_auto_run_and_resume_on_the_mask_settings(tmp_path, images, tiny_model_dir) -> None:
    manifest = write_csv(
        tmp_path / "manifest.csv", "src,ref,query,method,mask,out",
        "images/red.png,a red circle,a blue square,masked-dds,auto,red.png",
        "images/green.png,a green circle,a blue square,masked-dds,images/mask.png,green.png",
    )  # fmt: skip
    out_dir = tmp_path / "out"
    first = run_cli(manifest, out_dir, tiny_model_dir, *TINY, "--quiet")
    assert first.exit_code == 0, first.stderr
    recorded = read_metadata(out_dir / "red.png")
    assert recorded["mask"] == "auto" and recorded["mask_threshold"] == "1.1" and "mask_sha256" not in recorded
    assert recorded["mask_seed"] == recorded["seed"]  # the row's seed draws its mask
    assert "mask_sha256" in read_metadata(out_dir / "green.png")

    same = run_cli(manifest, out_dir, tiny_model_dir, *TINY, "--quiet")
    assert same.exit_code == 0, same.stderr
    assert [r["status"] for r in last_run(out_dir)] == ["skipped", "skipped"]
    other = run_cli(manifest, out_dir, tiny_model_dir, *TINY, "--mask-grow", "5", "--quiet")
    assert other.exit_code == 1
    assert [r["status"] for r in last_run(out_dir)] == ["failed", "skipped"]  # only the auto row's mask changed
    assert "output exists with other parameters" in last_run(out_dir)[0]["error"]


def test_an_auto_mask_row_is_not_a_file_and_is_checked_like_one(tmp_path, images) -> None:
    manifest = write_csv(
        tmp_path / "manifest.csv", "src,ref,query,method,mask",
        "images/red.png,a red circle,a blue square,masked-dds,auto",
        "images/green.png,a green circle,a green circle,masked-dds,auto",
        "images/blue.png,a blue circle,a red square,dds,auto",
    )  # fmt: skip
    loaded = load_manifest(manifest)
    assert [row.line for row in loaded.rows] == [2] and loaded.rows[0].auto_mask and loaded.rows[0].mask is None
    reasons = {error.line: error.reason for error in loaded.errors}
    assert "say the same thing" in reasons[3] and "mask is used by masked-dds" in reasons[4]
    from ddsedit.automask import AutoMaskSettings
    from ddsedit.editor import EditConfig

    defaults = {"masked-dds": EditConfig(seed=3)}
    (job,) = plan.plan_jobs(loaded.rows, defaults, tmp_path / "out", AutoMaskSettings(grow=1))
    assert job.auto_mask == AutoMaskSettings(grow=1, seed=3)
    assert set(job.file_hashes()) == {"source_sha256"}  # no file named "auto" is read
    expected = job.expected_parameters(plan.ExpectedModel("m", "epsilon"))
    assert expected["mask"] == "auto" and expected["mask_grow"] == 1 and expected["mask_seed"] == 3


def test_batch_passes_the_mask_flags_to_launched_processes_and_checks_them(tmp_path) -> None:
    options = BatchOptions(manifest=tmp_path / "m.csv", out_dir=tmp_path, mask_grow=3, mask_threshold=1.2)
    arguments = options.child_arguments()
    assert arguments[arguments.index("--mask-grow") + 1] == "3"
    assert arguments[arguments.index("--mask-threshold") + 1] == "1.2" and "--mask-noises" not in arguments
    assert options.mask_settings().grow == 3
    manifest = write_csv(tmp_path / "m.csv", "src,query", "x.png,a cat")
    refused = runner.invoke(app, ["batch", str(manifest), "--out-dir", str(tmp_path / "o"), "--mask-noises", "0"])
    _assert_one_line_error(refused, "--mask-noises must be in the range [1, 10000]")


@pytest.mark.parametrize("method", ["pds", "ids"])
def test_methods_with_an_optional_mask_take_mask_auto_too(method, circle_files, tiny_model_dir, tmp_path) -> None:
    output, used = tmp_path / "o.png", tmp_path / "drawn-mask.png"
    result = runner.invoke(app, [method, "--src", str(circle_files["src"]), *PROMPTS, "--model", str(tiny_model_dir),
                                 *TINY, "--mask", "auto", "--save-mask", str(used), "--seed", "2", "--steps", "2",
                                 "-o", str(output), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    metadata = read_metadata(output)
    assert metadata["method"] == method and metadata["mask"] == "auto" and metadata["mask_seed"] == "2"
    outside = _pixels(used)[..., 0] == 0
    assert outside.any() and np.abs(_pixels(output) - _pixels(circle_files["src"]))[outside].max() <= 1


def test_eval_shapes_knows_the_evals_runs_without_importing_it() -> None:
    from ddsedit.cli import eval_runs
    from ddsedit.shapes.evaluate import eval_runs as evaluate_runs

    assert eval_runs() == evaluate_runs()
