"""Checks of user input shared by the command line, manifests and the editor; torch-free.

Each ``*_problems`` function returns the reasons the input cannot run (empty: fine), so a
manifest can report every reason of a row; each ``check_*`` raises the first as an InputError.
"""

from __future__ import annotations

from ddsedit.errors import InputError
from ddsedit.names import PREDICTION_TYPES


def _is_blank(prompt: object) -> bool:
    return not isinstance(prompt, str) or not prompt.strip()


def prompt_problems(method: str, query: object, ref: object, prefix: str = "") -> list[str]:
    """Why ``method`` cannot run with these prompts: an empty query, or an empty ref for the DDS methods.

    ``prefix`` goes before the names: ``"--"`` for flags, ``""`` for manifest columns.
    """
    problems = []
    if _is_blank(query):
        problems.append(f"{prefix}query must not be empty")
    from ddsedit.methods import get_method, method_names

    if method in method_names() and get_method(method).needs_ref and _is_blank(ref):
        problems.append(f"{prefix}ref must not be empty: {method} needs a description of what the source shows")
    return problems


def check_prompts(method: str, query: object, ref: object, prefix: str = "--") -> None:
    """Raise InputError if :func:`prompt_problems` finds a problem."""
    problems = prompt_problems(method, query, ref, prefix)
    if problems:
        raise InputError(problems[0])


def check_prediction_type(prediction_type: str | None, flag: str = "--prediction-type") -> None:
    """Raise InputError unless ``prediction_type`` is None (the model's own) or one of PREDICTION_TYPES."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InputError(f"{flag} must be {' or '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
