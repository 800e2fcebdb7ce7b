"""Errors that the CLI turns into one clear line on stderr and an exit code."""

from __future__ import annotations


class DDSEditError(Exception):
    """A failure the user should see as one line, not a traceback (exit code 1)."""

    exit_code = 1


class InputError(DDSEditError):
    """Bad input from the user: a missing file, a bad number, an empty prompt (exit code 2)."""

    exit_code = 2


class ModelError(DDSEditError):
    """The model the user named cannot be used: not found, not a model, incomplete or unreadable (exit code 2).

    One rule whatever the reason, so that a script can tell "fix the --model you gave" (2) from a
    failure while editing (1).
    """

    exit_code = 2
