"""Bad input the command line must refuse: one line on stderr, exit code 2, nothing written.

The flag cases pass ``--model /nonexistent/model-folder``: a command that checks its flags before it loads a model
names the flag, not the model. The help cases check what ``--help`` shows: whole summaries, option panels, and
no flag that a command cannot honour.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from batch_support import write_jsonl
from engine_support import main_in_fresh_process
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from ddsedit.cli import app
from ddsedit.loading import bundled_models

runner = CliRunner()
MISSING_MODEL = "/nonexistent/model-folder"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A 64x64 red circle on light grey."""
    image = Image.new("RGB", (64, 64), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=(220, 40, 40))
    path = tmp_path / "circle.png"
    image.save(path)
    return path


@pytest.fixture
def mask_file(tmp_path: Path) -> Path:
    """A 64x64 mask: white (editable) over the circle."""
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 56, 56), fill=255)
    path = tmp_path / "mask.png"
    mask.save(path)
    return path


def _edit_arguments(method: str, source: Path, output: Path, model: str | Path, *extra: str) -> list[str]:
    arguments = [method, "--src", str(source), "--query", "a blue circle", "--model", str(model), "-o", str(output)]
    if method != "sds":
        arguments += ["--ref", "a red circle"]
    return [*arguments, *extra]


def _one_line_refusal(arguments: list[str]) -> str:
    """Run ``main()`` with ``arguments`` in a fresh process; check exit 2, empty stdout and exactly one
    non-empty stderr line starting with ``error:``; return that line."""
    completed, printed = main_in_fresh_process(arguments)
    shown = f"stdout={completed.stdout!r} stderr={completed.stderr!r}"
    assert printed.splitlines()[-1:] and printed.splitlines()[-1].split()[0] == "2", shown
    assert len(printed.splitlines()) == 1, shown  # only the helper's "<exit code> <heavy imports>" line
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in completed.stderr, shown
    assert lines[0].startswith("error:"), shown
    return lines[0]


def _refused_before_the_model(arguments: list[str], flags: tuple[str, ...]) -> str:
    """The refusal names one of ``flags`` and not the (missing) model: it came before the model was loaded."""
    line = _one_line_refusal(arguments)
    assert any(flag in line for flag in flags), line
    assert MISSING_MODEL not in line and "model-folder" not in line, line
    return line


# 1. Finite values that can only overflow are out of range.
@pytest.mark.parametrize(
    ("method", "flag", "value"),
    [
        ("cds", "--cut-weight", "1e38"),
        ("cds", "--cut-temperature", "1e-30"),
        ("ids", "--identity-weight", "1e30"),
        ("dds", "--guidance", "1e30"),
        ("dds", "--lr", "1e30"),
    ],
)
def test_values_that_can_only_overflow_are_out_of_range(
    method: str, flag: str, value: str, source: Path, tmp_path: Path
) -> None:
    output = tmp_path / "o.png"
    line = _refused_before_the_model(_edit_arguments(method, source, output, MISSING_MODEL, flag, value), (flag,))
    assert "range" in line or re.search(r"\[.*\]", line), line
    assert not output.exists()


# 2. Options that cannot act are refused, not ignored.
@pytest.mark.parametrize(
    ("method", "extra", "flags"),
    [
        pytest.param("cds", ["--feather", "3"], ("--feather",), id="feather-without-mask"),
        pytest.param("cds", ["--no-paste-back"], ("paste-back",), id="no-paste-back-without-mask"),
        pytest.param("cds", ["--mask-grow", "3"], ("--mask-grow",), id="mask-grow-without-mask"),
        pytest.param("cds", ["--mask", "{mask}", "--mask-threshold", "2"], ("--mask-threshold",),
                     id="mask-threshold-with-a-mask-file"),
        pytest.param("cds", ["--dds-weight", "0", "--cut-weight", "0"], ("--dds-weight", "--cut-weight"),
                     id="both-weights-zero"),
    ],
)  # fmt: skip
def test_options_that_cannot_act_are_refused(
    method: str, extra: list[str], flags: tuple[str, ...], source: Path, mask_file: Path, tmp_path: Path
) -> None:
    output = tmp_path / "o.png"
    extra = [str(mask_file) if item == "{mask}" else item for item in extra]
    _refused_before_the_model(_edit_arguments(method, source, output, MISSING_MODEL, *extra), flags)
    assert not output.exists()


@pytest.mark.parametrize("method", ["cds", "ids"])
def test_cuda_graph_is_refused_for_methods_it_cannot_record(method: str, source: Path, tmp_path: Path) -> None:
    """Refused for the method itself, before the model loads, on any machine (with or without CUDA)."""
    output = tmp_path / "o.png"
    arguments = _edit_arguments(method, source, output, MISSING_MODEL, "--cuda-graph")
    line = _refused_before_the_model(arguments, ("--cuda-graph",))
    assert re.search(rf"\b{method}\b", line), line
    assert not output.exists()


# 3. --cuda-graph is offered only where it can act.
@pytest.mark.parametrize(("command", "listed"), [("cds", False), ("ids", False), ("sds", True), ("dds", True),
                                                 ("masked-dds", True)])  # fmt: skip
def test_cuda_graph_is_listed_only_for_methods_it_can_record(command: str, listed: bool) -> None:
    shown = runner.invoke(app, [command, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.stderr
    assert ("--cuda-graph" in shown.stdout) == listed, [line for line in shown.stdout.splitlines() if "cuda" in line]


# 4. A model's ddsedit.json with a value of the wrong type.
@pytest.fixture(scope="module")
def shapes_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled shapes model, copied once for this module."""
    folder = tmp_path_factory.mktemp("shapes-model") / "shapes"
    shutil.copytree(bundled_models()["shapes"], folder)
    return folder


def _linked_copy(original: Path, folder: Path) -> Path:
    """``original`` as ``folder`` through hard links (a copy where linking fails); ddsedit.json its own file."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(original, folder, copy_function=link)
    (folder / "ddsedit.json").unlink()  # never write through a link into the module's copy
    return folder


@pytest.mark.parametrize(
    ("method", "settings", "key", "extra"),
    [
        pytest.param("ids", {"methods": {"ids": {"identity_steps": 2.5}}}, "identity_steps", ["--steps", "1"],
                     id="ids-identity_steps-float"),
        pytest.param("cds", {"methods": {"cds": {"cut_weight": "10"}}}, "cut_weight", ["--steps", "1"],
                     id="cds-cut_weight-string"),
        pytest.param("dds", {"steps": True}, "steps", [], id="dds-flat-steps-bool"),  # --steps would override it
    ],
)  # fmt: skip
def test_a_wrong_type_in_the_models_ddsedit_json_is_one_line(
    method: str, settings: dict, key: str, extra: list[str], shapes_copy: Path, source: Path, tmp_path: Path
) -> None:
    model = _linked_copy(shapes_copy, tmp_path / "model")
    # The bundled file's other settings (its 64 px working size) stay, so that a run that goes ahead is short.
    stored = json.loads((shapes_copy / "ddsedit.json").read_text())
    (model / "ddsedit.json").write_text(json.dumps({**stored, **settings}))
    output = tmp_path / "o.png"
    line = _one_line_refusal(_edit_arguments(method, source, output, model, "--quiet", *extra))
    assert "ddsedit.json" in line and key in line, line
    assert not output.exists()


# 5. batch checks only the settings of the methods its rows use.
def test_batch_of_dds_rows_is_not_refused_for_the_pds_grid(source: Path, tmp_path: Path) -> None:
    """No point of the default PDS grid (every 20th step) lies in [901, 910): that only matters to pds rows."""
    manifest = write_jsonl(tmp_path / "manifest.jsonl", [
        {"src": source.name, "ref": "a red circle", "query": "a blue circle", "method": "dds", "out": "edit.png"},
    ])  # fmt: skip
    out_dir = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(manifest), "--out-dir", str(out_dir), "--model", "shapes",
                                 "--t-min", "901", "--t-max", "910", "--steps", "1", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert (out_dir / "edit.png").is_file()


# 6. The top-level help lists each command's whole summary.
def _top_level_help() -> str:
    shown = runner.invoke(app, ["--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.stderr
    return shown.stdout


def _command_lines(text: str) -> dict[str, str]:
    """Each command's line in the top-level help: {name: line}, box-drawing borders removed."""
    names = [name for name in (command.name for command in app.registered_commands) if name]
    found = {}
    for raw in text.splitlines():
        line = raw.strip(" │|")
        first = line.split(maxsplit=1)
        if first and first[0] in names and first[0] not in found:
            found[first[0]] = line
    return found


def test_top_level_help_summaries_are_not_cut_mid_parenthesis() -> None:
    lines = _command_lines(_top_level_help())
    assert {"cds", "pds", "ids", "dds"} <= set(lines), lines
    for name, line in lines.items():
        assert line.count("(") == line.count(")"), (name, line)


@pytest.mark.parametrize(("command", "text"), [("cds", "Nam et al. 2024)"), ("pds", "Koo et al. 2024)"),
                                               ("ids", "Kim et al. 2025)")])  # fmt: skip
def test_top_level_help_shows_the_text_after_et_al(command: str, text: str) -> None:
    line = _command_lines(_top_level_help()).get(command, "")
    assert text in line, line


# 7. Edit commands group their options in panels.
def _panel_titles(text: str) -> set[str]:
    """Lines that hold only a title, once borders (rich panels) or a trailing colon (plain sections) are gone."""
    return {line.strip(" ╭╮╰╯─│:") for line in text.splitlines()} - {""}


@pytest.mark.parametrize(
    ("command", "titles"),
    [
        ("dds", ("Input and output", "Edit", "Model and device")),
        ("cds", ("Input and output", "Edit", "Model and device", "Method", "Mask")),
    ],
)
def test_edit_help_groups_options_in_panels(command: str, titles: tuple[str, ...]) -> None:
    shown = runner.invoke(app, [command, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.stderr
    present = _panel_titles(shown.stdout)
    assert set(titles) <= present, f"missing panels: {sorted(set(titles) - present)}"
