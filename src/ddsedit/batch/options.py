"""What ``ddsedit batch`` was given, and how to repeat it for launched processes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddsedit.automask import AutoMaskSettings
from ddsedit.checks import check_prediction_type
from ddsedit.errors import InputError


@dataclass
class BatchOptions:
    """Everything ``ddsedit batch`` was given; the edit settings are defaults for the rows."""

    manifest: Path
    out_dir: Path
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    steps: int | None = None
    guidance: float | None = None
    lr: float | None = None
    t_min: int | None = None
    t_max: int | None = None
    seed: int | None = None
    negative: str | None = None
    size: int | None = None
    batch_size: int = 1
    processes: int = 1
    skip_invalid: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    prediction_type: str | None = None
    cuda_graph: bool = False
    quiet: bool = False
    verbose: bool = False
    # The automatic mask of rows whose mask is auto (None: the default).
    mask_strength: float | None = None
    mask_noises: int | None = None
    mask_threshold: float | None = None
    mask_grow: int | None = None
    # The options of the methods beyond DDS, for every row whose method reads them (None: the default).
    dds_weight: float | None = None
    cut_weight: float | None = None
    cut_patches: int | None = None
    cut_patch_sizes: tuple[int, ...] | None = None
    cut_temperature: float | None = None
    pds_grid: int | None = None
    identity_steps: int | None = None
    identity_weight: float | None = None

    def mask_settings(self) -> AutoMaskSettings:
        """How the rows whose mask is ``auto`` draw it (each with its own seed: the row's)."""
        return AutoMaskSettings().replace(
            strength=self.mask_strength, noises=self.mask_noises, threshold=self.mask_threshold, grow=self.mask_grow
        )

    def overrides(self) -> dict[str, Any]:
        """The edit settings that were given (``None``: not given)."""
        return dict(
            steps=self.steps, guidance=self.guidance, lr=self.lr, t_min=self.t_min, t_max=self.t_max,
            seed=self.seed, negative=self.negative, size=self.size, dds_weight=self.dds_weight,
            cut_weight=self.cut_weight, cut_patches=self.cut_patches, cut_patch_sizes=self.cut_patch_sizes,
            cut_temperature=self.cut_temperature, pds_grid=self.pds_grid, identity_steps=self.identity_steps,
            identity_weight=self.identity_weight,
        )  # fmt: skip

    def child_arguments(self) -> list[str]:
        """The ``ddsedit batch ...`` arguments that repeat these options, minus ``--processes``."""
        arguments = ["batch", str(self.manifest), "--out-dir", str(self.out_dir)]  # the processes share our cwd
        arguments += ["--device", self.device, "--dtype", self.dtype, "--batch-size", str(self.batch_size)]
        valued = {"--model": self.model, "--prediction-type": self.prediction_type, **{
            f"--{name.replace('_', '-')}": value for name, value in self.overrides().items()
        }}  # fmt: skip
        valued.update({
            "--mask-strength": self.mask_strength, "--mask-noises": self.mask_noises,
            "--mask-threshold": self.mask_threshold, "--mask-grow": self.mask_grow,
        })  # fmt: skip
        for flag, value in valued.items():
            if isinstance(value, tuple):  # --cut-patch-sizes: comma-separated, as given
                value = ",".join(map(str, value))
            if value is not None:
                arguments += [flag, str(value)]
        switches = {
            "--skip-invalid": self.skip_invalid, "--overwrite": self.overwrite, "--allow-pickle": self.allow_pickle,
            "--cuda-graph": self.cuda_graph, "--quiet": self.quiet, "--verbose": self.verbose,
        }  # fmt: skip
        return arguments + [flag for flag, on in switches.items() if on]

    def validate(self) -> None:
        """Raise InputError for options that cannot work, before the manifest is read."""
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.processes < 1:
            raise InputError(f"--processes must be at least 1, got {self.processes}")
        if self.processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InputError("--processes cannot be used under accelerate launch: use one or the other")
        check_prediction_type(self.prediction_type)
        self.mask_settings().validate()
