"""The edit methods on rectified-flow models (SD3, Flux): the denoiser calls each needs, then the math of
:mod:`ddsedit.flowscores`. The velocity counterpart of :mod:`ddsedit.gradients`.

Every flow method walks the model's own descending sigma schedule (the pipeline's, for the working size), one
step per entry, rather than drawing random timesteps: DVRF and FlowEdit are defined on it. The draws of step ``i``
(:func:`draw_flow_step`) are its flow time ``sigma_i`` and one noise per image, with DVRF's step size and its
``eta_i``; the loop of :mod:`ddsedit.optimize` then moves the latents by ``step_size * gradient``.

- ``sds``: rectified-flow SDS, ``v(x_t, query) - (eps - x)``.
- ``dds`` (and ``masked-dds``): DVRF, ``v(z_t, query) - v(x_t_src, ref) + (1 - eta_i)(z - x_src)`` with the target
  point shifted by ``eta_i t (z - x_src)``; eta 0 is DDS written for velocities.
- ``flowedit``: not a loop of gradient steps but an ODE sampler (:func:`flowedit_edit` runs
  :func:`ddsedit.flowedit.flowedit` on this module's velocity calls).

Guidance: SD3 guides each branch with its own scale by a second, unconditional call (``--source-guidance`` for the
source branch, ``--guidance`` for the target's); Flux.1 dev takes the scale as an input of one conditional call
(its guidance embedding), and Flux.1 schnell takes none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddsedit import flowedit, flowscores
from ddsedit.conditioning import Conditioning
from ddsedit.gradients import GradientInputs, StepDraws


@dataclass
class FlowSchedule:
    """An edit's walk down the flow schedule: the sigmas (descending, T + 1 values ending at 0) and each step's
    size (DVRF's schedule times ``--lr``)."""

    sigmas: torch.Tensor  # [T + 1], fp32
    step_sizes: torch.Tensor  # [T], fp32

    @property
    def steps(self) -> int:
        return int(self.step_sizes.shape[0])


def flow_schedule(sigmas: torch.Tensor, lr: float) -> FlowSchedule:
    """The schedule of an edit over ``sigmas`` (T + 1 values): DVRF's step size at each index, scaled by ``lr``."""
    steps = int(sigmas.shape[0]) - 1
    sizes = flowscores.dvrf_learning_rates(sigmas, steps) if steps >= 2 else [1.0] * steps
    return FlowSchedule(sigmas.float(), lr * torch.tensor(sizes, dtype=torch.float32))


def draw_flow_step(
    generators: list[torch.Generator], schedule: FlowSchedule, image_shape: tuple[int, ...], device: torch.device,
    step: int, eta: float = 0.0,
) -> StepDraws:  # fmt: skip
    """Step ``step``'s draws (0-based): its flow time and one noise per image from the image's own generator, and,
    in ``extra``, the step size and DVRF's ``eta_i = eta * i / T`` (one row per image: a batch steps as one)."""
    count = len(generators)
    noise = torch.cat([
        torch.randn(image_shape, generator=generator, device=device, dtype=torch.float32) for generator in generators
    ])  # fmt: skip
    times = schedule.sigmas[step].to(device).expand(count).clone()
    extra = {
        "step_size": schedule.step_sizes[step].to(device).expand(count).clone(),
        "eta": torch.full((count,), flowscores.dvrf_eta(eta, step, schedule.steps), device=device),
    }
    return StepDraws(times, noise, extra)


def guided_velocities(
    inputs: GradientInputs, branches: list[tuple[torch.Tensor, Conditioning, float]], times: torch.Tensor
) -> list[torch.Tensor]:
    """The guided velocities of several (points, conditioning, guidance scale) branches in ONE denoiser call, fp32.

    With true CFG (SD3) the batch is [uncond, cond] per branch, each branch guided with its own scale, as the
    FlowEdit and DVRF authors batch source and target; otherwise (Flux) one conditional row per branch, its scale
    given as ``extra["guidance"]`` (ignored by a model without a guidance embedding).
    """
    count = len(times)
    if inputs.true_cfg:
        batch = torch.cat([points for points, _, _ in branches for points in (points, points)])
        conditions = Conditioning.cat(
            [row for _, condition, _ in branches for row in (inputs.embeddings.unconditional, condition)]
        )
        velocity = inputs.call(inputs.unet, batch, times.repeat(2 * len(branches)), conditions).float()
        chunks = velocity.chunk(2 * len(branches))
        return [
            flowscores.guided_velocity(chunks[2 * index], chunks[2 * index + 1], scale)
            for index, (_, _, scale) in enumerate(branches)
        ]
    batch = torch.cat([points for points, _, _ in branches])
    conditions = Conditioning.cat([
        condition.with_extra({"guidance": torch.full((count,), float(scale), device=batch.device)})
        for _, condition, scale in branches
    ])  # fmt: skip
    velocity = inputs.call(inputs.unet, batch, times.repeat(len(branches)), conditions).float()
    return list(velocity.chunk(len(branches)))


def _source_guidance(inputs: GradientInputs) -> float:
    return float(inputs.options.source_guidance)


def rf_sds(inputs: GradientInputs, latents: torch.Tensor, draws: StepDraws) -> torch.Tensor:
    """Rectified-flow SDS: one call of the target branch (2K rows with true CFG, K without)."""
    points = flowscores.flow_noise(latents, draws.noise, draws.timesteps)
    (velocity,) = guided_velocities(inputs, [(points, inputs.embeddings.target, inputs.guidance)], draws.timesteps)
    return flowscores.rf_sds_gradient(velocity, draws.noise, latents)


def dvrf(inputs: GradientInputs, latents: torch.Tensor, draws: StepDraws) -> torch.Tensor:
    """DVRF: one call of both branches sharing the step's time and noise; ``eta_i`` is the step's draw."""
    eta_i = draws.extra["eta"].reshape(-1, *([1] * (latents.ndim - 1)))
    source_points = flowscores.flow_noise(inputs.source_latents, draws.noise, draws.timesteps)
    target_points = flowscores.dvrf_target_point(latents, inputs.source_latents, draws.noise, draws.timesteps, eta_i)
    source_velocity, target_velocity = guided_velocities(
        inputs,
        [(source_points, inputs.embeddings.source, _source_guidance(inputs)),
         (target_points, inputs.embeddings.target, inputs.guidance)],
        draws.timesteps,
    )  # fmt: skip
    return flowscores.dvrf_gradient(target_velocity, source_velocity, latents, inputs.source_latents, eta_i)


def flowedit_edit(
    inputs: GradientInputs,
    schedule: FlowSchedule,
    generators: list[torch.Generator],
    mask: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """FlowEdit over ``schedule``'s sigmas with the options' ``n_max``, ``n_avg`` and ``n_min``: the edited latents.

    A ``mask`` scales each step's velocity difference, so that outside it the latents stay the source's.
    """
    options = inputs.options

    def velocities(source_points: torch.Tensor, target_points: torch.Tensor,
                   times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        source_velocity, target_velocity = guided_velocities(
            inputs,
            [(source_points, inputs.embeddings.source, _source_guidance(inputs)),
             (target_points, inputs.embeddings.target, inputs.guidance)],
            times,
        )  # fmt: skip
        if mask is None:
            return source_velocity, target_velocity
        return source_velocity, source_velocity + mask * (target_velocity - source_velocity)

    def target_velocity(points: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        (velocity,) = guided_velocities(inputs, [(points, inputs.embeddings.target, inputs.guidance)], times)
        return velocity

    return flowedit.flowedit(
        velocities, inputs.source_latents, schedule.sigmas, options.n_max, generators, n_avg=options.n_avg,
        n_min=options.n_min, target_velocity=target_velocity, on_step=on_step,
    )  # fmt: skip
