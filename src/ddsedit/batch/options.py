"""What ``ddsedit batch`` was given, and how to repeat it for launched processes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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
    vae: str | None = None  # a VAE in place of the model's own
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
    # The methods' own options that were given (--cut-weight, ...), by name, for every row whose method reads them.
    method_options: dict[str, Any] = field(default_factory=dict)

    def mask_settings(self) -> AutoMaskSettings:
        """How the rows whose mask is ``auto`` draw it (each with its own seed: the row's)."""
        return AutoMaskSettings().replace(
            strength=self.mask_strength, noises=self.mask_noises, threshold=self.mask_threshold, grow=self.mask_grow
        )

    def overrides(self) -> dict[str, Any]:
        """The edit settings that were given (``None``: not given)."""
        shared = dict(
            steps=self.steps, guidance=self.guidance, lr=self.lr, t_min=self.t_min, t_max=self.t_max,
            seed=self.seed, negative=self.negative, size=self.size,
        )  # fmt: skip
        return {**shared, **{name: value for name, value in self.method_options.items() if value is not None}}

    def child_arguments(self) -> list[str]:
        """The ``ddsedit batch ...`` arguments that repeat these options, minus ``--processes``."""
        arguments = ["batch", str(self.manifest), "--out-dir", str(self.out_dir)]  # the processes share our cwd
        arguments += ["--device", self.device, "--dtype", self.dtype, "--batch-size", str(self.batch_size)]
        valued = {"--model": self.model, "--vae": self.vae, "--prediction-type": self.prediction_type, **{
            flag_of(name): value for name, value in self.overrides().items()
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
        from ddsedit.methods import option_declaration, option_methods

        unknown = sorted(set(self.method_options) - set(option_methods()))
        if unknown:
            raise InputError(f"no method has the option {unknown[0]!r}")
        for name, value in self.method_options.items():
            problem = option_declaration(name).problem(value) if value is not None else None
            if problem:
                raise InputError(problem)


def flag_of(name: str) -> str:
    """The flag of a setting: its declaration's (shared or a method's)."""
    from ddsedit.methods import option_declaration, option_methods
    from ddsedit.settings import EditConfig, declared_by_name

    shared = declared_by_name(EditConfig)
    if name in shared:
        return shared[name].flag
    return option_declaration(name).flag if name in option_methods() else "--" + name.replace("_", "-")
