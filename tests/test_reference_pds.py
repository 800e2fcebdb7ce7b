"""PDS's posterior and grid against a reference written from the PDS authors' code (Koo et al., 2024).

The reference below is written from reading ``pds/pds.py`` of KAIST-Visual-AI-Group/PDS, in plain
torch on a diffusers scheduler's ``betas``, ``alphas`` and ``alphas_cumprod``: it shares no function
with ``ddsedit.scores``. What that code does, in words:

- it builds ``DDIMScheduler.from_config(<the model's scheduler config>)`` and calls
  ``set_timesteps(500)``; it reverses the timesteps to ascending order, draws one index per sample
  with ``torch.randint(int(500 * 0.02), int(500 * 0.98))`` and takes ``t = timesteps[idx]`` and
  ``t_prev = timesteps[idx - 1]``;
- each branch (target, source) is noised to t with one shared noise, the guided prediction at t
  gives x0hat, the posterior mean is ``c0 * x0hat + c1 * x_t`` with
  ``c0 = sqrt(abar[t_prev]) * betas[t] / (1 - abar[t])`` and
  ``c1 = sqrt(alphas[t]) * (1 - abar[t_prev]) / (1 - abar[t])``, the deviation is
  ``sqrt((1 - abar[t_prev]) / (1 - abar[t]) * betas[t])``, and the branch's value is
  ``(x_prev - mean) / deviation``, x_prev being the branch noised to t_prev with a second shared noise;
- the gradient is the target's value minus the source's, ``nan_to_num``-ed.

``betas[t]`` is one training step's beta even where t_prev is several steps below t; the grid-step
posterior (``alpha = abar[t] / abar[t_prev]``), which ddsedit used before, differs from it except at
spacing 1. The tests check both that ddsedit matches the reference at spacings 1, 2 and 20 and that
the grid-step form does not match at 2 and 20, so that they fail on that form.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler

from ddsedit import pds, scores

SCHEDULER_CONFIG = Path(scores.__file__).parent / "bundled" / "shapes" / "scheduler" / "scheduler_config.json"

# SD's training schedule, spelled out here rather than read from ddsedit.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
               "beta_end": 0.012, "steps_offset": 1, "timestep_spacing": "leading"}  # fmt: skip

# Both sides compute in fp32, as the authors' code does, from the same fp32 schedule. The values are
# (x_prev - mean) / deviation, up to ~400 in size here, with deviations down to ~0.02 (at t = 1); the two
# sides happen to agree bit for bit on this CPU (measured), and the tolerance leaves room for another
# order of the same operations. The grid-step form differs by up to ~50 (spacing 2) and ~400 (spacing 20).
RTOL = 1e-5
ATOL = 1e-5


def _schedule() -> DDIMScheduler:
    return DDIMScheduler.from_config(SD_SCHEDULE)


def _reference_branch(scheduler: Any, x0, epsilon, noise, previous_noise, t, t_prev) -> torch.Tensor:
    """One branch's standardised posterior sample, as the authors' code computes it (t, t_prev: [B] long)."""

    def per_sample(values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, 1, 1, 1)

    beta_t = per_sample(scheduler.betas[t])
    alpha_t = per_sample(scheduler.alphas[t])
    abar_t = per_sample(scheduler.alphas_cumprod[t])
    abar_prev = per_sample(scheduler.alphas_cumprod[t_prev])
    x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise
    x0_hat = (x_t - (1 - abar_t).sqrt() * epsilon) / abar_t.sqrt()
    c0 = abar_prev.sqrt() * beta_t / (1 - abar_t)
    c1 = alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t)
    sigma = ((1 - abar_prev) / (1 - abar_t) * beta_t) ** 0.5
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * previous_noise
    return (x_prev - (c0 * x0_hat + c1 * x_t)) / sigma


def _grid_step_branch(scheduler: Any, x0, epsilon, noise, previous_noise, t, t_prev) -> torch.Tensor:
    """The exact DDPM posterior between t_prev and t (alpha = abar[t] / abar[t_prev]): ddsedit's former form."""
    abar_t = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    abar_prev = scheduler.alphas_cumprod[t_prev].view(-1, 1, 1, 1)
    alpha = abar_t / abar_prev
    x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise
    x0_hat = (x_t - (1 - abar_t).sqrt() * epsilon) / abar_t.sqrt()
    mean = (abar_prev.sqrt() * (1 - alpha) * x0_hat + alpha.sqrt() * (1 - abar_prev) * x_t) / (1 - abar_t)
    sigma = ((1 - abar_prev) / (1 - abar_t) * (1 - alpha)).sqrt()
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * previous_noise
    return (x_prev - mean) / sigma


def _draws(spacing: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Per-sample t (with t - spacing >= 0, across the whole range) and random fp32 tensors."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.cat([torch.tensor([spacing, 999]), torch.randint(spacing, 1000, (4,), generator=generator)])
    tensors = [torch.randn((len(t), 4, 8, 8), generator=generator) for _ in range(6)]
    return t, t - spacing, tensors


def _ddsedit_branch(scheduler: Any, x0, epsilon, noise, previous_noise, t, t_prev) -> torch.Tensor:
    return scores.posterior_noise(x0, epsilon, noise, previous_noise, beta=scheduler.betas[t],
                                  alpha=scheduler.alphas[t], alpha_bar=scheduler.alphas_cumprod[t],
                                  previous_alpha_bar=scheduler.alphas_cumprod[t_prev])  # fmt: skip


@pytest.mark.parametrize("spacing", [1, 2, 20])
def test_posterior_noise_and_the_pds_gradient_match_the_authors_formula(spacing: int) -> None:
    scheduler = _schedule()
    t, t_prev, (target, source, eps_target, eps_source, noise, previous_noise) = _draws(spacing, seed=spacing)
    reference = {name: _reference_branch(scheduler, x0, eps, noise, previous_noise, t, t_prev)
                 for name, x0, eps in (("tgt", target, eps_target), ("src", source, eps_source))}  # fmt: skip
    engine = {name: _ddsedit_branch(scheduler, x0, eps, noise, previous_noise, t, t_prev)
              for name, x0, eps in (("tgt", target, eps_target), ("src", source, eps_source))}  # fmt: skip
    torch.testing.assert_close(engine["tgt"], reference["tgt"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(engine["src"], reference["src"], rtol=RTOL, atol=ATOL)
    reference_gradient = torch.nan_to_num(reference["tgt"] - reference["src"])
    torch.testing.assert_close(scores.pds_gradient(engine["tgt"], engine["src"]), reference_gradient,
                               rtol=RTOL, atol=ATOL)  # fmt: skip


@pytest.mark.parametrize("spacing", [1, 2, 20])
def test_the_grid_step_form_agrees_at_spacing_1_only(spacing: int) -> None:
    """Sanity, and the reason for the change: on a grid of spacing 1 one training step is the grid step."""
    # In fp64, with abar the product of the alphas, so that abar[t] / abar[t - 1] is alphas[t] to ~1e-16:
    # in fp32 that ratio misses a ~1e-3 beta by ~1e-4 relative, which the division by sigma magnifies.
    betas = _schedule().betas.double()
    schedule = SimpleNamespace(betas=betas, alphas=1 - betas, alphas_cumprod=torch.cumprod(1 - betas, 0))
    t, t_prev, tensors = _draws(spacing, seed=10 + spacing)
    target, _, eps_target, _, noise, previous_noise = (tensor.double() for tensor in tensors)
    engine = _ddsedit_branch(schedule, target, eps_target, noise, previous_noise, t, t_prev)
    grid_step = _grid_step_branch(schedule, target, eps_target, noise, previous_noise, t, t_prev)
    if spacing == 1:
        torch.testing.assert_close(engine, grid_step, rtol=1e-8, atol=1e-8)
    else:
        assert float((engine - grid_step).abs().max()) > 100 * ATOL


def test_the_grid_is_the_ddim_schedulers_own() -> None:
    config = json.loads(SCHEDULER_CONFIG.read_text())
    assert (config["steps_offset"], config["timestep_spacing"]) == (1, "leading")
    grid = pds.pds_timesteps(config, 500)
    assert grid.dtype == torch.long
    torch.testing.assert_close(grid, 1 + 2 * torch.arange(500))
    assert pds.pds_index_range(500) == (10, 490)  # int(500 * 0.02), int(500 * 0.98): indices 10..489
    # The authors' steps, spelled out: DDIM scheduler from the config, set_timesteps, reversed.
    authors = DDIMScheduler.from_config(config)
    authors.set_timesteps(500)
    ascending = torch.flip(authors.timesteps, dims=(0,))
    indices = torch.tensor([10, 11, 250, 488, 489])
    t, t_prev = pds.pds_step_pair(grid, indices)
    torch.testing.assert_close(t, ascending[indices])
    torch.testing.assert_close(t_prev, ascending[indices - 1])
    assert t.tolist() == [21, 23, 501, 977, 979] and t_prev.tolist() == [19, 21, 499, 975, 977]


def test_the_grid_follows_the_config_and_the_range_the_step_count() -> None:
    # SD's 1000 training steps, "leading" with offset 1: 50 steps are 1, 21, ..., 981.
    torch.testing.assert_close(pds.pds_timesteps(SD_SCHEDULE, 50), 1 + 20 * torch.arange(50))
    assert pds.pds_index_range(50) == (1, 49)
    assert pds.pds_index_range(500, 0.1, 0.98) == (50, 490)  # the authors' SVG script's t range
    assert pds.pds_index_range(500, 0.0, 1.0) == (1, 500)
    # 20 steps at 2% would draw index 0, whose "previous" step wraps to the largest t in the authors' code.
    with pytest.raises(ValueError, match="previous step"):
        pds.pds_index_range(20)
