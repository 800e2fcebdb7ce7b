"""What outputs record: only the settings that act, and without importing torch."""

from __future__ import annotations

import subprocess
import sys

from ddsedit.metadata import edit_parameters, webui_parameters
from ddsedit.methods import get_method


def _parameters(method: str, masked: bool = False, **overrides: object) -> dict:
    config = get_method(method).default_config().replace(**overrides)
    return edit_parameters(method, "a red circle", "a blue circle", 7, config, masked=masked)


def test_only_the_settings_that_act_are_recorded() -> None:
    dds = _parameters("dds")
    assert {"steps", "guidance", "lr", "t_min", "t_max", "size", "negative"} <= set(dds)
    assert not {"paste_back", "feather", "cut_weight", "keep_working_size", "save_every"} & set(dds)
    assert {"paste_back", "feather"} <= set(_parameters("masked-dds", masked=True))
    assert "feather" not in _parameters("masked-dds", masked=True, paste_back=False)  # no seam to blend
    ids = _parameters("ids")
    assert ids["cut_weight"] == 0.0 and not {"cut_patches", "cut_patch_sizes", "cut_temperature"} & set(ids)
    assert _parameters("ids", cut_weight=3.0)["cut_patch_sizes"] == [1, 2]
    assert "identity_weight" not in _parameters("ids", identity_steps=0)
    assert _parameters("pds")["pds_grid"] == 500


def test_the_webui_text_names_the_methods_own_settings() -> None:
    parameters = {**_parameters("cds"), "model": "bundled:shapes"}
    text = webui_parameters(parameters, (64, 48))
    assert text.startswith("a blue circle\n") and "Size: 64x48" in text and "Cut weight: 3.0" in text


def test_recording_and_comparing_import_no_torch() -> None:
    code = (
        "import sys\nfrom ddsedit.metadata import edit_parameters\nfrom ddsedit.methods import get_method\n"
        "from ddsedit.batch.plan import Job\n"
        "edit_parameters('ids', 'a', 'b', 1, get_method('ids').default_config())\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
