"""The math of editing with rectified-flow models (SD3, Flux), as pure functions on latents and velocities.

The flow counterpart of :mod:`ddsedit.scores`. Notation of the FlowEdit (Kulikov et al., 2025) and DVRF
(Delta Velocity Rectified Flow, arXiv 2509.05342) papers: ``x`` clean latents, ``t`` in [0, 1] the flow time
(the scheduler's sigma), ``eps`` Gaussian noise, ``x_t = (1 - t) x + t eps`` the point on the straight path, and
a velocity model predicts ``v(x_t) ~ eps - x``, the path's direction. ``z`` is the latent being edited and
``x_src`` the source's.

- Rectified-flow SDS: ``v(x_t, query) - (eps - x)``, the predicted minus the true direction of the path.
- DVRF (``dds`` on a flow model): the target branch is noised on a path shifted towards the edit,
  ``z_t = (1 - t) z + t eps + eta_i t (z - x_src)``; the gradient is
  ``v(z_t, query) - v(x_t_src, ref) + (1 - eta_i)(z - x_src)``. With ``eta_i = 0`` it is DDS written for
  velocities (the difference of two rectified-flow SDS gradients: the noises cancel); with ``eta_i = 1`` the
  target point is FlowEdit's and the gradient its velocity difference.
- FlowEdit: an ODE over the model's descending sigmas, ``z += (t_next - t) V`` with
  ``V = v(z + x_t_src - x_src, query) - v(x_t_src, ref)``, from ``z = x_src``.
"""

from __future__ import annotations

import torch

# DVRF's learning-rate schedule for SD3 (its authors' settings): a beta-shaped hump with a linear tail, whose
# height is set by the last step of the sigma schedule.
DVRF_LR_SCALE = 2.2
DVRF_LR_EXTRA_STEPS = 28  # the hump is laid over T + 28 steps, so the edit stops before its tail's end
DVRF_LR_SHAPE = (10.0, 8.0)  # the beta density's (a, b)
DVRF_LAST_STEP_DIVISOR = 1.6  # alpha_T = (sigma[T-2] - sigma[T-1]) / 1.6
DVRF_PEAK_DIVISOR = 1.6  # alpha_max = alpha_T / 1.6
DVRF_TAIL_DIVISOR = 4.0  # the tail's slope beta = alpha_T / 4


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[K] values broadcast over the latents' [K, C, h, w] (a plain number passes through)."""
    if not isinstance(values, torch.Tensor) or values.ndim == 0:
        return values
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def flow_noise(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x + t eps``: the point at time ``t`` on the straight path from the latents to the noise."""
    t = _per_row(t, latents)
    return (1.0 - t) * latents + t * noise


def guided_velocity(unconditional: torch.Tensor, conditional: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance on velocities, as the SD3 pipeline applies it: ``u + w (c - u)``."""
    return unconditional + guidance * (conditional - unconditional)


def rf_sds_gradient(velocity: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Rectified-flow SDS: the guided velocity minus the path's true direction ``eps - x``."""
    return velocity - (noise - latents)


def dvrf_eta(eta: float, step: int, steps: int) -> float:
    """DVRF's ``eta_i = eta * i / T`` at step ``i`` (0-based) of ``T``: the shift grows over the edit."""
    return eta * step / steps


def dvrf_target_point(latents: torch.Tensor, source_latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      eta_i: float) -> torch.Tensor:  # fmt: skip
    """DVRF's target branch point ``z_t = (1 - t) z + t eps + eta_i t (z - x_src)``."""
    return flow_noise(latents, noise, t) + eta_i * _per_row(t, latents) * (latents - source_latents)


def dvrf_gradient(target_velocity: torch.Tensor, source_velocity: torch.Tensor, latents: torch.Tensor,
                  source_latents: torch.Tensor, eta_i: float) -> torch.Tensor:  # fmt: skip
    """DVRF's gradient ``v_tgt - v_src + (1 - eta_i)(z - x_src)``; an SGD step moves ``z`` against it."""
    return target_velocity - source_velocity + (1.0 - eta_i) * (latents - source_latents)


def flowedit_target_point(latents: torch.Tensor, source_point: torch.Tensor,
                          source_latents: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """FlowEdit's coupled target point ``z + x_t_src - x_src``: the edit carried along the source's noisy path."""
    return latents + source_point - source_latents


def flowedit_step(latents: torch.Tensor, velocity_difference: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Euler step of FlowEdit's ODE from ``t`` to ``t_next`` (< t): ``z + (t_next - t) V``."""
    return latents + (t_next - t) * velocity_difference


def lr_hump(step: int, steps: int, peak: float, shape: tuple[float, float]) -> float:
    """A beta density's hump over steps 1..``steps``, scaled so that its maximum is ``peak``."""
    if not 1 <= step <= steps or steps < 2:
        raise ValueError(f"step must be in [1, {steps}] with at least 2 steps, got {step}")
    a, b = shape
    x = (step - 1) / (steps - 1)
    mode = (a - 1) / (a + b - 2)
    density = x ** (a - 1) * (1 - x) ** (b - 1)
    return peak * density / (mode ** (a - 1) * (1 - mode) ** (b - 1))


def lr_hump_with_tail(step: int, steps: int, peak: float, tail: float, shape: tuple[float, float]) -> float:
    """The hump of height ``peak - tail`` plus a linear tail rising to ``tail`` at the last step."""
    return lr_hump(step, steps, peak - tail, shape) + tail * (step - 1) / (steps - 1)


def dvrf_learning_rates(sigmas: torch.Tensor | list[float], steps: int) -> list[float]:
    """DVRF's step size at each index of a descending schedule of ``steps`` sigmas (its SD3 setting; a trailing
    0, as schedulers append, is ignored).

    The scale comes from the schedule's last interval, ``alpha_T = (sigma[T-2] - sigma[T-1]) / 1.6``; index ``i``
    gets ``2.2 * hump_with_tail(i + 1, T + 28, alpha_T / 1.6, alpha_T / 4, a=10, b=8)``.
    """
    values = [float(s) for s in sigmas][:steps]
    if len(values) < 2:
        raise ValueError("DVRF's learning rates need a schedule of at least 2 steps")
    last_interval = (values[-2] - values[-1]) / DVRF_LAST_STEP_DIVISOR
    peak, tail = last_interval / DVRF_PEAK_DIVISOR, last_interval / DVRF_TAIL_DIVISOR
    span = steps + DVRF_LR_EXTRA_STEPS
    return [DVRF_LR_SCALE * lr_hump_with_tail(i + 1, span, peak, tail, DVRF_LR_SHAPE) for i in range(steps)]


def flowedit_active_steps(steps: int, n_max: int) -> range:
    """The indices of the descending schedule FlowEdit integrates over: it skips the first ``steps - n_max``."""
    if not 0 < n_max <= steps:
        raise ValueError(f"n_max must be in [1, {steps}], got {n_max}")
    return range(steps - n_max, steps)

