"""ddsedit: edit images with text through score distillation on Stable Diffusion models.

The heavy libraries (torch, diffusers, transformers) are imported lazily, so that
`import ddsedit` and `ddsedit --help` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

__all__ = ["__version__", "EditConfig", "Editor", "DDSEditError", "InputError"]

if TYPE_CHECKING:
    from ddsedit.editor import EditConfig, Editor
    from ddsedit.errors import DDSEditError, InputError


def __getattr__(name: str) -> Any:
    if name in ("Editor", "EditConfig"):
        from ddsedit import editor

        return getattr(editor, name)
    if name in ("DDSEditError", "InputError"):
        from ddsedit import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'ddsedit' has no attribute {name!r}")
