"""``ddsedit ui``: serve the local web page (:mod:`ddsedit.ui`; Gradio, the ``ui`` extra)."""

from __future__ import annotations

from typing import Annotated

import typer

from ddsedit.cli.errors import one_line_errors, stderr
from ddsedit.cli.options import DeviceOption, DtypeOption, ModelOption
from ddsedit.errors import InputError


def ui_command(
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    host: Annotated[str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 7860,
    max_side: Annotated[int, typer.Option("--max-side", help="Largest image side accepted, in pixels.")] = 4096,
) -> None:
    """Serve a local web page to edit with any method, paint masks and watch the edit (needs the ui extra)."""
    with one_line_errors():
        import importlib.util

        from ddsedit.ui import INSTALL_HINT, PageSettings, serve

        if importlib.util.find_spec("gradio") is None:
            raise InputError(INSTALL_HINT)
        if not 0 < port < 65536 or max_side < 8:
            raise InputError("--port must be in [1, 65535] and --max-side at least 8")
        from ddsedit.loading import quiet_third_party_output

        quiet_third_party_output()
        stderr.print(f"loading the model, then serving http://{host}:{port} (Ctrl-C stops)", markup=False)
        serve(model or "shapes", device, dtype, PageSettings(host=host, port=port, max_side=max_side))
