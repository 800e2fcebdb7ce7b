"""``ddsedit batch``: every row of a manifest with one model load, resumable; its flags derived from the
declarations (the shared settings rows may take, and every registered method's options)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from ddsedit.cli.errors import one_line_errors, stderr
from ddsedit.cli.options import (
    AllowPickleOption,
    CudaGraphOption,
    DtypeOption,
    ModelOption,
    PredictionTypeOption,
    VaeOption,
    default_per_method,
    from_flags,
    parameter,
    setting_parameter,
)
from ddsedit.methods import option_declaration, option_methods
from ddsedit.settings import EDIT_PANEL, INPUT_PANEL, MODEL_PANEL, SPEED_PANEL, EditConfig, declared, declared_by_name

BATCH_SETTINGS = ("steps", "guidance", "lr", "t_min", "t_max", "negative", "size")  # shared settings batch takes


def method_option_parameters() -> list[inspect.Parameter]:
    """One option per method option of every registered method, its help naming the methods that read it."""
    return [
        setting_parameter(option_declaration(name), prefix=", ".join(m.name for m in readers) + ": ")
        for name, readers in option_methods().items()
    ]


def batch_parameters() -> list[inspect.Parameter]:
    from ddsedit.automask import AutoMaskSettings

    shared = declared_by_name(EditConfig)
    manifest_help = ("JSONL or CSV manifest, one edit a row: src, query, and optionally ref, method, mask (a file, or "
                     "auto), seed, steps, guidance, lr, out, and any option of the row's method (cut_weight, ...). "
                     "Paths are relative to the manifest's folder.")  # fmt: skip
    return [
        inspect.Parameter("manifest", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation=Annotated[Path, typer.Argument(help=manifest_help, show_default=False)]),
        parameter("out_dir", Annotated[Path, typer.Option(
            "--out-dir", help="Folder for the outputs and results.jsonl.", show_default=False,
            rich_help_panel=INPUT_PANEL)], inspect.Parameter.empty),
        parameter("skip_invalid", Annotated[bool, typer.Option(
            "--skip-invalid", help="Run the valid rows even if some rows are bad.", rich_help_panel=INPUT_PANEL)],
            False),
        parameter("overwrite", Annotated[bool, typer.Option(
            "--overwrite", help="Redo rows whose output exists, replacing it.", rich_help_panel=INPUT_PANEL)], False),
        parameter("quiet", Annotated[bool, typer.Option(
            "--quiet", "-q", help="No progress bars or summary; errors only.", rich_help_panel=INPUT_PANEL)], False),
        parameter("verbose", Annotated[bool, typer.Option(
            "--verbose", help="Show library warnings and tracebacks.", rich_help_panel=INPUT_PANEL)], False),
        *[setting_parameter(shared[name], default_text=default_per_method(name)) for name in BATCH_SETTINGS],
        parameter("seed", Annotated[int | None, typer.Option(
            "--seed", help="Seed of rows without one. Default: a seed derived from the row, the same on every run.",
            show_default=False, rich_help_panel=EDIT_PANEL)]),
        *method_option_parameters(),
        *[setting_parameter(item) for item in declared(AutoMaskSettings)],
        parameter("model", ModelOption),
        parameter("vae", VaeOption),
        parameter("device", Annotated[str, typer.Option(
            "--device", help="auto, cpu, cuda, cuda:N or mps (several processes: each its own).",
            rich_help_panel=MODEL_PANEL)], "auto"),
        parameter("dtype", DtypeOption, "auto"),
        parameter("allow_pickle", AllowPickleOption, False),
        parameter("prediction_type", PredictionTypeOption),
        parameter("batch_size", Annotated[int, typer.Option(
            "--batch-size", help="Rows per UNet call (same method, settings and working size).",
            rich_help_panel=SPEED_PANEL)], 1),
        parameter("processes", Annotated[int, typer.Option(
            "--processes", help="Split the rows over N processes (one per GPU, or CPU processes) via accelerate.",
            rich_help_panel=SPEED_PANEL)], 1),
        parameter("cuda_graph", CudaGraphOption, False),
    ]  # fmt: skip


def batch_command(**options: Any) -> None:
    """Edit every row of a manifest with one model load; rerun the same command to resume.

    --steps, --guidance and --lr apply to the rows that do not set their own; the method options
    (--cut-weight, --identity-steps, ...) to every row whose method reads them.

    stdout: the output path of every row done or already done. Exit codes: 0 all rows done,
    1 some row failed, or was bad and not run under --skip-invalid (each recorded in
    OUT_DIR/results.jsonl), 2 bad input (each bad row printed as MANIFEST:LINE: reason;
    nothing runs unless --skip-invalid, which runs the others and marks these "not run: invalid"),
    130 interrupted.
    """
    interrupted = "interrupted: finished rows are kept; run the same command again to do the rest"
    with one_line_errors(options["verbose"], interrupted):
        from ddsedit.batch import BatchOptions, run_batch  # quiets the libraries once the manifest is checked

        readers = option_methods()
        method_flags = {name: options.pop(name) for name in list(options) if name in readers}
        method_options = from_flags({name: option_declaration(name) for name in readers}, method_flags)
        mask = {f"mask_{name}": options.pop(name) for name in ("strength", "noises", "threshold", "grow")}
        batch_options = BatchOptions(**options, **mask, method_options=method_options)
        exit_code = run_batch(batch_options, console=stderr, emit=typer.echo)
    if exit_code:
        raise typer.Exit(exit_code)



