"""``ddsedit ui``: the page's checks and reproducing command line as plain functions, the edit worker (progress,
frames, cancel), and the served page driven through Gradio's own client (an edit of the example with the bundled
model: blue, its size, its metadata, and the command line shown gives the same bytes). The browser tests of #23
(painting, the page's elements in Chromium) are not here yet."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ddsedit import ui
from ddsedit.editor import Editor
from ddsedit.errors import InputError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "red-circle-on-white.png"
REF, QUERY = "a red circle on a white background", "a blue circle on a white background"


def test_a_missing_or_oversized_source_is_a_message() -> None:
    with pytest.raises(InputError, match="drop or paste a source image"):
        ui.check_source(None, 4096)
    with pytest.raises(InputError, match="at most 64 px a side"):
        ui.check_source(Image.new("RGBA", (65, 10)), 64)
    assert ui.check_source(Image.new("RGBA", (64, 10)), 64).mode == "RGB"


def test_the_painted_layers_are_the_mask() -> None:
    first, second = Image.new("RGBA", (20, 10), (0, 0, 0, 0)), Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    ImageDraw.Draw(first).rectangle((0, 0, 4, 9), fill=(255, 255, 255, 90))  # half-transparent strokes count
    ImageDraw.Draw(second).rectangle((15, 0, 19, 9), fill=(255, 255, 255, 255))
    mask = np.asarray(ui.painted_mask([first, second], (20, 10)))
    expected = np.zeros((10, 20), dtype=np.uint8)
    expected[:, :5] = expected[:, 15:] = 255
    assert np.array_equal(mask, expected)
    assert ui.painted_mask([Image.new("RGBA", (20, 10), (0, 0, 0, 0))], (20, 10)) is None
    with pytest.raises(InputError, match="the painted mask is 20x10, the image 30x10"):
        ui.painted_mask([first], (30, 10))


def test_settings_from_the_page_are_checked_as_flags(tiny_editor: Editor) -> None:
    config = ui.edit_settings(tiny_editor, "dds", {"steps": 20.0, "guidance": None, "seed": "", "lr": 0.2})
    assert (config.steps, config.lr, config.seed) == (20, 0.2, None)
    with pytest.raises(InputError, match="--steps must be in the range"):
        ui.edit_settings(tiny_editor, "dds", {"steps": 0})
    with pytest.raises(InputError, match="steps must be a whole number"):
        ui.edit_settings(tiny_editor, "dds", {"steps": 2.5})
    with pytest.raises(InputError, match="seed must be a whole number, got abc"):
        ui.edit_settings(tiny_editor, "dds", {"seed": "abc"})
    assert ui.edit_settings(tiny_editor, "dds", {"seed": " 7 "}).seed == 7


def test_the_command_line_reproduces_the_edit_byte_for_byte(
    tiny_model_dir: Path, tiny_editor: Editor, circle_files: dict[str, Path], tmp_path: Path
) -> None:
    """The API edit's recorded parameters, as a command line, run by the CLI: the same file."""
    import shlex

    from typer.testing import CliRunner

    from ddsedit.cli import app
    from ddsedit.editor import save_result

    config = tiny_editor.config("masked-dds", steps=3, seed=5, guidance=5.0, feather=1.0)
    result = tiny_editor.edit(circle_files["src"], "masked-dds", query="a blue circle", ref="a red circle",
                              mask=circle_files["mask"], config=config)  # fmt: skip
    page = save_result(result, tmp_path / "page.png")
    command = ui.reproducing_command(result.parameters, str(circle_files["src"]), str(tmp_path / "shell.png"),
                                     mask=str(circle_files["mask"]), model=str(tiny_model_dir))  # fmt: skip
    words = shlex.split(command)
    assert words[:2] == ["ddsedit", "masked-dds"] and "--feather" in words and "--paste-back" in words
    outcome = CliRunner().invoke(app, [*words[1:], "--quiet"])
    assert outcome.exit_code == 0, outcome.stderr
    assert (tmp_path / "shell.png").read_bytes() == page.read_bytes()


def test_the_worker_reports_steps_and_frames_and_stops_when_cancelled(
    tiny_editor: Editor, circle_files: dict[str, Path]
) -> None:
    config = tiny_editor.config("dds", steps=6, seed=1, save_every=2)
    job = ui.EditJob()
    ui.run_edit(tiny_editor, job, circle_files["src"], "dds", "a red circle", "a blue circle", None, config)
    updates = [job.updates.get() for _ in range(job.updates.qsize())]
    assert [u[1] for u in updates if u[0] == "step"] == list(range(1, 7))
    assert [u[1] for u in updates if u[0] == "frame"] == [2, 4, 6]
    assert updates[-1][0] == "done" and updates[-1][1].image.size == (60, 40)

    cancelled = ui.EditJob()
    cancelled.cancel.set()
    ui.run_edit(tiny_editor, cancelled, circle_files["src"], "dds", "a red circle", "a blue circle", None, config)
    assert [cancelled.updates.get() for _ in range(cancelled.updates.qsize())] == [("cancelled",)]

    failed = ui.EditJob()
    ui.run_edit(tiny_editor, failed, circle_files["src"], "masked-dds", "a red circle", "a blue circle", None,
                tiny_editor.config("masked-dds", steps=2))  # fmt: skip
    kind, message = failed.updates.get()
    assert kind == "error" and "mask" in message


def _submit(url: str, query: str, steps: int = 20):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    source = {"background": handle_file(str(EXAMPLE)), "layers": [], "composite": None, "id": None}
    return client.submit(source, REF, query, "dds", steps, 7.5, 0.1, "0", 64, "none", api_name="/edit")


def test_the_served_page_edits_the_example_and_shows_the_command(served, tmp_path: Path) -> None:
    import shlex

    from typer.testing import CliRunner

    from ddsedit.cli import app

    url, workdir = served
    started = time.monotonic()
    job = _submit(url, QUERY)
    outputs = list(job)
    assert any(str(output[0]).startswith("step ") for output in outputs)
    progress, _, result_path, _, _, command, error = job.outputs()[-1]  # the page's State is not sent
    assert progress.startswith("done in") and not error, (progress, error)
    assert time.monotonic() - started < 120
    with Image.open(EXAMPLE) as example:
        size, source = example.size, np.asarray(example.convert("RGB"), dtype=np.int16)
    circle = (source[..., 0] > 150) & (source[..., 2] < 100)  # the red circle's pixels
    with Image.open(result_path) as result:
        assert result.size == size
        parameters = json.loads(result.info["ddsedit"])
        red, _, blue = np.asarray(result.convert("RGB"), dtype=np.int16)[circle].mean(axis=0)
    assert blue > red + 60 and parameters["method"] == "dds" and parameters["seed"] == 0
    words = shlex.split(command)
    source = workdir / words[words.index("--src") + 1]
    output = tmp_path / "shell.png"
    words[words.index("--src") + 1], words[words.index("-o") + 1] = str(source), str(output)
    assert CliRunner().invoke(app, [*words[1:], "--quiet"]).exit_code == 0
    assert output.read_bytes() == Path(result_path).read_bytes()


def test_an_empty_query_is_a_message_and_the_page_keeps_serving(served) -> None:
    url, _ = served
    job = _submit(url, "   ")
    job.result()
    error = job.outputs()[-1][-1]
    assert "query" in error.lower()
    again = _submit(url, QUERY, steps=2)
    assert again.result()[0].startswith("done in")


def test_ui_without_gradio_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from typer.testing import CliRunner

    from ddsedit.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    result = CliRunner().invoke(app, ["ui"])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {ui.INSTALL_HINT}"


def test_a_painted_mask_keeps_the_outside_exact(served, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    url, _ = served
    with Image.open(EXAMPLE) as example:
        size, source = example.size, np.asarray(example.convert("RGB"), dtype=np.int16)
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((0, 0, size[0] // 2, size[1] - 1), fill=(255, 255, 255, 255))
    layer.save(tmp_path / "layer.png")
    editor_value = {"background": handle_file(str(EXAMPLE)), "layers": [handle_file(str(tmp_path / "layer.png"))],
                    "composite": None, "id": None}  # fmt: skip
    job = Client(url, verbose=False).submit(editor_value, REF, QUERY, "masked-dds", 5, 7.5, 0.1, "1", 64, "painted",
                                            api_name="/edit")  # fmt: skip
    progress, _, result_path, *_, error = job.result()
    assert progress.startswith("done in") and not error, error
    with Image.open(result_path) as result:
        edited = np.asarray(result.convert("RGB"), dtype=np.int16)
        assert json.loads(result.info["ddsedit"])["mask_sha256"]
    outside = np.asarray(layer.getchannel("A")) == 0
    assert np.array_equal(edited[outside], source[outside])


def test_a_file_that_is_not_an_image_is_refused_and_the_page_keeps_serving(served, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    url, _ = served
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    client = Client(url, verbose=False)
    with pytest.raises(Exception):  # noqa: B017 - Gradio refuses it before the page's code runs (an AppError)
        client.predict({"background": handle_file(str(fake)), "layers": [], "composite": None, "id": None}, REF,
                       QUERY, "dds", 2, 7.5, 0.1, "0", 64, "none", api_name="/edit")  # fmt: skip
    assert _submit(url, QUERY, steps=2).result()[0].startswith("done in")


def test_use_as_source_puts_the_result_in_the_source(served) -> None:
    from gradio_client import Client, handle_file

    url, _ = served
    result_path = _submit(url, QUERY, steps=2).result()[2]
    value = Client(url, verbose=False).predict(handle_file(result_path), api_name="/use_as_source")
    with Image.open(value["background"]) as chained, Image.open(result_path) as result:
        assert np.array_equal(np.asarray(chained.convert("RGB")), np.asarray(result.convert("RGB")))
