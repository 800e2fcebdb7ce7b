"""FlowEdit (Kulikov et al., 2025): an inversion-free edit with a rectified-flow model, as an ODE sampler.

A sampler in k-diffusion's sense: it knows nothing of models or prompts. It is given the source latents, the
model's descending sigma schedule and a function that returns, for a batch of source points and target points
at one flow time, the guided velocities under the source prompt and under the target prompt (the caller makes
that one denoiser call of 4K rows). Starting from ``z = x_src`` it integrates

    dz/dt = V(t) = E_eps[ v(z + x_t_src - x_src, query) - v(x_t_src, ref) ],   x_t_src = (1 - t) x_src + t eps,

from ``sigma[T - n_max]`` to ``sigma[T - n_min]`` with Euler steps, each V the mean over ``n_avg`` noises. With
``n_min > 0`` the last ``n_min`` steps sample plainly under the target prompt from the coupled point
``z + x_t_src - x_src`` (the authors' code fails there, their issue #16).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ddsedit import flowscores

# (source points [K, C, h, w], target points [K, C, h, w], flow times [K]) -> (source velocity, target velocity)
VelocityPair = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (points [K, C, h, w], flow times [K]) -> the target prompt's guided velocity
TargetVelocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def draw_noise(generators: Sequence[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """One Gaussian noise per image, each from its own generator (an image gets the same noise alone or batched)."""
    return torch.cat([
        torch.randn((1, *like.shape[1:]), generator=generator, device=like.device, dtype=torch.float32)
        for generator in generators
    ])  # fmt: skip


def flowedit(
    velocities: VelocityPair,
    source_latents: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    n_max: int,
    generators: Sequence[torch.Generator],
    n_avg: int = 1,
    n_min: int = 0,
    target_velocity: TargetVelocity | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """FlowEdit's edited latents (fp32) for ``source_latents`` [K, C, h, w].

    ``sigmas`` is the model's descending schedule of T steps with the trailing 0 (T + 1 values); the edit runs
    over its last ``n_max`` steps, the final ``n_min`` of them as plain sampling with ``target_velocity``.
    Every noise comes from ``generators`` (one per image) in a fixed order, so a seed gives the same edit.
    ``on_step(step, latents)`` is called after each step, counting from 1.

    Raises:
        ValueError: ``n_max`` outside [1, T], ``n_min`` outside [0, n_max), ``n_avg`` < 1, or ``n_min`` > 0 without
            a ``target_velocity``.
    """
    schedule = [float(sigma) for sigma in sigmas]
    steps = len(schedule) - 1
    if not 0 < n_max <= steps:
        raise ValueError(f"n_max must be in [1, {steps}] (the schedule's steps), got {n_max}")
    if not 0 <= n_min < n_max:
        raise ValueError(f"n_min must be in [0, n_max) = [0, {n_max}), got {n_min}")
    if n_avg < 1:
        raise ValueError(f"n_avg must be at least 1, got {n_avg}")
    if n_min > 0 and target_velocity is None:
        raise ValueError("n_min > 0 samples the last steps plainly: a target_velocity is needed")
    source = source_latents.float()
    count = source.shape[0]
    edited = source.clone()
    first, plain_from = steps - n_max, steps - n_min
    for index in range(first, plain_from):
        t, t_next = schedule[index], schedule[index + 1]
        times = torch.full((count,), t, device=source.device, dtype=torch.float32)
        difference = torch.zeros_like(source)
        for _ in range(n_avg):
            source_point = flowscores.flow_noise(source, draw_noise(generators, source), times)
            target_point = flowscores.flowedit_target_point(edited, source_point, source)
            source_velocity, target_velocity_now = velocities(source_point, target_point, times)
            difference += (target_velocity_now.float() - source_velocity.float()) / n_avg
        edited = flowscores.flowedit_step(edited, difference, t, t_next)
        if on_step is not None:
            on_step(index - first + 1, edited)
    if n_min == 0:
        return edited
    assert target_velocity is not None
    t = schedule[plain_from]
    times = torch.full((count,), t, device=source.device, dtype=torch.float32)
    point = flowscores.flowedit_target_point(
        edited, flowscores.flow_noise(source, draw_noise(generators, source), times), source
    )  # the coupled target point at t: from here the target prompt alone carries it to t = 0
    for index in range(plain_from, steps):
        t, t_next = schedule[index], schedule[index + 1]
        times = torch.full((count,), t, device=source.device, dtype=torch.float32)
        point = flowscores.flowedit_step(point, target_velocity(point, times).float(), t, t_next)
        if on_step is not None:
            on_step(index - first + 1, point)
    return point
