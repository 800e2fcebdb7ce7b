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
    # The methods beyond DDS (see ddsedit.methods); each method's own defaults are in METHOD_DEFAULTS.
    dds_weight: float = 1.0  # cds, ids: weight of the DDS gradient
    cut_weight: float = 3.0  # cds, ids: weight of the contrastive (CUT) term
    cut_patches: int = 256  # cds, ids: positions drawn per attention layer and patch size
    cut_patch_sizes: tuple[int, ...] = (1, 2)  # cds, ids: patch sizes (2: 2x2 average pooling first)
    cut_temperature: float = 0.07  # cds, ids: PatchNCE temperature
    pds_grid: int = 50  # pds: steps of the DDIM grid that t and the previous step come from
    identity_steps: int = 3  # ids: corrections of the source branch per step
    identity_weight: float = 1.0  # ids: the step size (lambda) of each correction

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
            (
                math.isfinite(self.dds_weight) and self.dds_weight >= 0,
                f"--dds-weight must be >= 0, got {self.dds_weight}",
            ),
            (
                math.isfinite(self.cut_weight) and self.cut_weight >= 0,
                f"--cut-weight must be >= 0, got {self.cut_weight}",
            ),
            (self.cut_patches >= 1, f"--cut-patches must be >= 1, got {self.cut_patches}"),
            (
                len(self.cut_patch_sizes) > 0 and all(size >= 1 for size in self.cut_patch_sizes),
                f"--cut-patch-sizes must be positive integers, got {_listed(self.cut_patch_sizes)}",
            ),
            (
                math.isfinite(self.cut_temperature) and self.cut_temperature > 0,
                f"--cut-temperature must be > 0, got {self.cut_temperature}",
            ),
            (
                2 <= self.pds_grid <= num_train_timesteps,
                f"--pds-grid must be in [2, {num_train_timesteps}], got {self.pds_grid}",
            ),
            (self.identity_steps >= 0, f"--identity-steps must be >= 0, got {self.identity_steps}"),
            (
                math.isfinite(self.identity_weight) and self.identity_weight >= 0,
                f"--identity-weight must be >= 0, got {self.identity_weight}",
            ),
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

    def validate_for(self, method: str, num_train_timesteps: int = 1000) -> None:
        """:meth:`validate`, plus the checks that depend on the method (PDS's grid must meet the t range)."""
        self.validate(num_train_timesteps)
        if method == "pds":
            spacing = num_train_timesteps // self.pds_grid
            points = range(spacing, num_train_timesteps, spacing)
            if not any(self.t_min <= t < self.t_max for t in points):
                raise InputError(
                    f"--pds-grid {self.pds_grid} puts no grid step in [--t-min, --t-max) = [{self.t_min}, "
                    f"{self.t_max}) (its steps are {spacing} apart): use a finer grid or a wider range"
                )

    def method_fields(self, method: str) -> dict[str, Any]:
        """The settings of ``method`` beyond DDS's, by field name (what its output records)."""
        names = METHOD_FIELDS.get(method, ())
        return {name: list(value) if isinstance(value, tuple) else value for name, value in
                ((name, getattr(self, name)) for name in names)}  # fmt: skip


# Which settings each method reads beyond the shared ones.
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "cds": ("dds_weight", "cut_weight", "cut_patches", "cut_patch_sizes", "cut_temperature"),
    "pds": ("pds_grid",),
    "ids": (
        "dds_weight", "cut_weight", "cut_patches", "cut_patch_sizes", "cut_temperature", "identity_steps",
        "identity_weight",
    ),
}  # fmt: skip

# Each method's own defaults over EditConfig's (the papers' for SD 1.x/2.x): IDS's contrastive term is
# optional and off unless asked for.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "ids": {"cut_weight": 0.0},
}


def resolve_config(method: str, model_defaults: dict[str, Any], overrides: dict[str, Any]) -> EditConfig:
    """An edit's settings: EditConfig's, then the method's (METHOD_DEFAULTS), then the model's
    ``ddsedit.json`` (its flat settings, then its ``methods.<method>`` section), then ``overrides``."""
    flat = {key: value for key, value in model_defaults.items() if key != "methods"}
    per_method = model_defaults.get("methods", {})
    if not isinstance(per_method, dict):
        raise InputError("the model's ddsedit.json: 'methods' must map method names to settings")
    config = EditConfig().replace(**METHOD_DEFAULTS.get(method, {})).replace(**_tuples(flat))
    return config.replace(**_tuples(per_method.get(method, {}))).replace(**overrides)


def _listed(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values)) or "none"


def _tuples(settings: dict[str, Any]) -> dict[str, Any]:
    """JSON lists (e.g. cut_patch_sizes) as the tuples EditConfig holds."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()}
