"""The benchmark runs end to end on the tiny model and its three loops agree (no timing assertions)."""

from __future__ import annotations

import json

from benchmarks import bench_dds


def test_benchmark_runs_and_its_batched_loop_agrees_with_its_two_call_loop(tmp_path, capsys) -> None:
    """The benchmark's loops agree: batching and the direct update give the two-call autograd loop's edit.

    The benchmark's "reference" loops are built from ddsedit's own score functions, so this shows
    only that one call of 4 without autograd matches two calls of 2 with autograd SGD, not that
    the math is DDS's; tests/test_reference_dds.py checks the engine against an independent loop.
    """
    report_path = tmp_path / "bench.json"
    bench_dds.main(
        ["--arch", "tiny", "--size", "16", "--device", "cpu", "--dtype", "fp32", "--steps", "3", "--warmup", "1",
         "--json", str(report_path)]
    )  # fmt: skip
    table = capsys.readouterr().out
    assert "reference-2call" in table and "reference-batch4" in table and "ddsedit" in table
    report = json.loads(report_path.read_text())
    loops = {loop["name"]: loop for loop in report["loops"]}
    assert set(loops) == {"reference-2call", "reference-batch4", "ddsedit"}
    # Same t and noise, same fp32 score functions: the engine's batch-of-4 edit equals the two-call loop's.
    assert loops["ddsedit"]["first_gradient_cosine"] > 0.9999
    assert loops["ddsedit"]["final_latent_relative_error"] < 1e-3
    # The autocast reference differs only by half-precision rounding.
    assert loops["reference-batch4"]["first_gradient_cosine"] > 0.8
    assert all(loop["ms_per_step"] > 0 for loop in loops.values())
    assert "speedup_vs_reference-2call" in report["ratios"]


def test_benchmark_records_how_the_engine_ran(tmp_path, capsys) -> None:
    """--cuda-graph runs the fixed-buffer loop (recorded only on CUDA) and it still matches the reference."""
    report_path = tmp_path / "bench.json"
    bench_dds.main(
        ["--arch", "tiny", "--size", "16", "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--warmup", "1",
         "--cuda-graph", "--loops", "reference-2call", "ddsedit", "--json", str(report_path)]
    )  # fmt: skip
    assert "ddsedit loop: cuda-graph" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["engine_options"] == "cuda-graph"
    engine = next(loop for loop in report["loops"] if loop["name"] == "ddsedit")
    assert engine["final_latent_relative_error"] < 1e-3


def test_repeats_report_the_median_run_and_every_runs_ratio(tmp_path, capsys) -> None:
    report_path = tmp_path / "bench.json"
    bench_dds.main(
        ["--arch", "tiny", "--size", "16", "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--warmup", "1",
         "--loops", "reference-2call", "ddsedit", "--repeats", "3", "--json", str(report_path)]
    )  # fmt: skip
    assert "median of 3 runs" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["repeats"] == 3
    runs = report["ratio_runs"]["speedup_vs_reference-2call"]
    assert len(runs) == 3 and min(runs) <= report["ratios"]["speedup_vs_reference-2call"] <= max(runs)


def test_the_new_methods_are_timed_against_dds_in_the_same_run(tmp_path, capsys) -> None:
    report_path = tmp_path / "bench.json"
    bench_dds.main(
        ["--arch", "tiny", "--size", "16", "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--warmup", "1",
         "--loops", "ddsedit", "ddsedit-cds", "ddsedit-pds", "ddsedit-ids", "ddsedit-ids-cut", "--json",
         str(report_path)]
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    assert [loop["name"] for loop in report["loops"]] == ["ddsedit", "ddsedit-cds", "ddsedit-pds", "ddsedit-ids",
                                                          "ddsedit-ids-cut"]  # fmt: skip
    for method in ("cds", "pds", "ids", "ids_cut"):
        assert report["ratios"][f"{method}_step_vs_dds"] > 0
    assert "cds_step_vs_dds" in capsys.readouterr().out


def test_each_method_loop_runs_with_its_own_defaults() -> None:
    # IDS's CUT term is off by default: the plain ids loop must not time it (it once did, through
    # MethodOptions' CDS default), and ids-cut must.
    from ddsedit.optimize import LoopSettings

    base = LoopSettings("dds", 2)
    assert bench_dds.engine_settings("ddsedit", base)[0] == "dds"
    method, ids = bench_dds.engine_settings("ddsedit-ids", base)
    assert (method, ids.method, ids.options.cut_weight) == ("ids", "ids", 0.0)
    method, ids_cut = bench_dds.engine_settings("ddsedit-ids-cut", base)
    assert (method, ids_cut.options.cut_weight, ids_cut.options.identity_steps) == ("ids", 3.0, 3)
    assert bench_dds.engine_settings("ddsedit-cds", base)[1].options.cut_weight == 3.0


def test_the_sdxl_unet_is_benchmarked_with_its_added_conditioning(tmp_path, capsys) -> None:
    """--arch tiny-sdxl: every loop calls the UNet with pooled text and size ids; the engine matches the reference."""
    report_path = tmp_path / "bench.json"
    bench_dds.main(
        ["--arch", "tiny-sdxl", "--size", "16", "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--warmup", "1",
         "--loops", "reference-2call", "ddsedit", "--json", str(report_path)]
    )  # fmt: skip
    assert "tiny-sdxl 16x16" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    engine = next(loop for loop in report["loops"] if loop["name"] == "ddsedit")
    assert engine["first_gradient_cosine"] > 0.9999 and engine["final_latent_relative_error"] < 1e-3


def test_whole_edit_memory_benchmark_runs_on_the_tiny_sdxl(tmp_path, capsys) -> None:
    """bench_memory loads the model as the CLI does (text encoders freed) and runs one edit per setting."""
    from benchmarks import bench_memory

    report_path = tmp_path / "memory.json"
    bench_memory.main(["--arch", "tiny-sdxl", "--size", "32", "--device", "cpu", "--steps", "2",
                       "--json", str(report_path)])  # fmt: skip
    assert "| cpu-offload |" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert [row["setting"] for row in report["results"]] == ["plain", "cpu-offload"]
    assert all(row["peak_mib"] >= row["edit_peak_mib"] > 0 and row["edit_seconds"] > 0 for row in report["results"])
