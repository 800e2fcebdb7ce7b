"""Errors that the CLI turns into one clear line on stderr and an exit code."""

from __future__ import annotations


class DDSEditError(Exception):
    """A failure the user should see as one line, not a traceback (exit code 1)."""

    exit_code = 1


class InputError(DDSEditError):
    """Bad input from the user: a missing file, a bad number, an empty prompt (exit code 2)."""

    exit_code = 2


class ModelError(DDSEditError):
    """A model that cannot be found or loaded (exit code 1)."""

    exit_code = 1
