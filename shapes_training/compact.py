"""Checkpoints of half the bytes that still resume exactly: the live state is rounded to what is stored.

A run split over several CPU sessions resumes from a checkpoint committed to the repository, which must stay
under 25 MB. In fp32 the trained weights, their EMA and AdamW's two moments take 16 bytes a parameter, so
only about 1.5 M parameters would fit. Here they take 8:
* the trained weights and buffers, and the EMA, in fp16 (a rounding error of at most 2^-11 of the value, about
  one late-training update of a typical weight), the format they are exported in anyway;
* AdamW's moments in bfloat16 (fp32's range: the second moment of a small gradient underflows fp16, and a zero
  there would make the step m / eps huge). Both are averages that forget a rounding within tens to hundreds
  of steps.
Exactness: at every checkpoint (and only there) the trainer rounds its own state to these formats before
saving it, so a run that stopped and resumed holds, bit for bit, what an uninterrupted run holds at that step.
A run can therefore only stop at a checkpoint step.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.training_utils import EMAModel

WEIGHTS = torch.float16
MOMENTS = torch.bfloat16
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
BYTES_PER_PARAMETER = 2 * WEIGHTS.itemsize + 2 * MOMENTS.itemsize  # weight, EMA, two moments


@torch.no_grad()
def round_(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round `tensor` in place to the values `dtype` can hold; return it in `dtype` (what is stored)."""
    stored = tensor.to(dtype)
    tensor.copy_(stored)
    return stored


def compact_module(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict in fp16, its own floating-point parameters and buffers rounded to match."""
    return {k: round_(v, WEIGHTS) if v.is_floating_point() else v.clone() for k, v in module.state_dict().items()}


def compact_ema(ema: EMAModel) -> dict[str, Any]:
    """EMAModel's state dict with fp16 averages, the live averages rounded to match."""
    state = ema.state_dict()
    state["shadow_params"] = [round_(p, WEIGHTS) for p in ema.shadow_params]
    return state


def load_ema(ema: EMAModel, state: dict[str, Any]) -> None:
    ema.load_state_dict({**state, "shadow_params": [p.float() for p in state["shadow_params"]]})


def compact_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with bfloat16 moments, the live moments rounded to match.

    Loading it back needs nothing special: ``Optimizer.load_state_dict`` casts state to its parameter's dtype.
    """
    state = optimizer.state_dict()
    state["state"] = {
        index: {key: round_(value, MOMENTS) if key in MOMENT_KEYS else value for key, value in entry.items()}
        for index, entry in state["state"].items()
    }
    return state
