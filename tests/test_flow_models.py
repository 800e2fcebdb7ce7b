"""SD3 and Flux.1 through the CLI and the API (issue #22): every flow method on tiny random models built in code
(CPU, fp32): size kept, family and settings recorded, the same seed the same bytes, masked pixels exact outside,
automatic masks, batch with resume, and bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddsedit.editor import Editor

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

REF, QUERY = "a red circle", "a blue circle"
METHODS = ["sds", "dds", "masked-dds", "flowedit", "flowedit-masked"]


def _cli(*args: str):
    from typer.testing import CliRunner

    from ddsedit.cli import app

    return CliRunner().invoke(app, list(args))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _model(request: pytest.FixtureRequest, family: str) -> Path:
    return request.getfixturevalue({"sd3": "tiny_sd3_dir", "flux": "tiny_flux_dir"}[family])


def _edit_args(method: str, model: Path, files: dict[str, Path]) -> list[str]:
    command = method.removesuffix("-masked")
    args = [command, "--src", str(files["src"]), "--query", QUERY, "--model", str(model), "--steps", "4", "--seed",
            "3", "--quiet"]  # fmt: skip
    if command != "sds":
        args += ["--ref", REF]
    if command == "flowedit":
        args += ["--n-max", "3"]
    if method in ("masked-dds", "flowedit-masked"):
        args += ["--mask", str(files["mask"])]
    return args


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("method", METHODS)
def test_every_flow_method_runs_through_the_cli(method: str, family: str, request: pytest.FixtureRequest,
                                                circle_files: dict[str, Path], tmp_path: Path) -> None:  # fmt: skip
    model = _model(request, family)
    outputs = [tmp_path / "first.png", tmp_path / "second.png"]
    for output in outputs:
        result = _cli(*_edit_args(method, model, circle_files), "-o", str(output))
        assert result.exit_code == 0, result.stderr
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    with Image.open(outputs[0]) as written:
        assert written.size == (60, 40)
        parameters = json.loads(written.info["ddsedit"])
        webui = written.info["parameters"]
    assert parameters["model_family"] == family and parameters["method"] == method.removesuffix("-masked")
    assert parameters["prediction_type"] == "velocity" and parameters["working_size"] == "32x20"
    assert "t_min" not in parameters and "Timesteps" not in webui  # flow models walk their schedule
    assert _pixels(outputs[0]).shape == (40, 60, 3)
    if method.startswith("flowedit"):
        assert parameters["n_max"] == 3 and "lr" not in parameters and "source_guidance" in parameters
    if method in ("dds", "masked-dds"):
        assert {"eta", "source_guidance", "lr"} <= set(parameters)
    if "mask" in method or method == "masked-dds":
        with Image.open(circle_files["mask"]) as mask_image:
            outside = np.asarray(mask_image.convert("L")) == 0
        assert np.array_equal(_pixels(outputs[0])[outside], _pixels(circle_files["src"])[outside])


def test_the_family_defaults_apply_and_are_recorded(tiny_sd3_dir: Path, tiny_flux_dir: Path) -> None:
    sd3, flux = Editor.from_pretrained(tiny_sd3_dir, device="cpu"), Editor.from_pretrained(tiny_flux_dir, device="cpu")
    assert (sd3.config("dds").steps, sd3.config("dds").guidance, sd3.config("dds").source_guidance) == (50, 16.5, 6.0)
    assert (sd3.config("flowedit").n_max, sd3.config("flowedit").guidance) == (33, 13.5)
    assert (flux.config("flowedit").steps, flux.config("flowedit").n_max, flux.config("flowedit").source_guidance) == (
        28, 24, 1.5)  # fmt: skip
    assert sd3.config("dds").lr == 1.0 and sd3.config("dds").size == 32  # the tiny model's ddsedit.json


def test_eta_changes_the_dds_edit_and_zero_is_dds_on_velocities(tiny_sd3_dir: Path, circle_image: Image.Image) -> None:
    editor = Editor.from_pretrained(tiny_sd3_dir, device="cpu")
    edits = {
        eta: np.asarray(editor.dds(circle_image, REF, QUERY, steps=4, seed=1, eta=eta, size=32), dtype=np.int16)
        for eta in (0.0, 1.0)
    }
    assert np.abs(edits[0.0] - edits[1.0]).max() > 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_auto_mask_and_the_mask_command_on_flow_models(
    family: str, request: pytest.FixtureRequest, circle_files: dict[str, Path], tmp_path: Path
) -> None:
    model = _model(request, family)
    mask_path, edited = tmp_path / "drawn.mask.png", tmp_path / "edited.png"
    threshold = {"sd3": "0.8", "flux": "1.1"}[family]  # random tiny models: one that draws a partial mask
    common = ["--src", str(circle_files["src"]), "--ref", REF, "--query", QUERY, "--model", str(model), "--seed", "4",
              "--quiet", "--mask-threshold", threshold]  # fmt: skip
    result = _cli("mask", *common, "-o", str(mask_path))
    assert result.exit_code == 0, result.stderr
    with Image.open(mask_path) as mask:
        assert mask.size == (60, 40) and json.loads(mask.info["ddsedit"])["model_family"] == family
        drawn = np.asarray(mask.convert("L"))
    assert 0 < (drawn == 255).mean() < 1
    for command in ("masked-dds", "flowedit"):
        more = ["--n-max", "2"] if command == "flowedit" else []
        result = _cli(command, *common, "--mask", "auto", "--steps", "3", *more, "-o", str(edited), "--overwrite")
        assert result.exit_code == 0, result.stderr
        with Image.open(edited) as image:
            assert json.loads(image.info["ddsedit"])["mask"] == "auto"
        outside = drawn == 0
        assert np.array_equal(_pixels(edited)[outside], _pixels(circle_files["src"])[outside])


def test_batch_on_sd3_resumes(tiny_sd3_dir: Path, circle_files: dict[str, Path], tmp_path: Path) -> None:
    manifest = tmp_path / "rows.csv"
    manifest.write_text(
        "src,method,ref,query,seed,out\n"
        f"{circle_files['src']},dds,{REF},{QUERY},1,blue.png\n"
        f"{circle_files['src']},flowedit,{REF},a green circle,2,green.png\n"
    )
    out = tmp_path / "out"
    args = ["batch", str(manifest), "--out-dir", str(out), "--model", str(tiny_sd3_dir), "--steps", "3", "--n-max",
            "2", "--quiet"]  # fmt: skip
    result = _cli(*args)
    assert result.exit_code == 0, result.stderr
    written = sorted(out.glob("*.png"))
    assert len(written) == 2
    for path in written:
        with Image.open(path) as image:
            assert json.loads(image.info["ddsedit"])["model_family"] == "sd3"
    written_at = [path.stat().st_mtime_ns for path in written]
    again = _cli(*args)
    assert again.exit_code == 0, again.stderr
    assert [path.stat().st_mtime_ns for path in written] == written_at


def test_flux_schnell_and_sd3_without_t5_edit(tiny_flux_schnell_dir: Path, tiny_sd3_no_t5_dir: Path,
                                              circle_image: Image.Image) -> None:  # fmt: skip
    for model in (tiny_flux_schnell_dir, tiny_sd3_no_t5_dir):
        editor = Editor.from_pretrained(model, device="cpu")
        edited = editor.flowedit(circle_image, REF, QUERY, steps=4, n_max=3, seed=2)
        assert edited.size == circle_image.size


def test_bad_flow_input_is_one_line(tiny_sd3_dir: Path, tiny_model_dir: Path, circle_files: dict[str, Path],
                                    tmp_path: Path) -> None:  # fmt: skip
    def args(command: str, model: Path, *more: str) -> list[str]:
        return [command, "--src", str(circle_files["src"]), "--ref", REF, "--query", QUERY, "--model", str(model),
                "--quiet", "-o", str(tmp_path / "out.png"), *more]  # fmt: skip

    for arguments, text in [
        (args("cds", tiny_sd3_dir), "cds does not support Stable Diffusion 3 models"),
        (args("dds", tiny_sd3_dir, "--t-min", "5"), "--t-min acts only on"),
        (args("dds", tiny_model_dir, "--eta", "0.5"), "--eta acts only on Stable Diffusion 3 and Flux.1 models"),
        (args("flowedit", tiny_model_dir), "flowedit does not support Stable Diffusion 1.x/2.x models"),
        (args("flowedit", tiny_sd3_dir, "--steps", "10", "--n-max", "12"), "--n-max must be at most --steps (10)"),
        (args("flowedit", tiny_sd3_dir, "--steps", "10", "--n-max", "4", "--n-min", "4"), "--n-min must be below"),
        (args("flowedit", tiny_sd3_dir, "--mask", str(circle_files["mask"]), "--n-min", "1", "--steps", "4",
              "--n-max", "3"), "use --n-min 0 with a mask"),
        (args("dds", tiny_sd3_dir, "--prediction-type", "epsilon"), "--prediction-type does not apply"),
    ]:
        result = _cli(*arguments)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert text in lines[0], lines[0]
    assert not (tmp_path / "out.png").exists()


def test_make_tiny_model_writes_sd3_and_flux(tmp_path: Path) -> None:
    for flag, family in (("--sd3", "sd3"), ("--flux", "flux")):
        folder = tmp_path / family
        result = _cli("make-tiny-model", str(folder), flag)
        assert result.exit_code == 0, result.stderr
        assert Editor.from_pretrained(folder, device="cpu").family.name == family
    result = _cli("make-tiny-model", str(tmp_path / "both"), "--sd3", "--flux")
    assert result.exit_code == 2 and "choose one layout" in result.stderr


def test_batch_and_eval_refuse_settings_of_the_other_kind_of_model(tiny_sd3_dir: Path, tiny_model_dir: Path,
                                                                   circle_files: dict[str, Path],
                                                                   tmp_path: Path) -> None:  # fmt: skip
    manifest = tmp_path / "rows.csv"
    manifest.write_text(f"src,method,ref,query\n{circle_files['src']},dds,{REF},{QUERY}\n")
    batch = ["batch", str(manifest), "--out-dir", str(tmp_path / "out"), "--quiet"]
    for arguments, text in [
        ([*batch, "--model", str(tiny_sd3_dir), "--t-min", "5"], "--t-min acts only on"),
        ([*batch, "--model", str(tiny_model_dir), "--eta", "0"], "--eta acts only on"),
        (["eval-shapes", "--model", str(tiny_sd3_dir), "--t-max", "900", "--cases", "2", "--out-dir",
          str(tmp_path / "eval")], "--t-max acts only on"),
    ]:
        result = _cli(*arguments)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert text in lines[0], lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
