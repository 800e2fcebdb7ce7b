"""``ddsedit eval-shapes``: measure the methods on shapes-world cases whose right answers are known."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ddsedit.cli.batch import method_option_parameters
from ddsedit.cli.errors import one_line_errors, stderr
from ddsedit.cli.options import from_flags, parameter, setting_parameter
from ddsedit.errors import InputError
from ddsedit.methods import option_declaration, option_methods
from ddsedit.settings import (
    INPUT_PANEL,
    MODEL_PANEL,
    SPEED_PANEL,
    EditConfig,
    declared,
    declared_by_name,
    misapplied,
)

EVAL_SETTINGS = ("steps", "guidance", "lr", "t_min", "t_max")


def eval_runs(family: str | None = None) -> tuple[str, ...]:
    """What --methods may name: every registered method that supports ``family`` (None: any), and masked DDS with
    the automatic mask."""
    from ddsedit.methods import get_method, method_names
    from ddsedit.names import MASKED_METHOD

    return (*(name for name in method_names() if family is None or family in get_method(name).families),
            f"{MASKED_METHOD}-auto")  # fmt: skip


def eval_parameters() -> list[inspect.Parameter]:
    from ddsedit.automask import AutoMaskSettings

    shared = declared_by_name(EditConfig)
    cases_help = ("Recolour cases (half white, half black). Each runs every method and the held DDS run: 40 cases take "
                  "about 1.5 hours on 2 CPU cores (ids's step is 6-8x DDS's); --methods dds about 6 minutes.")
    methods_help = ("Comma-separated methods to run on the recolour cases (masked-dds-auto: masked DDS with --mask "
                    "auto, whose masks are scored too): a subset screens a model faster. Default: every method the "
                    f"model's family supports ({', '.join(eval_runs('sd'))} on SD).")  # fmt: skip
    return [
        parameter("model", Annotated[str, typer.Option(
            "--model", help="Model to evaluate (a shapes-world model).", rich_help_panel=MODEL_PANEL)], "shapes"),
        parameter("cases", Annotated[int, typer.Option("--cases", help=cases_help)], 40),
        parameter("swaps", Annotated[int, typer.Option("--swaps", help="Background swaps and shape swaps, each.")], 8),
        parameter("seed", Annotated[int, typer.Option("--seed", help="Seed of the cases and of the edits.")], 0),
        parameter("methods", Annotated[str, typer.Option("--methods", help=methods_help, show_default=False)], ""),
        parameter("hold", Annotated[bool, typer.Option(
            "--hold/--no-hold", help="Also run DDS from the right answer: what DDS can reach.")], True),
        *[setting_parameter(shared[name], default_text="the model's") for name in EVAL_SETTINGS],
        *method_option_parameters(),
        *[setting_parameter(item) for item in declared(AutoMaskSettings)],
        parameter("out_dir", Annotated[Path, typer.Option(
            "--out-dir", help="Where report.json and grid.png go.", rich_help_panel=INPUT_PANEL)], Path("shapes-eval")),
        parameter("overwrite", Annotated[bool, typer.Option(
            "--overwrite", help="Replace a report.json and grid.png already in --out-dir.",
            rich_help_panel=INPUT_PANEL)], False),
        parameter("batch_size", Annotated[int, typer.Option(
            "--batch-size", help="Images per UNet call.", rich_help_panel=SPEED_PANEL)], 8),
        parameter("device", Annotated[str, typer.Option(
            "--device", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=MODEL_PANEL)], "auto"),
        parameter("dtype", Annotated[str, typer.Option(
            "--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp16, bf16 or fp32.", rich_help_panel=MODEL_PANEL)],
            "auto"),
    ]  # fmt: skip


def eval_shapes_command(**options: Any) -> None:
    """Measure the edit methods on fresh shapes-world cases whose right answers are known; print the table.

    stdout: the table (markdown); stderr: progress (a bar in a terminal, else a line per batch).
    """
    with one_line_errors(False, "interrupted: no report written"):
        report, json_path, grid_path = _run_eval(**options)
    from ddsedit.shapes.evaluate import format_report

    typer.echo(format_report(report))
    stderr.print(f"wrote {json_path} and {grid_path}", markup=False)


def _run_eval(*, model: str, cases: int, swaps: int, seed: int, methods: str, hold: bool, out_dir: Path,
              overwrite: bool, batch_size: int, device: str, dtype: str, **flags: Any):  # fmt: skip
    from ddsedit.automask import AutoMaskSettings

    if cases < 2 or swaps < 0 or batch_size < 1:
        raise InputError("--cases must be >= 2, --swaps >= 0 and --batch-size >= 1")
    runs = eval_runs()
    chosen = tuple(dict.fromkeys(m.strip() for m in methods.split(",") if m.strip()))
    if methods.strip() and (not chosen or any(m not in runs for m in chosen)):
        raise InputError(f"--methods must be some of {', '.join(runs)} (comma-separated), got {methods!r}")
    mask_settings = AutoMaskSettings().replace(**{name: flags.pop(name) for name in
                                                  ("strength", "noises", "threshold", "grow")})  # fmt: skip
    mask_settings.validate()
    readers = option_methods()
    items = {**declared_by_name(EditConfig), **{name: option_declaration(name) for name in readers}}
    overrides = from_flags(items, flags)
    existing = [out_dir / name for name in ("report.json", "grid.png") if (out_dir / name).exists()]
    if existing and not overwrite:
        raise InputError(f"{existing[0]} exists: pass --overwrite to replace it, or another --out-dir")
    from ddsedit.loading import quiet_third_party_output

    quiet_third_party_output()
    from ddsedit.editor import Editor
    from ddsedit.shapes.evaluate import edit_count, evaluate, write_report

    editor = Editor.from_pretrained(model, device=device, dtype=dtype)
    from ddsedit.shapes.evaluate import eval_runs as family_runs

    chosen = chosen or family_runs(editor.family.name)
    for name in overrides:  # --t-min on a flow model, --eta on SD: refused, not ignored
        if problem := misapplied(items[name], editor.family):
            raise InputError(problem)
    steps = editor.config("dds", **{k: v for k, v in overrides.items() if k in EVAL_SETTINGS}).steps
    total = edit_count(cases, swaps, hold, chosen)
    stderr.print(f"eval-shapes: {total} edits of {steps} steps on {editor.device.type}", markup=False)
    with _EvalProgress(total) as on_progress:
        report, picture = evaluate(editor, cases, seed, overrides, swaps=swaps, batch_size=batch_size, hold=hold,
                                   methods=chosen, on_progress=on_progress, mask_settings=mask_settings)  # fmt: skip
    json_path, grid_path = write_report(report, picture, out_dir, overwrite=overwrite)
    return report, json_path, grid_path


class _EvalProgress:
    """eval-shapes progress on stderr: a bar in a terminal; without one, a line per batch with an estimate."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = 0.0
        self.bar = None

    def __enter__(self):
        self.started = time.monotonic()
        if stderr.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=stderr,
            )  # fmt: skip
            self.bar.__enter__()
            task = self.bar.add_task("edits", total=self.total)

        def on_progress(label: str, count: int) -> None:
            self.done += count
            if self.bar is not None:
                self.bar.update(task, completed=self.done, description=label)
                return
            elapsed = time.monotonic() - self.started
            left = elapsed / self.done * (self.total - self.done)
            stderr.print(
                f"eval-shapes: {self.done}/{self.total} edits ({label}), {elapsed:.0f} s, about {left:.0f} s left",
                markup=False,
            )

        return on_progress

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)
