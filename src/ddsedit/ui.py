"""``ddsedit ui``: a local web page (Gradio) to edit with any method, paint or draw the mask, watch the edit form
and copy the command line that reproduces it.

The page is a thin layer over :class:`ddsedit.editor.Editor`, loaded once when the server starts: the source is
uploaded into an image editor whose painted layer is the mask (white = editable); an edit runs in a worker
thread that reports each step and each decoded frame through a queue, which the page's generator turns into
updates; the cancel button sets a flag that the next step's callback turns into :class:`EditCancelled`. The
result is written, with its metadata, as the CLI writes it, into a temporary folder that the server removes when
it stops; nothing else is written and no path the page sends is opened (uploads only).

Everything that decides what runs is in plain functions (:func:`check_source`, :func:`painted_mask`,
:func:`edit_settings`, :func:`reproducing_command`), tested without a browser; :func:`build_page` wires them to
Gradio, which is imported only there (the ``ui`` extra).
"""

from __future__ import annotations

import math
import os
import queue
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops

from ddsedit.errors import InputError
from ddsedit.settings import EditConfig, declared_by_name

MASK_NONE, MASK_PAINTED, MASK_AUTO = "none", "painted", "auto"
INSTALL_HINT = 'the page needs Gradio: pip install "ddsedit[ui]"'
PROGRESS_INTERVAL = 0.25  # seconds between progress updates sent to the page


@dataclass(frozen=True)
class PageSettings:
    """How the page serves: where it listens and what it accepts."""

    host: str = "127.0.0.1"  # this machine only, unless asked
    port: int = 7860
    max_side: int = 4096  # pixels on the longest side of an uploaded image
    max_upload: str = "25mb"  # Gradio's limit on one uploaded file
    frames: int = 10  # intermediate decodes an edit shows


class EditCancelled(Exception):
    """The page's cancel button stopped the edit (raised from the step callback, so within one step)."""


def check_source(image: Image.Image | None, max_side: int) -> Image.Image:
    """The uploaded source as RGB; an InputError for none or one larger than ``max_side`` on a side."""
    if image is None:
        raise InputError("drop or paste a source image first")
    if max(image.size) > max_side:
        raise InputError(f"the image is {image.width}x{image.height}: at most {max_side} px a side")
    return image.convert("RGB")


def painted_mask(layers: list[Image.Image] | None, size: tuple[int, int]) -> Image.Image | None:
    """The mask the user painted over the source (white = editable): every painted pixel of every layer, or None
    when nothing is painted. A layer of another size than the source is an InputError."""
    mask = None
    for layer in layers or []:
        if layer.size != size:
            raise InputError(f"the painted mask is {layer.width}x{layer.height}, the image {size[0]}x{size[1]}")
        painted = layer.convert("RGBA").getchannel("A").point(lambda value: 255 if value > 0 else 0)
        mask = painted if mask is None else ImageChops.lighter(mask, painted)
    if mask is None or mask.getextrema()[1] == 0:
        return None
    return mask


def edit_settings(editor: Any, method: str, values: dict[str, Any]) -> EditConfig:
    """The edit's settings: the model's defaults for ``method`` under the page's ``values`` (blank fields: None,
    the default), each checked as a flag is (an InputError names the setting)."""
    given = {key: value for key, value in values.items() if value is not None and str(value).strip() != ""}
    for key in ("steps", "seed", "size"):
        if key in given:
            try:
                number = float(given[key])
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number) or number != int(number):
                raise InputError(f"{key} must be a whole number, got {given[key]}")
            given[key] = int(number)
    config = editor.config(method, **given)
    config.validate(editor.components.num_train_timesteps)
    return config


def reproducing_command(parameters: dict[str, Any], source: str, output: str, mask: str | None = None,
                        model: str | None = None) -> str:  # fmt: skip
    """The ``ddsedit`` command line that makes the same edit as the one whose recorded ``parameters`` are given,
    from the files ``source`` (and ``mask``) to ``output``: every recorded setting as its flag. ``model``: the model
    as the page was started with it (default: as the output records it)."""
    from ddsedit.methods import get_method

    method = get_method(parameters["method"])
    items = {**declared_by_name(EditConfig), **declared_by_name(method.options)}
    words = ["ddsedit", method.name, "--src", source, "--query", parameters["query"]]
    if method.needs_ref:
        words += ["--ref", parameters["ref"]]
    words += ["--model", model or str(parameters["model"]), "--seed", str(parameters["seed"])]
    if parameters.get("vae"):
        words += ["--vae", str(parameters["vae"])]
    if parameters.get("mask") == "auto":
        words += ["--mask", "auto"]
        words += [word for key in ("strength", "noises", "threshold", "grow")
                  for word in (f"--mask-{key}", str(parameters[f"mask_{key}"]))]  # fmt: skip
    elif mask is not None:
        words += ["--mask", mask]
    for name, value in parameters.items():
        item = items.get(name)
        if item is None or name == "seed":
            continue
        if name == "paste_back":
            words.append("--paste-back" if value else "--no-paste-back")
            continue
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        words += [item.flag, text]
    words += ["-o", output]
    return shlex.join(words)


@dataclass
class EditJob:
    """One edit running in a worker thread: what it reports, and the flag that cancels it."""

    updates: queue.Queue = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)


def run_edit(editor: Any, job: EditJob, source: Path, method: str, ref: str, query: str,
             mask: Any, config: EditConfig) -> None:  # fmt: skip
    """The edit, reported into ``job.updates``: ("step", step, total), ("frame", step, image), then ("done",
    result) or ("error", message) or ("cancelled",)."""

    def on_progress(step: int, total: int) -> None:
        if job.cancel.is_set():
            raise EditCancelled
        job.updates.put(("step", step, total))

    def on_frame(step: int, frames: list[Image.Image]) -> None:
        job.updates.put(("frame", step, frames[0]))

    try:
        result = editor.edit(source, method, query=query, ref=ref or None, mask=mask, config=config,
                             on_progress=on_progress, on_frame=on_frame)  # fmt: skip
    except EditCancelled:
        job.updates.put(("cancelled",))
    except InputError as error:
        job.updates.put(("error", str(error)))
    except Exception as error:  # the page stays up whatever an edit does; the message says what
        job.updates.put(("error", f"{type(error).__name__}: {error}"))
    else:
        job.updates.put(("done", result))


def shown_large(image: Image.Image, side: int = 256) -> Image.Image:
    """A small frame scaled up (nearest: pixels stay pixels) so that its longest side is at least ``side``."""
    factor = max(1, side // max(image.size))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def progress_text(step: int, total: int, started: float) -> str:
    """``step 12/50, 3.1 s, about 9.8 s left``: what the page shows while an edit runs."""
    elapsed = time.monotonic() - started
    left = elapsed / step * (total - step) if step else 0.0
    return f"step {step}/{total}, {elapsed:.1f} s, about {left:.1f} s left"


def build_page(editor: Any, settings: PageSettings, workdir: Path) -> Any:
    """The page (a ``gradio.Blocks``) for ``editor``; results are written under ``workdir``."""
    import gradio as gr

    from ddsedit import imageio
    from ddsedit.automask import AutoMaskSettings
    from ddsedit.editor import save_result
    from ddsedit.methods import all_methods

    methods = [method.name for method in all_methods() if editor.family.name in method.families]
    defaults = editor.config("dds")
    counter = iter(range(1, 10**9))

    def edit(
        editor_value: dict | None, ref: str, query: str, method: str, steps: Any, guidance: Any, lr: Any, seed: Any,
        size: Any, mask_mode: str, job_state: EditJob | None, history: list,
    ) -> Iterator[tuple]:  # fmt: skip
        """Run an edit, yielding (progress, preview, result, download, compare, command, error, job, history)."""
        job = EditJob()
        nothing = gr.update()
        try:
            source = check_source((editor_value or {}).get("background"), settings.max_side)
            config = edit_settings(editor, method, {"steps": steps, "guidance": guidance, "lr": lr, "seed": seed,
                                                    "size": size})  # fmt: skip
            from ddsedit.checks import check_prompts

            check_prompts(method, query, ref)
            mask: Any = None
            if mask_mode == MASK_AUTO:
                mask = AutoMaskSettings()
            elif mask_mode == MASK_PAINTED:
                mask = painted_mask((editor_value or {}).get("layers"), source.size)
                if mask is None:
                    raise InputError("paint the mask over the image first (white = editable), or choose another")
            import random

            if config.seed is None:
                config = config.replace(seed=random.SystemRandom().randrange(2**31))
            config = config.replace(save_every=max(1, config.steps // settings.frames))
        except InputError as error:
            yield ("", nothing, nothing, nothing, nothing, nothing, f"**{error}**", job_state, history)
            return
        # The edit reads its inputs from files, as the CLI does, so that the output records their hashes and the
        # command line shown gives the same bytes.
        number = next(counter)
        source_path = workdir / f"source-{number}.png"
        source.save(source_path)
        mask_name = None
        if isinstance(mask, Image.Image):
            mask_name = f"mask-{number}.png"
            mask.save(workdir / mask_name)
            mask = workdir / mask_name
        worker = threading.Thread(target=run_edit, args=(editor, job, source_path, method, ref, query, mask, config),
                                  daemon=True)  # fmt: skip
        started = time.monotonic()
        worker.start()
        yield ("starting...", nothing, nothing, nothing, nothing, nothing, "", job, history)
        shown = 0.0  # when progress was last sent: a few updates a second, not one per step, keep the edit fast
        while True:
            update = job.updates.get()
            if update[0] == "step":
                now = time.monotonic()
                if update[1] == 1 or now - shown >= PROGRESS_INTERVAL:
                    shown = now
                    yield (progress_text(update[1], update[2], started), nothing, nothing, nothing, nothing, nothing,
                           "", job, history)  # fmt: skip
            elif update[0] == "frame":
                yield (nothing, shown_large(update[2]), nothing, nothing, nothing, nothing, "", job, history)
            elif update[0] == "cancelled":
                yield ("cancelled", nothing, nothing, nothing, nothing, nothing, "", None, history)
                return
            elif update[0] == "error":
                yield ("", nothing, nothing, nothing, nothing, nothing, f"**{update[1]}**", None, history)
                return
            else:
                result = update[1]
                path = save_result(result, workdir / f"edit-{number}.png", overwrite=True)
                command = reproducing_command(result.parameters, source_path.name, f"edit-{number}.png", mask_name,
                                              model=editor.components.source)  # fmt: skip
                seconds = time.monotonic() - started
                recorded = result.parameters
                mask_shown = recorded.get("mask", "painted" if mask_name else "")
                row = [number, method, recorded.get("ref", ""), query, recorded["seed"], recorded["steps"],
                       recorded["guidance"], recorded.get("lr", ""), mask_shown, f"{seconds:.1f} s"]  # fmt: skip
                history = [*history, row]
                yield (f"done in {seconds:.1f} s (seed {result.parameters['seed']})", result.image, str(path),
                       str(path), (source, result.image), command, "", None, history)  # fmt: skip
                return

    def cancel(job: EditJob | None) -> None:
        if job is not None:
            job.cancel.set()

    def show_auto_mask(editor_value: dict | None, ref: str, query: str, seed: Any) -> tuple:
        try:
            source = check_source((editor_value or {}).get("background"), settings.max_side)
            chosen = edit_settings(editor, "dds", {"seed": seed}).seed
            drawn = editor.auto_mask(source, ref, query, seed=chosen)
        except InputError as error:
            return gr.update(), gr.update(), f"**{error}**"
        layer = Image.new("RGBA", source.size, (0, 0, 0, 0))
        layer.paste((255, 255, 255, 160), mask=drawn)
        value = {"background": source, "layers": [layer], "composite": None}
        return value, MASK_PAINTED, ""

    def use_as_source(result_path: str | None) -> Any:
        if not result_path:
            return gr.update()
        return {"background": imageio.load_image(Path(result_path)), "layers": [], "composite": None}

    with gr.Blocks(title="ddsedit") as page:
        gr.Markdown(f"# ddsedit\nModel: `{editor.components.identity or editor.components.source}` "
                    f"({editor.family.label})")  # fmt: skip
        job_state = gr.State(None)
        history_state = gr.State([])
        with gr.Row():
            with gr.Column():
                source_editor = gr.ImageEditor(
                    label="Source (paint the mask over it: white = editable)", type="pil", elem_id="src",
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), sources=("upload", "clipboard"),
                    format="png",  # lossless: a chained edit starts from the result's exact pixels (webp would not)
                )  # fmt: skip
                ref = gr.Textbox(label="What the image shows (--ref)", elem_id="ref")
                query = gr.Textbox(label="What it should show (--query)", elem_id="query")
                with gr.Row():
                    method = gr.Dropdown(methods, value="dds", label="Method", elem_id="method")
                    mask_mode = gr.Radio([MASK_NONE, MASK_PAINTED, MASK_AUTO], value=MASK_NONE, label="Mask",
                                         elem_id="mask")  # fmt: skip
                with gr.Row():
                    steps = gr.Number(value=defaults.steps, label="Steps", precision=0, elem_id="steps")
                    guidance = gr.Number(value=defaults.guidance, label="Guidance", elem_id="guidance")
                    lr = gr.Number(value=defaults.lr, label="Learning rate", elem_id="lr")
                    seed = gr.Textbox(value="", label="Seed", placeholder="random", elem_id="seed")
                    size = gr.Number(value=defaults.size, label="Size", precision=0, elem_id="size")
                with gr.Row():
                    run = gr.Button("Edit", variant="primary", elem_id="run")
                    cancel_button = gr.Button("Cancel", elem_id="cancel")
                    auto_button = gr.Button("Show the automatic mask", elem_id="show-auto-mask")
                error = gr.Markdown(elem_id="error")
            with gr.Column():
                progress = gr.Markdown(elem_id="progress")
                preview = gr.Image(label="Forming", type="pil", interactive=False, height=256, elem_id="preview")
                result = gr.Image(label="Result", type="filepath", interactive=False, height=256, elem_id="result")
                compare = gr.ImageSlider(label="Before / after", type="pil", elem_id="compare")
                download = gr.File(label="Download (with its settings inside)", elem_id="download")
                again = gr.Button("Use as source", elem_id="use-as-source")
                command = gr.Code(
                    label="The command that makes this edit (source-N.png: the source as the page got it)",
                    language="shell", elem_id="command",
                )  # fmt: skip
                history = gr.Dataframe(headers=["#", "method", "ref", "query", "seed", "steps", "guidance", "lr",
                                                "mask", "time"], label="Edits so far",
                                       interactive=False, elem_id="history")  # fmt: skip
        def method_defaults(name: str) -> tuple:
            config = editor.config(name)
            return config.steps, config.guidance, config.lr, config.size

        method.change(method_defaults, method, [steps, guidance, lr, size])
        running = run.click(
            edit,
            [source_editor, ref, query, method, steps, guidance, lr, seed, size, mask_mode, job_state, history_state],
            [progress, preview, result, download, compare, command, error, job_state, history_state],
        )  # fmt: skip
        running.then(lambda rows: rows, history_state, history)
        cancel_button.click(cancel, job_state, None)
        auto_button.click(show_auto_mask, [source_editor, ref, query, seed], [source_editor, mask_mode, error])
        again.click(use_as_source, result, source_editor)
    return page


def serve(model: str | None, device: str, dtype: str, settings: PageSettings) -> None:
    """Load the model once, then serve the page until interrupted; its temporary folder goes with it."""
    # A local page calls no one: Gradio's usage analytics are off unless the user turned them on.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    from ddsedit.editor import Editor

    editor = Editor.from_pretrained(model, device=device, dtype=dtype)
    # A stop by SIGTERM unwinds like Ctrl-C, so that the temporary folder is removed either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="ddsedit-ui-") as folder:
        page = build_page(editor, settings, Path(folder))
        page.queue(default_concurrency_limit=1)  # one device: edits wait their turn, every tab gets its own
        page.launch(server_name=settings.host, server_port=settings.port, share=False,
                    max_file_size=settings.max_upload, allowed_paths=[folder], inbrowser=False)  # fmt: skip
