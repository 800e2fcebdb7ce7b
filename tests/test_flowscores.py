"""The rectified-flow math (ddsedit.flowscores) against slow references written from the papers' formulas."""

from __future__ import annotations

import itertools

import pytest
import torch

from ddsedit import flowscores


def _elementwise(function, *tensors: torch.Tensor) -> torch.Tensor:
    """A reference evaluated one element at a time, in Python floats."""
    out = torch.empty_like(tensors[0])
    for index in itertools.product(*(range(n) for n in tensors[0].shape)):
        out[index] = function(*(float(t[index]) for t in tensors))
    return out


@pytest.fixture
def latents() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64)
            for name in ("z", "source", "noise", "v_target", "v_source")}  # fmt: skip


def test_the_path_runs_from_the_latents_to_the_noise(latents) -> None:
    z, noise = latents["z"], latents["noise"]
    assert torch.equal(flowscores.flow_noise(z, noise, torch.zeros(2)), z)
    assert torch.equal(flowscores.flow_noise(z, noise, torch.ones(2)), noise)
    t = torch.tensor([0.25, 0.9], dtype=torch.float64)
    expected = torch.stack([_elementwise(lambda x, e, s=float(t[k]): (1 - s) * x + s * e, z[k], noise[k])
                            for k in range(2)])  # fmt: skip
    assert torch.allclose(flowscores.flow_noise(z, noise, t), expected, rtol=0, atol=1e-15)


def test_rf_sds_is_zero_for_the_true_velocity(latents) -> None:
    z, noise = latents["z"], latents["noise"]
    assert torch.allclose(flowscores.rf_sds_gradient(noise - z, noise, z), torch.zeros_like(z))


@pytest.mark.parametrize("eta_i", [0.0, 0.3, 1.0])
def test_dvrf_point_and_gradient_follow_the_formulas(latents, eta_i: float) -> None:
    z, source, noise = latents["z"], latents["source"], latents["noise"]
    t = 0.6
    point = flowscores.dvrf_target_point(z, source, noise, torch.full((2,), t, dtype=torch.float64), eta_i)
    expected = _elementwise(lambda zz, xs, e: (1 - t) * zz + t * e + eta_i * t * (zz - xs), z, source, noise)
    assert torch.allclose(point, expected, rtol=0, atol=1e-14)
    gradient = flowscores.dvrf_gradient(latents["v_target"], latents["v_source"], z, source, eta_i)
    expected = _elementwise(lambda vt, vs, zz, xs: vt - vs + (1 - eta_i) * (zz - xs),
                            latents["v_target"], latents["v_source"], z, source)  # fmt: skip
    assert torch.allclose(gradient, expected, rtol=0, atol=1e-14)


def test_dvrf_at_eta_zero_is_the_difference_of_two_rf_sds_gradients(latents) -> None:
    """eta 0 is DDS for velocities: the target's and the source's SDS gradients, whose noises cancel."""
    z, source, noise = latents["z"], latents["source"], latents["noise"]
    v_target, v_source = latents["v_target"], latents["v_source"]
    difference = flowscores.rf_sds_gradient(v_target, noise, z) - flowscores.rf_sds_gradient(v_source, noise, source)
    assert torch.allclose(flowscores.dvrf_gradient(v_target, v_source, z, source, 0.0), difference, atol=1e-14)


def _linear_field(seed: int):
    """A toy velocity model: v(x, prompt) = A_prompt x + b_prompt, different per prompt."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        prompt: (torch.randn(3, 3, generator=generator, dtype=torch.float64) * 0.3,
                 torch.randn(3, 1, 1, generator=generator, dtype=torch.float64))
        for prompt in ("ref", "query")
    }  # fmt: skip

    def velocity(x: torch.Tensor, prompt: str) -> torch.Tensor:
        a, b = weights[prompt]
        return torch.einsum("ij,kjhw->kihw", a, x) + b

    return velocity


def test_dvrf_at_eta_one_with_flowedits_step_sizes_takes_flowedits_steps(latents) -> None:
    velocity = _linear_field(1)
    source = latents["source"]
    sigmas = [1.0, 0.8, 0.55, 0.3, 0.1, 0.0]
    generator = torch.Generator().manual_seed(5)
    noises = [torch.randn(source.shape, generator=generator, dtype=torch.float64) for _ in sigmas[:-1]]

    flowedit = source.clone()  # FlowEdit, written from its paper's loop
    for i, t in enumerate(sigmas[:-1]):
        source_point = (1 - t) * source + t * noises[i]
        target_point = flowedit + source_point - source
        v_delta = velocity(target_point, "query") - velocity(source_point, "ref")
        flowedit = flowedit + (sigmas[i + 1] - t) * v_delta

    dvrf = source.clone()  # DVRF with eta_i = 1 at every step, SGD with lr = t - t_next
    for i, t in enumerate(sigmas[:-1]):
        times = torch.full((source.shape[0],), t, dtype=torch.float64)
        source_point = flowscores.flow_noise(source, noises[i], times)
        target_point = flowscores.dvrf_target_point(dvrf, source, noises[i], times, 1.0)
        gradient = flowscores.dvrf_gradient(velocity(target_point, "query"), velocity(source_point, "ref"), dvrf,
                                            source, 1.0)  # fmt: skip
        dvrf = dvrf - (t - sigmas[i + 1]) * gradient
        coupled = flowscores.flowedit_step(dvrf + (t - sigmas[i + 1]) * gradient, gradient, t, sigmas[i + 1])
        assert torch.allclose(coupled, dvrf, atol=1e-14)
    assert torch.allclose(dvrf, flowedit, rtol=0, atol=1e-12)
    assert not torch.allclose(dvrf, source)  # it moved


def test_flowedit_target_point_is_the_edit_carried_on_the_source_path(latents) -> None:
    z, source, noise = latents["z"], latents["source"], latents["noise"]
    times = torch.full((2,), 0.4, dtype=torch.float64)
    source_point = flowscores.flow_noise(source, noise, times)
    assert torch.allclose(flowscores.flowedit_target_point(z, source_point, source),
                          flowscores.dvrf_target_point(z, source, noise, times, 1.0), atol=1e-14)  # fmt: skip


def test_dvrf_learning_rates_follow_the_hump_with_tail() -> None:
    sigmas = [1 - i / 50 for i in range(50)] + [0.0]  # a linear 50-step schedule and the trailing 0
    rates = flowscores.dvrf_learning_rates(sigmas, 50)
    assert len(rates) == 50
    alpha_t = (sigmas[48] - sigmas[49]) / 1.6
    peak, tail, span = alpha_t / 1.6, alpha_t / 4, 78
    for i in range(50):
        x = i / (span - 1)
        mode = 9 / 16  # (a - 1) / (a + b - 2) for a = 10, b = 8
        hump = (peak - tail) * (x**9 * (1 - x) ** 7) / (mode**9 * (1 - mode) ** 7)
        assert rates[i] == pytest.approx(2.2 * (hump + tail * x), rel=1e-12)
    assert rates[0] == 0.0 and rates[-1] > rates[25] > 0  # the edit ends before the hump's top plus tail


def test_the_hump_peaks_at_its_height_and_refuses_bad_steps() -> None:
    values = [flowscores.lr_hump(k, 15, 2.0, (3.0, 6.0)) for k in range(1, 16)]
    assert max(values) == pytest.approx(2.0, rel=1e-12)  # the mode (a-1)/(a+b-2) = 2/7 falls on step 5 of 15
    with pytest.raises(ValueError):
        flowscores.lr_hump(0, 17, 2.0, (3.0, 6.0))
    assert list(flowscores.flowedit_active_steps(50, 33)) == list(range(17, 50))
    with pytest.raises(ValueError):
        flowscores.flowedit_active_steps(28, 29)
