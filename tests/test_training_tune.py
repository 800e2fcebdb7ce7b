"""The settings grid over the shapes eval."""

from __future__ import annotations

import json

import pytest

from shapes_training import tune


def test_grid_settings_is_every_combination_in_a_stable_order():
    settings = tune.grid_settings({"lr": [0.1, 0.2], "guidance": [7.5]})
    assert settings == [{"guidance": 7.5, "lr": 0.1}, {"guidance": 7.5, "lr": 0.2}]
    assert tune.grid_settings({}) == [{}]


def test_tune_scores_each_setting_and_method(tmp_path, capsys):
    out = tmp_path / "tune.jsonl"
    tune.main(["--model", "shapes", "--cases", "2", "--device", "cpu", "--methods", "dds,sds",
               "--grid", '{"steps": [2], "lr": [0.1, 0.3]}', "--out", str(out)])  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["method"], line["lr"]) for line in lines] == [("dds", 0.1), ("dds", 0.3), ("sds", 0.1), ("sds", 0.3)]
    for line in lines:
        assert line["steps"] == 2 and 0 <= line["recolour_rate"] <= 1 and line["background_change"] >= 0
    assert capsys.readouterr().out.count("\n") == 4


def test_each_method_is_tuned_over_its_own_defaults(tmp_path):
    # One config for every method gave ids cds's CUT weight once: each line records the method's own settings.
    out = tmp_path / "tune.jsonl"
    tune.main(["--model", "shapes", "--cases", "1", "--device", "cpu", "--methods", "cds,ids",
               "--grid", '{"steps": [1], "identity_steps": [2]}', "--out", str(out)])  # fmt: skip
    cds, ids = [json.loads(line) for line in out.read_text().splitlines()]
    assert (cds["method"], cds["cut_weight"]) == ("cds", 10.0)  # the bundled model's own (its ddsedit.json)
    assert (ids["method"], ids["cut_weight"], ids["identity_steps"]) == ("ids", 10.0, 2)
    assert ids["start_at_target"] is False and len(ids["case_iou"]) == 1


def test_an_unknown_method_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--methods", "dds,nope", "--grid", "{}"])
    assert exit_info.value.code == 2
    assert "unknown method nope" in capsys.readouterr().err


def test_each_method_runs_only_over_the_grid_keys_it_reads():
    plan = tune.method_settings(["dds", "pds"], {"pds_grid": [100, 500], "steps": [1, 2]})
    assert plan == [("dds", {"steps": 1}), ("dds", {"steps": 2}),
                    ("pds", {"pds_grid": 100, "steps": 1}), ("pds", {"pds_grid": 100, "steps": 2}),
                    ("pds", {"pds_grid": 500, "steps": 1}), ("pds", {"pds_grid": 500, "steps": 2})]  # fmt: skip
    assert tune.method_settings(["dds"], {"cut_weight": [1.0]}) == "no method of dds reads the grid key 'cut_weight'"


def test_a_grid_key_no_method_reads_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--methods", "dds", "--grid", '{"identity_steps": [1]}'])
    assert exit_info.value.code == 2 and "reads the grid key 'identity_steps'" in capsys.readouterr().err
