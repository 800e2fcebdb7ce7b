"""PDS's timestep grid and draws, as the PDS authors' code sets them up (Koo et al., 2024).

The authors' ``pds/pds.py`` (KAIST-Visual-AI-Group/PDS) builds a ``DDIMScheduler`` from the
model's scheduler config, calls ``set_timesteps(500)``, reverses the result to ascending order,
draws an index per sample between 2% and 98% of the grid's length, and takes t at that index
and t_prev at the index before it. These functions give the same grid, range and pairs; the
posterior between t and t_prev is :func:`ddsedit.scores.posterior_noise`. Nothing here touches
a model, a file or a device choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDIMScheduler

GRID_STEPS = 500  # the authors' num_inference_steps
MIN_STEP_RATIO = 0.02  # the authors' min_step_ratio: the lowest index drawn, as a fraction of the grid
MAX_STEP_RATIO = 0.98  # the authors' max_step_ratio: the end (exclusive) of the indices drawn


def pds_timesteps(scheduler_config: Mapping[str, Any], grid_steps: int = GRID_STEPS) -> torch.Tensor:
    """The grid t and t_prev come from: ``grid_steps`` training timesteps, ascending, int64 [grid_steps].

    It is diffusers' own ``DDIMScheduler.set_timesteps``, on a DDIM scheduler built from the
    model's config, as the authors build it, so that the spacing (``timestep_spacing``) and the
    ``steps_offset`` are the config's: for SD 1.5's config ("leading", offset 1) and 500 steps it
    is t = 1 + 2k, k = 0..499. The class matters: SD 1.5 ships a PNDM scheduler, whose own
    ``set_timesteps`` repeats some timesteps; DDIM's (and DDPM's) give evenly spaced, distinct
    ones. The authors' pinned diffusers 0.17.1 had no ``timestep_spacing`` and always spaced
    "leading"; a config asking for another spacing gets it here, as the installed diffusers does.
    """
    scheduler = DDIMScheduler.from_config(dict(scheduler_config))
    scheduler.set_timesteps(grid_steps)
    return scheduler.timesteps.flip(0)  # the authors' reversed(...): ascending


def pds_index_range(
    grid_steps: int, min_step_ratio: float = MIN_STEP_RATIO, max_step_ratio: float = MAX_STEP_RATIO
) -> tuple[int, int]:
    """``(low, high)``: the grid indices drawn are ``low, ..., high - 1``, uniformly (``torch.randint(low, high)``).

    Computed as the authors do: ``low = int(grid_steps * min_step_ratio)`` (1 when the ratio is
    <= 0), ``high = int(grid_steps * max_step_ratio)`` (``grid_steps`` when the ratio is >= 1), both
    truncated, and ``high`` at least ``low + 1``. For 500 steps: indices 10..489. An index of 0
    has no previous grid point: the authors' ``timesteps[idx - 1]`` would then wrap to the largest
    t, so a range that reaches index 0 (e.g. 20 steps at 2%: int(0.4) = 0) is refused here.
    """
    low = 1 if min_step_ratio <= 0 else int(grid_steps * min_step_ratio)
    high = grid_steps if max_step_ratio >= 1 else int(grid_steps * max_step_ratio)
    high = max(high, low + 1)
    if low < 1 or high > grid_steps:
        raise ValueError(
            f"PDS's grid indices [{low}, {high}) must lie in [1, {grid_steps}): index 0 has no previous step "
            f"(grid_steps={grid_steps}, min_step_ratio={min_step_ratio}, max_step_ratio={max_step_ratio})"
        )
    return low, high


def pds_step_pair(grid: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, t_prev)`` for per-sample grid indices [B]: the grid point at each index and the one before it.

    ``grid`` is :func:`pds_timesteps`'s ascending grid and ``indices`` come from
    :func:`pds_index_range` (all >= 1). t_prev is the grid's previous point, as the authors define
    it, not t minus a fixed spacing, which would differ where the spacing is uneven.
    """
    return grid[indices], grid[indices - 1]
