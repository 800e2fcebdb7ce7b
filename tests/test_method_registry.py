"""A method is one declaration: a toy method registered here, in the test alone, gets its command and flags, its
batch column and flag, its eval-shapes run and flag, its checks, its recorded metadata and batch resume."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ddsedit.methods import Method, get_method, method_names, registered
from ddsedit.settings import METHOD_PANEL, setting

REF, QUERY = "a red circle on a white background", "a blue circle on a white background"


@dataclass(frozen=True)
class ToyOptions:
    toy_weight: float = setting(0.5, "How hard the toy pulls.", panel=METHOD_PANEL, minimum=0, maximum=10)


def toy_gradient(inputs, latents, draws):
    """DDS's gradient scaled by the toy weight."""
    from ddsedit import gradients

    return inputs.options.toy_weight * gradients.dds(inputs, latents, draws)


TOY = Method("toy", "Toy edit: DDS scaled by --toy-weight.", gradient=toy_gradient, options=ToyOptions)


@pytest.fixture
def toy_app() -> Iterator[object]:
    from ddsedit.cli import build_app

    with registered(TOY):
        yield build_app()
    assert "toy" not in method_names()


@pytest.fixture
def source() -> Path:
    return Path(__file__).parents[1] / "examples" / "red-circle-on-white.png"


def _run(app, *args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def _recorded(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.info["ddsedit"])


def test_the_toy_command_and_its_flag_are_in_help(toy_app) -> None:
    listing = _run(toy_app, "--help").output
    assert "toy" in listing and "Toy edit: DDS scaled by --toy-weight." in listing
    own = _run(toy_app, "toy", "--help").output
    assert "--toy-weight" in own and "How hard the toy pulls." in own and "--cuda-graph" not in own
    assert "--toy-weight" in _run(toy_app, "batch", "--help").output
    assert "--toy-weight" in _run(toy_app, "eval-shapes", "--help").output
    assert "--toy-weight" not in _run(toy_app, "dds", "--help").output


def test_the_toy_edits_records_its_option_and_refuses_a_bad_value(toy_app, source: Path, tmp_path: Path) -> None:
    output = tmp_path / "toy.png"
    args = ("toy", "--src", str(source), "--ref", REF, "--query", QUERY, "--model", "shapes", "--steps", "2",
            "--seed", "1", "-q", "-o", str(output))  # fmt: skip
    result = _run(toy_app, *args, "--toy-weight", "0.25")
    assert result.exit_code == 0, result.output
    recorded = _recorded(output)
    assert recorded["method"] == "toy" and recorded["toy_weight"] == 0.25
    bad = _run(toy_app, *args, "--toy-weight", "50", "--overwrite")
    assert bad.exit_code == 2 and "--toy-weight must be in the range [0, 10], got 50" in bad.output


def test_batch_runs_toy_rows_with_their_column_and_resumes(toy_app, source: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "rows.jsonl"
    rows = [{"src": str(source), "ref": REF, "query": QUERY, "method": "toy", "toy_weight": 0.75, "out": "a.png"},
            {"src": str(source), "ref": REF, "query": QUERY, "method": "toy", "out": "b.png"}]  # fmt: skip
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    args = ("batch", str(manifest), "--out-dir", str(out), "--model", "shapes", "--steps", "2", "--quiet")
    first = _run(toy_app, *args)
    assert first.exit_code == 0, first.output
    assert _recorded(out / "a.png")["toy_weight"] == 0.75 and _recorded(out / "b.png")["toy_weight"] == 0.5
    again = _run(toy_app, *args)
    statuses = [json.loads(line)["status"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert again.exit_code == 0 and statuses[-2:] == ["skipped", "skipped"]
    changed = _run(toy_app, *args, "--toy-weight", "0.1")  # b.png's setting changes; a.png's own cell wins
    last = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()][-2:]
    assert changed.exit_code == 1 and [record["status"] for record in last] == ["skipped", "failed"]
    assert "output exists with other parameters" in last[1]["error"]
    redone = _run(toy_app, *args, "--toy-weight", "0.1", "--overwrite")
    assert redone.exit_code == 0, redone.output
    assert _recorded(out / "b.png")["toy_weight"] == 0.1 and _recorded(out / "a.png")["toy_weight"] == 0.75
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text(json.dumps({**rows[0], "method": "dds"}) + "\n")
    refused = _run(toy_app, "batch", str(bad_row), "--out-dir", str(tmp_path / "bad"), "--model", "shapes")
    assert refused.exit_code == 2 and "toy_weight is not a setting of dds" in refused.output


def test_eval_shapes_runs_the_toy(toy_app, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = _run(toy_app, "eval-shapes", "--methods", "toy", "--cases", "2", "--swaps", "0", "--no-hold",
                  "--steps", "2", "--toy-weight", "0.3", "--out-dir", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"toy"} and report["method_settings"]["toy"] == {"toy_weight": 0.3}


def test_registering_checks_the_declaration() -> None:
    with pytest.raises(ValueError, match="registered already"), registered(Method("dds", "x", gradient=toy_gradient)):
        pass
    with pytest.raises(ValueError, match="unknown settings: nope"):
        with registered(Method("toy2", "x", gradient=toy_gradient, defaults={"nope": 1})):
            pass
    assert get_method("dds").gradient == "ddsedit.gradients:dds" and "toy2" not in method_names()
