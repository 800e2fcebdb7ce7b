"""Settings declared once: their checks of type and range, and the layers of an edit's settings."""

from __future__ import annotations

import math

import pytest

from ddsedit.errors import InputError
from ddsedit.methods import get_method
from ddsedit.settings import EditConfig, cell_value, declared_by_name, parse_text, resolve_config

SHARED = declared_by_name(EditConfig)


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("steps", 2.5, "--steps must be an integer, got 2.5"),
        ("steps", True, "--steps must be an integer, got True"),
        ("steps", 0, "--steps must be in the range [1, 1000000], got 0"),
        ("guidance", "7", "--guidance must be a number, got '7'"),
        ("guidance", math.inf, "--guidance must be in the range [0, 1000], got inf"),
        ("guidance", 1e30, "--guidance must be in the range [0, 1000], got 1e+30"),
        ("lr", 0.0, "--lr must be in the range (0, 1000], got 0"),
        ("negative", 3, "--negative must be text, got 3"),
        ("paste_back", 1, "--paste-back/--no-paste-back must be true or false, got 1"),
    ],
)
def test_a_declared_setting_checks_type_and_range(name: str, value: object, problem: str) -> None:
    assert SHARED[name].problem(value) == problem


def test_values_in_range_pass_and_a_label_replaces_the_flag() -> None:
    assert SHARED["steps"].problem(200) is None and SHARED["guidance"].problem(7) is None  # an int is a number
    assert SHARED["seed"].problem(None) is None  # optional
    assert SHARED["steps"].problem(0, "model/ddsedit.json: steps").startswith("model/ddsedit.json: steps must be")


def test_method_options_check_lists_and_overflowing_values() -> None:
    options = declared_by_name(get_method("cds").options)
    assert options["cut_patch_sizes"].problem((1, 2)) is None
    assert options["cut_patch_sizes"].problem((1, 0)) == "--cut-patch-sizes must be in the range [1, 1024], got 0"
    assert options["cut_weight"].problem(1e38) == "--cut-weight must be in the range [0, 10000], got 1e+38"
    assert options["cut_temperature"].problem(1e-30).startswith("--cut-temperature must be in the range [0.001,")


def test_text_and_cells_are_read_as_the_declared_type() -> None:
    options = declared_by_name(get_method("ids").options)
    assert parse_text(options["cut_patch_sizes"], "1, 2") == (1, 2)
    assert parse_text(SHARED["steps"], "x") is None
    assert cell_value(SHARED["steps"], "12") == (12, None)
    assert cell_value(SHARED["steps"], 12.0) == (12, None)  # a whole number written as a float
    assert cell_value(SHARED["steps"], "2.5") == (None, "steps must be an integer, got '2.5'")
    assert cell_value(options["identity_weight"], "1e9")[1] == (
        "identity_weight must be in the range [0, 1000], got 1e+09"
    )


def test_the_layers_apply_in_order_and_name_their_source() -> None:
    ids = get_method("ids")
    model = {"size": 64, "cut_weight": 2.0, "methods": {"ids": {"cut_weight": 10.0}}}
    config = resolve_config(ids, model, {"steps": 3})
    assert (config.size, config.steps, config.cut_weight, config.identity_steps) == (64, 3, 10.0, 3)
    assert resolve_config(ids, model, {"cut_weight": 1.0}).cut_weight == 1.0  # a flag wins
    assert resolve_config(get_method("dds"), model, {}).size == 64  # cut_weight is skipped: dds does not read it
    for bad, message in (
        ({"methods": {"ids": {"identity_steps": 2.5}}},
         "m/ddsedit.json: methods.ids.identity_steps must be an integer"),
        ({"methods": {"cds": {"cut_weight": "10"}}}, None),  # another method's section is not read for ids
        ({"steps": True}, "m/ddsedit.json: steps must be an integer, got True"),
        ({"stepz": 3}, "m/ddsedit.json: unknown setting 'stepz'"),
        ({"methods": {"ids": {"pds_grid": 100}}}, "m/ddsedit.json: unknown setting methods.ids.'pds_grid'"),
        ({"methods": []}, "m/ddsedit.json: 'methods' must map method names to settings"),
    ):
        if message is None:
            resolve_config(ids, bad, {}, "m/ddsedit.json")
            continue
        with pytest.raises(InputError) as refused:
            resolve_config(ids, bad, {}, "m/ddsedit.json")
        assert str(refused.value).startswith(message), refused.value
    with pytest.raises(InputError, match="dds has no setting 'cut_weight'"):
        resolve_config(get_method("dds"), {}, {"cut_weight": 1.0})


def test_a_method_declares_its_own_defaults_of_shared_settings() -> None:
    pds = get_method("pds").default_config()
    assert (pds.t_min, pds.t_max, pds.pds_grid) == (1, 999, 500)  # the authors' whole 2%-98% range of their grid
    assert (get_method("dds").default_config().t_min, get_method("ids").default_config().cut_weight) == (50, 0.0)


def test_the_config_reads_its_options_and_replace_reaches_them() -> None:
    config = get_method("cds").default_config().replace(cut_weight=5.0, steps=10)
    assert (config.cut_weight, config.options.cut_weight, config.steps) == (5.0, 5.0, 10)
    with pytest.raises(AttributeError, match="no setting 'pds_grid'"):
        _ = config.pds_grid
    with pytest.raises(InputError, match="unknown edit setting"):
        config.replace(pds_grid=100)
