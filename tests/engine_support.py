"""Helpers that drive ddsedit the way users do and observe it, shared by several test modules.

Nothing here computes what a test checks against: the references stay in their own modules.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch
from PIL import Image


def edit_trajectory(
    monkeypatch: pytest.MonkeyPatch, editor: Any, image: Image.Image, method: str, query: str, ref: str | None,
    mask: Image.Image | None, config: Any,
) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """Run ``editor.edit`` and return its source latents and its latents after each step.

    The loop is only observed (wrapped, then run unchanged), so the edit is the one users get.
    """
    import ddsedit.editor as editor_module

    loop = editor_module.distill_loop
    seen: dict[str, Any] = {"trajectory": []}

    def observed_loop(
        unet: Any, source_latents: torch.Tensor, *args: Any, on_step: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        seen["source"] = source_latents.clone()

        def record(step: int, latents: torch.Tensor) -> None:
            seen["trajectory"].append(latents.clone())
            if on_step is not None:
                on_step(step, latents)

        return loop(unet, source_latents, *args, on_step=record, **kwargs)

    monkeypatch.setattr(editor_module, "distill_loop", observed_loop)
    editor.edit(image, method, query=query, ref=ref, mask=mask, config=config)
    return seen["source"], seen["trajectory"]


def main_in_fresh_process(arguments: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    """Run the CLI's ``main()`` with ``arguments`` in a new interpreter.

    Returns the process and what it printed: ``"<exit code> <True if torch, diffusers or transformers
    were imported>"``, to show that a check ran before the heavy imports.
    """
    code = (
        "import sys\nfrom ddsedit.cli import main\n"
        f"sys.argv = ['ddsedit', *{arguments!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n"
        "    print(exit.code, any(m in sys.modules for m in ('torch', 'diffusers', 'transformers')))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return completed, completed.stdout.strip()
