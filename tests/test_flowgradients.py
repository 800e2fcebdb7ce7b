"""The flow methods' gradients and the loop on a flow schedule, against slow references written from the formulas
(issue #22): x_t = (1 - t) x + t eps; DVRF's z_t = (1 - t) z + t eps + eta_i t (z - x_src) and gradient
v(z_t, query, w_tgt) - v(x_t_src, ref, w_src) + (1 - eta_i)(z - x_src); rectified-flow SDS v(x_t, query) - (eps - x);
FlowEdit z += (t_next - t)(v(z + x_t_src - x_src, query) - v(x_t_src, ref)). A toy velocity model stands in for the
transformer: each reference calls it once per branch and prompt, unbatched."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ddsedit import flowgradients
from ddsedit.conditioning import Conditioning
from ddsedit.flowscores import dvrf_learning_rates
from ddsedit.gradients import GradientInputs, PromptEmbeddings, StepDraws
from ddsedit.methods import DeltaVelocityOptions, FlowEditOptions
from ddsedit.optimize import LoopSettings, distill

SHAPE = (2, 4, 6, 8)


def toy_call(model: object, latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
    """A velocity that depends on the point, the time, the prompt and (when given) the guidance input, per row."""
    prompt = conditioning.hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    guidance = conditioning.extra.get("guidance")
    embedded = 1.0 if guidance is None else 1.0 + 0.1 * guidance.reshape(-1, 1, 1, 1)
    t = times.reshape(-1, 1, 1, 1)
    return torch.tanh(latents) * prompt * embedded + t * latents.roll(1, dims=-1) - 0.3 * latents


def _prompts() -> PromptEmbeddings:
    generator = torch.Generator().manual_seed(0)

    def rows() -> Conditioning:
        return Conditioning(torch.randn(SHAPE[0], 3, 5, generator=generator))

    return PromptEmbeddings(unconditional=rows(), source=rows(), target=rows())


def _inputs(options: object, true_cfg: bool, guidance: float = 4.0) -> GradientInputs:
    source = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    return GradientInputs(None, source, _prompts(), None, "velocity", guidance, options, [], toy_call,
                          true_cfg=true_cfg)  # fmt: skip


def reference_velocity(points: torch.Tensor, times: torch.Tensor, prompt: Conditioning,
                       unconditional: Conditioning, scale: float, true_cfg: bool) -> torch.Tensor:  # fmt: skip
    """One branch's guided velocity, row by row: u + w (c - u) with true CFG, else c with the scale as its input."""
    rows = []
    for index in range(points.shape[0]):
        point, time = points[index : index + 1], times[index : index + 1]
        if true_cfg:
            conditional = toy_call(None, point, time, prompt.rows(index, index + 1))
            plain = toy_call(None, point, time, unconditional.rows(index, index + 1))
            rows.append(plain + scale * (conditional - plain))
        else:
            row = prompt.rows(index, index + 1).with_extra({"guidance": torch.tensor([scale])})
            rows.append(toy_call(None, point, time, row))
    return torch.cat(rows)


@pytest.mark.parametrize("true_cfg", [True, False])
def test_the_dvrf_gradient_equals_the_formula(true_cfg: bool) -> None:
    inputs = _inputs(DeltaVelocityOptions(source_guidance=2.0, eta=1.0), true_cfg)
    generator = torch.Generator().manual_seed(5)
    latents = inputs.source_latents + 0.5 * torch.randn(SHAPE, generator=generator)
    noise = torch.randn(SHAPE, generator=generator)
    times, eta = torch.tensor([0.7, 0.3]), torch.tensor([0.25, 0.6])
    draws = StepDraws(times, noise, {"eta": eta, "step_size": torch.ones(2)})

    gradient = flowgradients.dvrf(inputs, latents, draws)

    t, eta_i, source = times.reshape(-1, 1, 1, 1), eta.reshape(-1, 1, 1, 1), inputs.source_latents
    source_point = (1 - t) * source + t * noise
    target_point = (1 - t) * latents + t * noise + eta_i * t * (latents - source)
    embeddings = inputs.embeddings
    source_velocity = reference_velocity(source_point, times, embeddings.source, embeddings.unconditional, 2.0,
                                         true_cfg)  # fmt: skip
    target_velocity = reference_velocity(target_point, times, embeddings.target, embeddings.unconditional, 4.0,
                                         true_cfg)  # fmt: skip
    expected = target_velocity - source_velocity + (1 - eta_i) * (latents - source)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("true_cfg", [True, False])
def test_the_rectified_flow_sds_gradient_equals_the_formula(true_cfg: bool) -> None:
    inputs = _inputs(None, true_cfg)
    generator = torch.Generator().manual_seed(6)
    latents, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    times = torch.tensor([0.9, 0.4])
    gradient = flowgradients.rf_sds(inputs, latents, StepDraws(times, noise))
    t = times.reshape(-1, 1, 1, 1)
    velocity = reference_velocity((1 - t) * latents + t * noise, times, inputs.embeddings.target,
                                  inputs.embeddings.unconditional, 4.0, true_cfg)  # fmt: skip
    torch.testing.assert_close(gradient, velocity - (noise - latents), rtol=1e-5, atol=1e-6)


def _sigmas(steps: int) -> torch.Tensor:
    """A descending schedule with a shift, as SD3's (shift 3), and the trailing 0."""
    plain = torch.linspace(1.0, 1.0 / steps, steps)
    return torch.cat([3 * plain / (1 + 2 * plain), torch.zeros(1)])


@pytest.mark.parametrize("true_cfg", [True, False])
def test_dvrf_at_eta_1_with_flowedits_step_sizes_takes_flowedits_steps(true_cfg: bool) -> None:
    """Each DVRF step at eta_i = 1, sized t - t_next, is FlowEdit's Euler step on the same noise."""
    steps, n_max = 10, 7
    sigmas = _sigmas(steps)
    options = FlowEditOptions(source_guidance=2.0, n_max=n_max)
    inputs = _inputs(options, true_cfg)
    seeds = [11, 12]
    flowedit = flowgradients.flowedit_edit(
        inputs, flowgradients.FlowSchedule(sigmas, torch.ones(steps)), [torch.Generator().manual_seed(s) for s in seeds]
    )  # fmt: skip

    dvrf_inputs = dataclasses.replace(inputs, options=DeltaVelocityOptions(source_guidance=2.0, eta=1.0))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = inputs.source_latents.clone()
    for index in range(steps - n_max, steps):
        t, t_next = float(sigmas[index]), float(sigmas[index + 1])
        noise = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in generators])
        draws = StepDraws(torch.full((2,), t), noise, {"eta": torch.ones(2)})
        latents = latents - (t - t_next) * flowgradients.dvrf(dvrf_inputs, latents, draws)
    torch.testing.assert_close(flowedit, latents, rtol=1e-5, atol=1e-6)


def test_flowedit_with_a_mask_keeps_the_source_outside_it() -> None:
    steps = 6
    inputs = _inputs(FlowEditOptions(n_max=5), True)
    mask = torch.zeros(1, 1, *SHAPE[2:])
    mask[..., :3] = 1
    edited = flowgradients.flowedit_edit(inputs, flowgradients.FlowSchedule(_sigmas(steps), torch.ones(steps)),
                                         [torch.Generator().manual_seed(s) for s in (1, 2)], mask=mask)  # fmt: skip
    assert torch.equal(edited[..., 3:], inputs.source_latents[..., 3:])
    assert not torch.allclose(edited[..., :3], inputs.source_latents[..., :3])


@pytest.mark.parametrize("method", ["dds", "sds"])
def test_the_loop_on_a_flow_schedule_equals_a_loop_written_from_the_formulas(method: str) -> None:
    """Step i: t = sigma_i, one noise per image from its generator, eta_i = eta * i / T, DVRF's step size times
    lr, z -= size * gradient."""
    steps, eta, lr, guidance, source_guidance = 6, 0.8, 1.5, 4.0, 2.0
    sigmas = _sigmas(steps)
    options = DeltaVelocityOptions(source_guidance=source_guidance, eta=eta) if method == "dds" else None
    source = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    embeddings, seeds = _prompts(), [3, 4]
    settings = LoopSettings(method, steps, guidance, lr, options=options)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    ours = distill(None, source, embeddings, None, "velocity", settings, generators, call=toy_call,
                   flow_schedule=flowgradients.flow_schedule(sigmas, lr))  # fmt: skip

    sizes = [lr * size for size in dvrf_learning_rates(sigmas, steps)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = source.clone()
    for index in range(steps):
        t = float(sigmas[index])
        times = torch.full((2,), t)
        noise = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in generators])
        if method == "sds":
            velocity = reference_velocity((1 - t) * latents + t * noise, times, embeddings.target,
                                          embeddings.unconditional, guidance, True)  # fmt: skip
            gradient = velocity - (noise - latents)
        else:
            eta_i = eta * index / steps
            target_point = (1 - t) * latents + t * noise + eta_i * t * (latents - source)
            gradient = (
                reference_velocity(target_point, times, embeddings.target, embeddings.unconditional, guidance, True)
                - reference_velocity((1 - t) * source + t * noise, times, embeddings.source, embeddings.unconditional,
                                     source_guidance, True)
                + (1 - eta_i) * (latents - source)
            )  # fmt: skip
        latents = latents - sizes[index] * gradient
    torch.testing.assert_close(ours, latents, rtol=1e-5, atol=1e-5)


def test_the_flow_draws_follow_each_images_generator() -> None:
    """An image draws the same noise alone or in a batch; the step's time and size are the schedule's."""
    schedule = flowgradients.flow_schedule(_sigmas(5), 2.0)
    batch = flowgradients.draw_flow_step([torch.Generator().manual_seed(s) for s in (7, 8)], schedule, (1, 4, 6, 8),
                                         torch.device("cpu"), 2, eta=1.0)  # fmt: skip
    alone = flowgradients.draw_flow_step([torch.Generator().manual_seed(8)], schedule, (1, 4, 6, 8),
                                         torch.device("cpu"), 2, eta=1.0)  # fmt: skip
    assert torch.equal(batch.noise[1:], alone.noise)
    assert torch.equal(batch.timesteps, schedule.sigmas[2].expand(2))
    assert torch.equal(batch.extra["step_size"], schedule.step_sizes[2].expand(2))
    assert torch.allclose(batch.extra["eta"], torch.full((2,), 2 / 5))
