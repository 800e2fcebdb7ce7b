"""Settings of one edit, checked without importing torch (the CLI checks flags before the slow imports)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ddsedit.errors import InputError


@dataclass
class EditConfig:
    """Settings of one edit. The defaults are those of the DDS paper's code.

    ``lr`` is the SGD learning rate on the loss ``2000 * sum(z * grad) / 4096``: each step
    moves every latent element by ``lr * 2000 / 4096 * grad`` (about ``0.049 * grad`` at
    the default), whatever the image size. Timesteps are drawn uniformly from the integers
    ``t_min, ..., t_max - 1`` (50 to 949 by default). A model may store its own defaults (``ddsedit.json``), which
    :meth:`Editor.config` applies before explicit overrides.
    """

    steps: int = 200
    guidance: float = 7.5
    lr: float = 0.1
    t_min: int = 50
    t_max: int = 950
    seed: int | None = None  # None: a random seed, recorded in the output's metadata
    negative: str = ""  # replaces the empty unconditional prompt
    size: int = 512  # longest side of the working image, in pixels
    keep_working_size: bool = False  # else the result is resized back to the source's size
    paste_back: bool = True  # masked DDS: keep the source's pixels outside the mask
    feather: float = 2.0  # masked DDS: width in pixels of the seam's inward blend
    save_every: int = 0  # keep a decoded frame every N steps (0: none)

    def validate(self, num_train_timesteps: int = 1000) -> None:
        """Raise InputError for settings that cannot work, with the flag's name in the message."""
        checks = [
            (
                isinstance(self.steps, int) and self.steps > 0,
                f"--steps must be a positive integer, got {self.steps}",
            ),
            (
                math.isfinite(self.guidance) and self.guidance >= 0,
                f"--guidance must be >= 0, got {self.guidance}",
            ),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (
                1 <= self.t_min < self.t_max <= min(999, num_train_timesteps - 1),
                f"timestep range must satisfy 1 <= --t-min < --t-max <= {min(999, num_train_timesteps - 1)}, "
                f"got [{self.t_min}, {self.t_max})",
            ),
            (self.seed is None or 0 <= self.seed < 2**63, f"--seed must be in [0, 2^63), got {self.seed}"),
            (self.size > 0, f"--size must be positive, got {self.size}"),
            (
                math.isfinite(self.feather) and self.feather >= 0,
                f"--feather must be >= 0, got {self.feather}",
            ),
            (self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}"),
        ]
        for passed, message in checks:
            if not passed:
                raise InputError(message)

    def replace(self, **overrides: Any) -> EditConfig:
        """A copy with ``overrides`` applied; ``None`` values are ignored (flag not given)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise InputError(f"unknown edit setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
