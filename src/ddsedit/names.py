"""Names every part of ddsedit agrees on, and the prompt check; torch-free, so the CLI and manifests use them."""

from __future__ import annotations

from ddsedit.errors import InputError

METHODS = ("sds", "dds", "masked-dds")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prompt(prompt: object, flag: str, hint: str | None = None) -> str:
    """``prompt`` if it is a non-blank string, else a one-line InputError naming ``flag`` (and ``hint``)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{flag} must not be empty" + (f": {hint}" if hint else ""))
    return prompt
