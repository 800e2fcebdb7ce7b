"""Shared fixtures. No test may reach the network: the hub is forced offline here."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # the page's tests: Gradio calls no one either

import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD pipeline saved with save_pretrained, built once per session."""
    from ddsedit.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-model") / "tiny")


@pytest.fixture(scope="session")
def tiny_v_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny pipeline with a v-prediction scheduler."""
    from ddsedit.tiny import build_tiny_pipeline

    return build_tiny_pipeline(
        tmp_path_factory.mktemp("tiny-v-model") / "tiny-v", prediction_type="v_prediction"
    )


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL-layout pipeline (two text encoders, size ids), built once per session."""
    from ddsedit.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD3-layout pipeline (two CLIPs with projections, T5, flow-matching transformer)."""
    from ddsedit.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_sd3_no_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD3 pipeline without T5 (text_encoder_3 and tokenizer_3 null in its model_index.json)."""
    from ddsedit.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3-no-t5") / "tiny-sd3-no-t5", with_t5=False)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Flux.1-dev-like pipeline (guidance embedding, resolution-dependent shift)."""
    from ddsedit.tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_flux_schnell_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Flux.1-schnell-like pipeline (no guidance embedding, no shift)."""
    from ddsedit.tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux-schnell") / "tiny-flux-schnell",
                                    guidance_embeds=False)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_editor(tiny_model_dir: Path):
    from ddsedit.editor import Editor

    return Editor.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture
def circle_image() -> Image.Image:
    """A 60x40 red circle on white: a non-square source to exercise resizing."""
    image = Image.new("RGB", (60, 40), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((10, 5, 40, 35), fill=(220, 40, 40))
    return image


@pytest.fixture
def circle_files(tmp_path: Path, circle_image: Image.Image) -> dict[str, Path]:
    """The circle image and a mask (white rectangle over the circle's area) on disk."""
    source = tmp_path / "circle.png"
    circle_image.save(source)
    mask = Image.new("L", circle_image.size, 0)
    ImageDraw.Draw(mask).rectangle((5, 0, 45, 39), fill=255)
    mask_path = tmp_path / "mask.png"
    mask.save(mask_path)
    return {"src": source, "mask": mask_path}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """``tmp_path/images``: four circles, a mask, an all-black mask and a truncated PNG (the batch tests' inputs)."""
    from batch_support import make_images

    return make_images(tmp_path / "images")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory):
    """The page of ``ddsedit ui`` for the bundled model, served on this machine for the session's tests: (its
    address, its working folder)."""
    from ddsedit import ui
    from ddsedit.editor import Editor

    workdir = tmp_path_factory.mktemp("ui")
    editor = Editor.from_pretrained("shapes", device="cpu")
    page = ui.build_page(editor, ui.PageSettings(), workdir)
    page.queue(default_concurrency_limit=1)
    port = _free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(workdir)])  # fmt: skip
    yield f"http://127.0.0.1:{port}/", workdir
    page.close()
