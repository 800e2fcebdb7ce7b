"""The torch-free names and input checks shared by the command line, manifests and the editor."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ddsedit.checks import check_prediction_type, check_prompts, prompt_problems
from ddsedit.errors import InputError
from ddsedit.formats import OUTPUT_SUFFIXES, has_output_suffix, output_suffixes_text
from ddsedit.names import PREDICTION_TYPES


def test_the_editing_code_uses_the_shared_names() -> None:
    from ddsedit import scores

    assert scores.PREDICTION_TYPES is PREDICTION_TYPES


def test_checking_input_does_not_import_torch() -> None:
    code = (
        "import sys; import ddsedit.batch, ddsedit.manifest, ddsedit.checks, ddsedit.names, ddsedit.formats, "
        "ddsedit.methods, ddsedit.families, ddsedit.settings, ddsedit.metadata, ddsedit.batch.plan, ddsedit.cli; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_prompt_problems_name_the_column_or_the_flag() -> None:
    assert prompt_problems("dds", "a dog", "a cat") == []
    assert prompt_problems("sds", "a dog", None) == []  # SDS has no ref
    assert prompt_problems("dds", "  ", None) == [
        "query must not be empty",
        "ref must not be empty: dds needs a description of what the source shows",
    ]
    assert prompt_problems("masked-dds", 5, "a cat", prefix="--") == ["--query must not be empty"]
    with pytest.raises(InputError, match="^--ref must not be empty"):
        check_prompts("dds", "a dog", "")


def test_prediction_type_check() -> None:
    for value in (None, *PREDICTION_TYPES):
        check_prediction_type(value)
    with pytest.raises(InputError, match="--prediction-type must be epsilon or v_prediction, got 'sample'"):
        check_prediction_type("sample")


def test_output_suffixes() -> None:
    assert all(has_output_suffix(f"out{suffix.upper()}") for suffix in OUTPUT_SUFFIXES)
    assert not any(has_output_suffix(name) for name in ("out.gif", "out", ".png", "png"))
    assert output_suffixes_text() == ".png, .jpg, .jpeg or .webp"
