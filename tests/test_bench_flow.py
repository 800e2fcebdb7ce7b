"""The FlowEdit benchmark runs end to end on the tiny SD3 and Flux, and its model sizes and FLOP floors are right.

No timing assertions: what is checked is that the benchmark times the edit it says (the batched call's rows split
into the right branches), on the architectures it names (the shipped configs' exact parameter counts), against a
floor that counts what those architectures do (the meta-device count against the transformer's FLOP formula).
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_flow
from ddsedit.families import FAMILIES
from ddsedit.flowgradients import guided_velocities
from ddsedit.flowscores import guided_velocity


@pytest.mark.parametrize(("arch", "rows"), [("tiny-sd3", 4), ("tiny-flux", 2)])
def test_the_benchmark_times_a_two_step_edit_on_the_tiny_models(tmp_path, capsys, arch: str, rows: int) -> None:
    report_path = tmp_path / "flow.json"
    bench_flow.main(["--arch", arch, "--size", "32", "--device", "cpu", "--dtype", "fp32", "--steps", "4",
                     "--n-max", "2", "--warmup", "0", "--repeats", "2", "--json", str(report_path)])  # fmt: skip
    assert f"{arch} 32x32" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert (report["steps"], report["active_steps"], report["rows_per_step"]) == (4, 2, rows)
    assert len(report["seconds_per_edit_runs"]) == 2 and report["seconds_per_edit"] > 0
    assert report["ms_per_step"] == pytest.approx(report["seconds_per_edit"] / 2 * 1000)
    assert report["flops_per_step"] > 0 and report["flops_per_edit"] == 2 * report["flops_per_step"]
    assert report["floor_seconds"] == pytest.approx(report["flops_per_edit"] / (989e12))
    assert report["ratio_to_floor"] == pytest.approx(report["seconds_per_edit"] / report["floor_seconds"])
    assert report["peak_memory_mib"] > 0 and report["transformer_parameters"] > 0 and report["edit_finite"]


def _tiny_transformer(arch_name: str):
    arch = bench_flow.ARCHITECTURES[arch_name]
    model = bench_flow.read_model(arch)
    torch.manual_seed(0)
    transformer = bench_flow.random_transformer(model, torch.device("cpu"), torch.float32)
    prompts = bench_flow.random_prompts(model, 2, torch.Generator().manual_seed(1))
    points = torch.randn((4, model.latent_channels, 8, 8), generator=torch.Generator().manual_seed(2))
    return arch, transformer, prompts, points[:2], points[2:], torch.tensor([0.7, 0.4])


def _velocities(arch_name: str, transformer, prompts, source_points, target_points, times, guidances):
    """The product's batched velocity pair (one call of both branches), on the benchmark's random tiny transformer."""
    arch = bench_flow.ARCHITECTURES[arch_name]
    inputs = bench_flow.edit_inputs(arch, transformer, source_points, prompts, 2)
    branches = [(source_points, inputs.embeddings.source, guidances[0]),
                (target_points, inputs.embeddings.target, guidances[1])]  # fmt: skip
    with torch.no_grad():
        return guided_velocities(inputs, branches, times)


def test_the_sd3_velocity_pair_is_cfg_on_each_branch_from_one_call() -> None:
    arch, transformer, prompts, source_points, target_points, times = _tiny_transformer("tiny-sd3")
    call = FAMILIES["sd3"].function("call_denoiser")
    source, target = _velocities("tiny-sd3", transformer, prompts, source_points, target_points, times, (3.5, 13.5))

    def branch(points, prompt, guidance):  # one image's branch as the pipeline runs it: two rows, then CFG
        unconditional = call(transformer, points, times, prompts["unconditional"])
        return guided_velocity(unconditional, call(transformer, points, times, prompts[prompt]), guidance)

    with torch.no_grad():
        expected_source, expected_target = branch(source_points, "source", 3.5), branch(target_points, "target", 13.5)
    assert torch.allclose(source, expected_source, atol=1e-4) and torch.allclose(target, expected_target, atol=1e-4)
    assert not torch.allclose(source, target, atol=1e-2)


def test_the_flux_velocity_pair_embeds_each_branchs_guidance() -> None:
    arch, transformer, prompts, source_points, target_points, times = _tiny_transformer("tiny-flux")
    call = FAMILIES["flux"].function("call_denoiser")
    source, target = _velocities("tiny-flux", transformer, prompts, source_points, target_points, times, (1.5, 5.5))

    def branch(points, prompt, guidance):  # one branch's own call, its guidance on each of its rows
        rows = prompts[prompt].with_extra({"guidance": torch.full((2,), guidance)})
        return call(transformer, points, times, rows)

    with torch.no_grad():
        expected_source, expected_target = branch(source_points, "source", 1.5), branch(target_points, "target", 5.5)
        # The guidance reaches the model: the target rows under the source's guidance give another velocity.
        unguided_target = branch(target_points, "target", 1.5)
    assert torch.allclose(source, expected_source, atol=1e-4) and torch.allclose(target, expected_target, atol=1e-4)
    assert not torch.allclose(target, unguided_target, atol=1e-4)


# Counted with diffusers 0.42 on the meta device; SD3-medium and FLUX.1-dev as published (2.03 B and 11.9 B).
SHIPPED_PARAMETERS = {"sd3-medium": 2_028_328_000, "flux-dev": 11_901_408_320}


@pytest.mark.parametrize("arch", sorted(SHIPPED_PARAMETERS))
def test_the_shipped_transformer_configs_build_the_published_models(arch: str) -> None:
    model = bench_flow.read_model(bench_flow.ARCHITECTURES[arch])
    transformer = bench_flow.random_transformer(model, torch.device("meta"), torch.bfloat16)
    assert sum(parameter.numel() for parameter in transformer.parameters()) == SHIPPED_PARAMETERS[arch]
    assert all(parameter.dtype == torch.bfloat16 for parameter in transformer.parameters())


def _formula_flops(config: dict, rows: int, image_tokens: int, text_tokens: int) -> float:
    """A dense transformer's forward FLOPs: per layer and token, 2 * 12 w^2 for the linear layers acting on
    every token (q, k, v, the output projection, the 4x MLP), and 4 N w for attention's two matmuls over the
    N = image + text tokens of the joint sequence. Embedders, modulation and SD3's last text block are left out
    (under 1%)."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"] + config.get("num_single_layers", 0)
    tokens = image_tokens + text_tokens
    return rows * layers * (2 * 12 * width**2 * tokens + 4 * tokens**2 * width)


@pytest.mark.parametrize(("arch", "text_tokens"), [("sd3-medium", 77 + 256), ("flux-dev", 512)])
def test_the_flop_floor_counts_the_transformers_matmuls_and_attention(arch: str, text_tokens: int) -> None:
    """On the meta device SDPA decomposes into matmuls that the counter sees: the count is the formula's, at
    512 and at 1024, and so it grows with the image (not quite 4x: the text tokens do not grow)."""
    flow_arch = bench_flow.ARCHITECTURES[arch]
    model = bench_flow.read_model(flow_arch)
    rows = bench_flow.ROWS_PER_IMAGE[flow_arch.family]
    counts = {}
    for size in (512, 1024):
        latent_side = size // model.latent_stride
        counts[size] = bench_flow.count_step_flops(model, flow_arch, 1, latent_side, torch.bfloat16)
        expected = _formula_flops(model.transformer_config, rows, (latent_side // 2) ** 2, text_tokens)
        assert counts[size] == pytest.approx(expected, rel=0.02)
    assert 3.0 < counts[1024] / counts[512] < 4.5
