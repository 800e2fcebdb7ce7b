"""The command line: output on stdout, one-line errors on stderr, exit codes, no stray files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from engine_support import main_in_fresh_process
from PIL import Image
from typer.testing import CliRunner

from ddsedit import __version__
from ddsedit.cli import app
from ddsedit.imageio import read_metadata

runner = CliRunner()


def _edit(method: str, files: dict[str, Path], model: Path, *extra: str, ref: str = "a red circle"):
    args = [
        method,
        "--src",
        str(files["src"]),
        "--query",
        "a blue circle",
        "--model",
        str(model),
        "--steps",
        "3",
    ]
    if method != "sds":
        args += ["--ref", ref]
    if method == "masked-dds":
        args += ["--mask", str(files["mask"])]
    return runner.invoke(app, [*args, *extra])


def _assert_one_line_error(result, exit_code: int, text: str) -> None:
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert text in lines[0], lines[0]


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"ddsedit {__version__}"
    for command in ([], ["sds"], ["dds"], ["masked-dds"]):
        shown = runner.invoke(app, [*command, "-h"])
        assert shown.exit_code == 0 and "Usage" in shown.stdout
    assert "--iterations" in runner.invoke(app, ["dds", "--help"]).stdout
    assert runner.invoke(app, []).exit_code == 2  # no_args_is_help


@pytest.mark.parametrize("method", ["sds", "dds", "masked-dds"])
def test_each_method_writes_a_png_with_metadata(
    method, circle_files, tiny_model_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _edit(method, circle_files, tiny_model_dir, "--seed", "5", "--quiet")
    assert result.exit_code == 0, result.stderr
    expected = tmp_path / f"circle.{method}.png"
    assert result.stdout == f"{expected}\n"  # stdout holds only the path
    assert result.stderr == ""  # --quiet
    with Image.open(expected) as written:
        assert written.size == (60, 40)
    metadata = read_metadata(expected)
    assert metadata["method"] == method and metadata["seed"] == "5" and metadata["steps"] == "3"
    assert metadata["query"] == "a blue circle" and metadata["ddsedit_version"] == __version__
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_overwrite_protection_and_flag(circle_files, tiny_model_dir, tmp_path) -> None:
    output = tmp_path / "edited.png"
    output.write_bytes(b"precious")
    refused = _edit("dds", circle_files, tiny_model_dir, "-o", str(output), "-q")
    _assert_one_line_error(refused, 2, "output exists")
    assert output.read_bytes() == b"precious"
    replaced = _edit("dds", circle_files, tiny_model_dir, "-o", str(output), "-q", "--overwrite")
    assert replaced.exit_code == 0 and output.read_bytes() != b"precious"


def test_progress_goes_to_stderr(circle_files, tiny_model_dir, tmp_path) -> None:
    result = _edit("dds", circle_files, tiny_model_dir, "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 0
    assert result.stdout.strip() == str(tmp_path / "o.png")
    assert "3/3" in result.stderr


def test_frames_and_animation(circle_files, tiny_model_dir, tmp_path) -> None:
    frames = tmp_path / "frames"
    animation = tmp_path / "run.gif"
    result = _edit(
        "dds", circle_files, tiny_model_dir, "-o", str(tmp_path / "o.png"), "-q",
        "--save-every", "1", "--frames", str(frames), "--animation", str(animation),
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in frames.iterdir()) == [f"circle.dds.{step:04d}.png" for step in range(4)]
    with Image.open(animation) as gif:
        assert gif.is_animated


def test_ref_equal_to_query_warns_but_runs(circle_files, tiny_model_dir, tmp_path) -> None:
    result = _edit("dds", circle_files, tiny_model_dir, "-o", str(tmp_path / "o.png"), ref="a blue circle")
    assert result.exit_code == 0
    assert "same" in result.stderr


@pytest.mark.parametrize(
    ("extra", "code", "text"),
    [
        (["--steps", "0"], 2, "--steps"),
        (["--guidance", "-1"], 2, "--guidance"),
        (["--lr", "0"], 2, "--lr"),
        (["--t-min", "0"], 2, "--t-min"),
        (["--t-max", "1000"], 2, "--t-max"),
        (["--t-min", "600", "--t-max", "400"], 2, "--t-min"),
        (["--model", "no-such-model"], 2, "unknown model"),
        (["--model", "notes.txt"], 2, "unknown model"),
        (["--device", "cuda"], 2, "CUDA"),
        (["--dtype", "fp8"], 2, "unknown dtype"),
        (["-o", "/no/such/folder/out.png"], 2, "output folder does not exist"),
    ],
)
def test_bad_options_give_one_line(extra, code, text, circle_files, tiny_model_dir, tmp_path) -> None:
    if "--device" in extra:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    result = _edit(
        "dds",
        circle_files,
        tiny_model_dir,
        *(extra if "-o" in extra else [*extra, "-o", str(tmp_path / "o.png")]),
    )
    _assert_one_line_error(result, code, text)
    assert not (tmp_path / "o.png").exists()


def test_bad_files_give_one_line(circle_files, tiny_model_dir, tmp_path) -> None:
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(circle_files["src"].read_bytes()[:200])
    black = tmp_path / "black.png"
    Image.new("L", (60, 40), 0).save(black)
    white = tmp_path / "white.png"
    Image.new("L", (60, 40), 255).save(white)
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    cases = [
        ({"src": tmp_path / "missing.png"}, "dds", [], 2, "not found"),
        ({"src": not_image}, "dds", [], 2, "not an image"),
        ({"src": truncated}, "dds", [], 2, "truncated"),
        ({"mask": tmp_path / "missing-mask.png"}, "masked-dds", [], 2, "mask not found"),
        ({"mask": black}, "masked-dds", [], 2, "all black"),
        ({"mask": white}, "masked-dds", [], 2, "all white"),
    ]
    for replacement, method, extra, code, text in cases:
        files = {**circle_files, **replacement}
        result = _edit(method, files, tiny_model_dir, "-o", str(tmp_path / "o.png"), *extra)
        _assert_one_line_error(result, code, text)
    # One rule for "the model you named is unusable": exit 2, whatever the reason.
    _assert_one_line_error(
        _edit("dds", circle_files, not_model, "-o", str(tmp_path / "o.png")),
        2,
        "not a diffusers model folder",
    )
    _assert_one_line_error(_edit("dds", circle_files, not_image, "-o", str(tmp_path / "o.png")), 2, "not a model")
    assert not (tmp_path / "o.png").exists()


def test_empty_prompts_give_one_line(circle_files, tiny_model_dir, tmp_path) -> None:
    _assert_one_line_error(_edit("dds", circle_files, tiny_model_dir, ref="  "), 2, "--ref")
    result = runner.invoke(
        app, ["sds", "--src", str(circle_files["src"]), "--query", "", "--model", str(tiny_model_dir)]
    )
    _assert_one_line_error(result, 2, "--query")
    missing = runner.invoke(app, ["dds", "--src", str(circle_files["src"]), "--ref", "x"])
    assert missing.exit_code == 2 and "--query" in missing.stderr


def test_models_lists_the_default(monkeypatch) -> None:
    monkeypatch.setenv("DDSEDIT_MODEL", "/my/model")
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "/my/model" in result.stderr


def test_help_does_not_import_torch() -> None:
    """--help must answer at once: the CLI module may not pull in torch, diffusers or transformers."""
    code = "import sys, ddsedit.cli; print(any(m in sys.modules for m in ('torch', 'diffusers', 'transformers')))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"


def _own_console_script() -> Path:
    """The ``ddsedit`` script installed beside the interpreter running the tests (not whatever PATH finds)."""
    return Path(sysconfig.get_path("scripts")) / ("ddsedit.exe" if os.name == "nt" else "ddsedit")


def test_installed_console_script_runs_an_edit(circle_files, tiny_model_dir, tmp_path) -> None:
    executable = _own_console_script()
    assert executable.is_file(), f"ddsedit is not installed for {sys.executable}: pip install -e ."
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [str(executable), "dds", "--src", str(circle_files["src"]), "--ref", "a red circle", "--query", "a blue circle",
         "--model", str(tiny_model_dir), "--steps", "2", "--seed", "1", "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == f"{tmp_path / 'circle.dds.png'}\n"
    assert completed.stderr == ""
    assert (tmp_path / "circle.dds.png").is_file()


def test_cpu_offload_flag_runs(circle_files, tiny_model_dir, tmp_path) -> None:
    result = _edit("dds", circle_files, tiny_model_dir, "-o", str(tmp_path / "o.png"), "-q", "--cpu-offload")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "o.png").is_file()


def test_start_continues_from_an_earlier_result(circle_files, tiny_model_dir, tmp_path) -> None:
    """``--start`` begins at another image (here the first run's output); the result records it."""
    first = tmp_path / "first.png"
    assert _edit("dds", circle_files, tiny_model_dir, "--seed", "3", "-o", str(first), "-q").exit_code == 0
    second = tmp_path / "second.png"
    result = _edit("dds", circle_files, tiny_model_dir, "--seed", "3", "--start", str(first), "-o", str(second), "-q")
    assert result.exit_code == 0, result.stderr
    assert read_metadata(second)["start"] == str(first)
    assert "start" not in read_metadata(first)
    with Image.open(first) as before, Image.open(second) as after:
        assert before.size == after.size and before.tobytes() != after.tobytes()


def test_start_of_another_size_is_a_one_line_error(circle_files, tiny_model_dir, tmp_path) -> None:
    small = tmp_path / "small.png"
    Image.new("RGB", (30, 20), (0, 0, 255)).save(small)
    output = tmp_path / "out.png"
    result = _edit("dds", circle_files, tiny_model_dir, "--start", str(small), "-o", str(output))
    _assert_one_line_error(result, 2, "(--start) is 30x20 but the source (--src) is 60x40")
    assert not output.exists()
    missing = _edit("sds", circle_files, tiny_model_dir, "--start", str(tmp_path / "none.png"), "-o", str(output))
    _assert_one_line_error(missing, 2, "none.png")


def test_eval_shapes_runs_a_subset_of_methods(tiny_model_dir, tmp_path) -> None:
    import json

    out_dir = tmp_path / "eval"
    args = ["eval-shapes", "--model", str(tiny_model_dir), "--cases", "2", "--swaps", "0", "--steps", "2"]
    result = runner.invoke(app, [*args, "--methods", "dds", "--no-hold", "--out-dir", str(out_dir)])
    assert result.exit_code == 0, result.stderr
    report = json.loads((out_dir / "report.json").read_text())
    assert set(report["methods"]) == {"dds"} and set(report["case_scores"]) == {"dds"} and not report["held"]
    assert "| dds |" in result.stdout and "| sds |" not in result.stdout
    assert Image.open(out_dir / "grid.png").size == (3 * 128, 20 + 2 * 128)  # labels; source, target, dds
    assert "eval-shapes: 2/2 edits (dds)" in result.stderr  # progress without a terminal
    # An earlier report is not replaced silently.
    again = runner.invoke(app, [*args, "--methods", "dds", "--no-hold", "--out-dir", str(out_dir)])
    _assert_one_line_error(again, 2, "report.json exists: pass --overwrite")
    replaced = runner.invoke(app, [*args, "--methods", "dds", "--no-hold", "--out-dir", str(out_dir), "--overwrite"])
    assert replaced.exit_code == 0, replaced.stderr
    refused = runner.invoke(app, [*args, "--methods", "dds,ddim", "--out-dir", str(tmp_path / "no")])
    _assert_one_line_error(refused, 2, "--methods must be some of sds, dds, masked-dds, flowedit, cds, pds, ids")
    assert not (tmp_path / "no").exists()


def _run_main(*arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m ddsedit ARGS`` in a subprocess: through main(), as the console script runs."""
    return subprocess.run(
        [sys.executable, "-m", "ddsedit", *arguments], capture_output=True, text=True, cwd=cwd, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "60"},
    )  # fmt: skip


def test_usage_errors_are_one_line_and_required_options_say_so(circle_files) -> None:
    missing_ref = _run_main("dds", "--src", str(circle_files["src"]), "--query", "a blue circle")
    assert missing_ref.returncode == 2 and missing_ref.stdout == ""
    assert missing_ref.stderr.strip().splitlines() == ["error: Missing option '--ref'. (see 'ddsedit dds --help')"]
    unknown = _run_main("dds", "--srcc", "x")
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    for command, options in (("dds", ["--ref"]), ("masked-dds", ["--ref", "--mask"])):
        shown = runner.invoke(app, [command, "--help"], terminal_width=200).stdout
        assert "[required]" in shown
        for option in options:  # rich marks a required option with a star before it
            line = next(text for text in shown.splitlines() if text.lstrip("│ *").startswith(option + " "))
            assert line.lstrip("│ ").startswith("* "), line


def test_cheap_checks_come_before_torch_is_imported(circle_files, tmp_path) -> None:
    """A missing source must fail at once, not after the 7-30 s of heavy imports."""
    arguments = ["dds", "--src", str(tmp_path / "missing.png"), "--ref", "a", "--query", "b"]
    completed, printed = main_in_fresh_process(arguments)
    assert printed == "2 False", completed
    assert "source image not found" in completed.stderr


def test_long_messages_are_not_wrapped_without_a_terminal(tmp_path) -> None:
    long_name = tmp_path / ("a-very-long-folder-name-" * 4) / "missing.png"
    completed = _run_main("dds", "--src", str(long_name), "--ref", "a", "--query", "b")
    assert completed.stderr.strip() == f"error: source image not found: {long_name}"


@pytest.mark.parametrize(("name", "image_format"), [("o.jpg", "JPEG"), ("o.jpeg", "JPEG"), ("o.webp", "WEBP")])
def test_output_format_follows_the_extension(name, image_format, circle_files, tiny_model_dir, tmp_path) -> None:
    output = tmp_path / name
    result = _edit("dds", circle_files, tiny_model_dir, "-o", str(output), "-q", "--seed", "2")
    assert result.exit_code == 0, result.stderr
    with Image.open(output) as written:
        assert written.format == image_format
    assert read_metadata(output)["parameters"].startswith("a blue circle\nSteps: 3, ")


def test_output_names_a_folder_or_a_known_format(circle_files, tiny_model_dir, tmp_path) -> None:
    folder = tmp_path / "outputs"
    folder.mkdir()
    result = _edit("dds", circle_files, tiny_model_dir, "-o", str(folder), "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(folder / "circle.dds.png") and (folder / "circle.dds.png").is_file()
    for name in ("o.gif", "o"):
        refused = _edit("dds", circle_files, tiny_model_dir, "-o", str(tmp_path / name))
        _assert_one_line_error(refused, 2, "must end in .png, .jpg, .jpeg or .webp")
        assert not (tmp_path / name).exists()


def test_frames_are_not_overwritten_without_the_flag(circle_files, tiny_model_dir, tmp_path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "circle.dds.0000.png").write_bytes(b"precious")
    args = ["-q", "--save-every", "1", "--frames", str(frames)]
    refused = _edit("dds", circle_files, tiny_model_dir, "-o", str(tmp_path / "o.png"), *args)
    _assert_one_line_error(refused, 2, "frames exist")
    assert (frames / "circle.dds.0000.png").read_bytes() == b"precious" and not (tmp_path / "o.png").exists()
    replaced = _edit("dds", circle_files, tiny_model_dir, "-o", str(tmp_path / "o.png"), *args, "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert (frames / "circle.dds.0000.png").read_bytes() != b"precious"


def test_save_every_default_follows_the_models_steps(circle_files, tiny_model_dir, tmp_path) -> None:
    """Without --steps the model's own default steps (here 50) decide the frame spacing: 50 // 25 = 2."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "ddsedit.json").write_text(json.dumps({"size": 32, "steps": 50}))
    frames = tmp_path / "frames"
    result = runner.invoke(app, [
        "sds", "--src", str(circle_files["src"]), "--query", "a blue circle", "--model", str(model),
        "--frames", str(frames), "-o", str(tmp_path / "o.png"), "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    steps = sorted(int(p.name.split(".")[-2]) for p in frames.iterdir())
    assert steps == list(range(0, 51, 2))


def test_nonfinite_steps_are_reported_once(circle_files, tiny_model_dir, tmp_path, monkeypatch) -> None:
    import torch

    from ddsedit import scores

    monkeypatch.setattr(scores, "dds_gradient", lambda target, source: torch.full_like(target, float("inf")))
    result = _edit("dds", circle_files, tiny_model_dir, "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "NaN or infinite" in line]
    assert warnings == ["warning: the model returned NaN or infinite values in 3 of 3 steps; those gradient "
                        "elements were treated as 0"]  # fmt: skip
