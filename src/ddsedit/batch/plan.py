"""Planning a batch: each manifest row as a :class:`Job`, grouped for shared UNet calls, and resume matching.

A row counts as done when its output exists and records the same edit: the same settings
and seed, the same resolved model and prediction type, and the same source and mask bytes
(SHA-256). All of that is known without loading the model's weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsedit.errors import DDSEditError, InputError
from ddsedit.manifest import ManifestRow
from ddsedit.methods import get_method
from ddsedit.names import DEFAULT_PREDICTION_TYPE

if TYPE_CHECKING:
    from ddsedit.automask import AutoMaskSettings
    from ddsedit.batch.options import BatchOptions
    from ddsedit.settings import EditConfig

# Recorded by every output since outputs name the resolved model and their input files; an output
# without them was written by an older ddsedit, whose record cannot show that it is this row's edit.
IDENTITY_KEYS = ("prediction_type", "source_sha256")


@dataclass(frozen=True)
class ExpectedModel:
    """What an output must record about the model to count as done, known without loading the weights."""

    identity: str  # ddsedit.loading.model_identity: the same however the model was typed
    prediction_type: str | None  # None: cannot be known without loading the weights, so not compared
    family: str = "sd"  # ddsedit.families: what outputs record as model_family
    vae: str | None = None  # the --vae given (ddsedit.loading.vae_identity_of), None: the model's own


def expected_prediction_type(kind: str, path: Path, prediction_type: str | None) -> str | None:
    """The prediction type the editor will use and record for a model, read without loading its weights.

    ``prediction_type`` (the flag) wins; a folder's is its scheduler config's; a ``.safetensors``
    file's is that of the bundled config its header selects. A pickle must be loaded whole to
    tell (None: resume then compares the other parameters only), as must an unreadable model,
    whose load reports the problem if some row is left to run.
    """
    if prediction_type is not None:
        return prediction_type
    if kind == "folder":
        config_path = path / "scheduler" / "scheduler_config.json"
    elif path.suffix.lower() == ".safetensors":
        from ddsedit.checkpoints import MODEL_CONFIGS_DIR, detect_sd_version

        try:
            config_path = MODEL_CONFIGS_DIR / detect_sd_version(path) / "scheduler" / "scheduler_config.json"
        except DDSEditError:
            return None
    else:
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return str(config.get("prediction_type") or DEFAULT_PREDICTION_TYPE)  # as loading.load_model reads it


def resolve_defaults(
    options: BatchOptions, methods: tuple[str, ...] | None = None
) -> tuple[dict[str, EditConfig], ExpectedModel]:
    """The default settings of each method the rows use (its own, the model's ``ddsedit.json``, then the flags)
    and what outputs record of the model. ``methods``: the rows' methods (None: every registered method).

    Only those methods are checked, and a method option given as a flag must be read by one of them.
    Reads only the model's defaults and scheduler config (or a checkpoint's header), not its
    weights, so that finished rows can be recognised without loading the model.
    """
    from ddsedit.families import VELOCITY
    from ddsedit.loading import (
        DEFAULTS_FILE,
        locate_model,
        model_family,
        model_identity,
        read_defaults,
        vae_identity_of,
    )
    from ddsedit.methods import method_names, option_declaration
    from ddsedit.settings import EditConfig, declared_by_name, misapplied, option_names, resolve_config

    used = [get_method(name) for name in (methods if methods is not None else method_names())]
    overrides = options.overrides()
    for name in options.method_options:
        if options.method_options[name] is not None and not any(
            name in option_names(method.default_options()) for method in used
        ):
            from ddsedit.batch.options import flag_of

            listed = ", ".join(method.name for method in used) or "none"
            raise InputError(f"{flag_of(name)} acts on no row: the rows' methods ({listed}) do not read it")

    def for_method(method: Any) -> dict[str, Any]:
        own = option_names(method.default_options())
        return {key: value for key, value in overrides.items() if key not in options.method_options or key in own}

    for method in used:  # the flags alone first, so that an error names the flag rather than the model's file
        flags = for_method(method)
        config = resolve_config(method, {}, flags)
        config.validate()
        if problem := method.problem(config, given={key for key, value in flags.items() if value is not None}):
            raise InputError(problem)
    kind, path = locate_model(options.model, allow_pickle=options.allow_pickle)
    family = model_family(kind, path)
    for name, value in overrides.items():  # a flag of the other kind of model (--t-min on SD3): refused, not ignored
        item = declared_by_name(EditConfig).get(name) or option_declaration(name)
        if value is not None and (problem := misapplied(item, family)):
            raise InputError(problem)
    model_defaults = read_defaults(path) if kind == "folder" else {}
    source = str(path / DEFAULTS_FILE) if kind == "folder" else DEFAULTS_FILE
    defaults = {
        method.name: resolve_config(method, model_defaults, for_method(method), source, family) for method in used
    }
    for method in used:
        defaults[method.name].validate()
        if problem := method.problem(defaults[method.name]):
            raise InputError(problem)
    expected = ExpectedModel(
        identity=model_identity(options.model, kind, path),
        prediction_type=(family.prediction if family.prediction == VELOCITY  # flow models record "velocity"
                         else expected_prediction_type(kind, path, options.prediction_type)),  # fmt: skip
        family=family.name,
        vae=vae_identity_of(options.vae) if options.vae is not None else None,
    )
    return defaults, expected


@dataclass(frozen=True)
class Job:
    """A row resolved against the defaults: where it writes and exactly what it runs."""

    row: ManifestRow
    output: Path
    config: EditConfig  # the row's settings over the defaults, with its seed
    auto_mask: AutoMaskSettings | None = None  # a row whose mask is auto: how it is drawn, with the row's seed

    @property
    def seed(self) -> int:
        """The row's seed (plan_jobs always sets one)."""
        assert self.config.seed is not None
        return self.config.seed

    def expected_parameters(self, model: ExpectedModel) -> dict[str, Any]:
        """The parameters (but not the file hashes) that the output's metadata records when this row has run."""
        from ddsedit.families import FAMILIES
        from ddsedit.metadata import edit_parameters

        ref = self.row.ref if get_method(self.row.method).needs_ref else ""
        parameters = edit_parameters(
            self.row.method, ref, self.row.query, self.seed, self.config, masked=self.row.mask is not None or
            self.row.auto_mask, auto_mask=self.auto_mask, prediction=FAMILIES[model.family].prediction,
        )  # fmt: skip
        parameters["model"] = model.identity
        parameters["model_family"] = model.family
        parameters["vae"] = model.vae  # None matches an output that records none
        if model.prediction_type is not None:
            parameters["prediction_type"] = model.prediction_type
        return parameters

    def file_hashes(self) -> dict[str, str]:
        """The SHA-256 of the row's source (and mask) as they are now, keyed as outputs record them.

        Raises:
            InputError: a file cannot be read.
        """
        from ddsedit import imageio

        hashes = {"source_sha256": imageio.file_sha256(self.row.src)}
        if self.row.mask is not None:
            hashes["mask_sha256"] = imageio.file_sha256(self.row.mask)
        return hashes

    def recorded_parameters(self) -> dict[str, Any] | None:
        """The parameters recorded in the output's metadata; None if it has none or cannot be read."""
        from ddsedit import imageio

        try:
            recorded = json.loads(imageio.read_metadata(self.output)["ddsedit"])
        except (DDSEditError, KeyError, ValueError, OSError):
            return None
        return recorded if isinstance(recorded, dict) else None

    def output_matches(self, model: ExpectedModel) -> bool:
        """Whether the output exists, is complete and records this row's edit of these very files on this model.

        An output of an older ddsedit (see :func:`written_by_older_version`) never matches.
        """
        recorded = self.recorded_parameters()
        if recorded is None or written_by_older_version(recorded):
            return False
        if any(recorded.get(key) != value for key, value in self.expected_parameters(model).items()):
            return False
        try:
            hashes = self.file_hashes()  # read last: the cheap comparisons usually decide
        except DDSEditError:
            return False
        return all(recorded.get(key) == value for key, value in hashes.items())


def plan_jobs(
    rows: list[ManifestRow], defaults: dict[str, EditConfig], out_dir: Path,
    mask_settings: AutoMaskSettings | None = None,
) -> list[Job]:  # fmt: skip
    """Resolve each row's settings and seed: the row's, else its method's ``defaults`` (the flags and the model's).

    A row whose mask is ``auto`` draws it with ``mask_settings`` (default: the defaults of
    :class:`~ddsedit.automask.AutoMaskSettings`) and its own seed.

    A row without a seed takes the default seed (``--seed``); with none, a seed derived from
    the row itself (:meth:`ManifestRow.derived_seed`), so that every run of the same manifest
    uses the same seeds and a finished row can be recognised by its output's metadata.
    """
    jobs = []
    for row in rows:
        method_defaults = defaults[row.method]
        seed = row.seed if row.seed is not None else method_defaults.seed
        if seed is None:
            seed = row.derived_seed()
        config = method_defaults.replace(steps=row.steps, guidance=row.guidance, lr=row.lr, seed=seed,
                                         **row.method_settings)  # fmt: skip
        auto_mask = None
        if row.auto_mask:
            from ddsedit.automask import AutoMaskSettings

            auto_mask = (mask_settings or AutoMaskSettings()).replace(seed=seed)
        jobs.append(Job(row=row, output=out_dir / row.out, config=config, auto_mask=auto_mask))
    return jobs


def group_jobs(jobs: list[Job], batch_size: int, stride: int) -> list[list[Job]]:
    """Groups of at most ``batch_size`` jobs that can share UNet calls: same method, settings and working size.

    Groups keep the order of their first job; with ``batch_size`` 1 every job is its own group.
    """
    if batch_size <= 1:
        return [[job] for job in jobs]
    from ddsedit import imageio

    buckets: dict[tuple[Any, ...], list[Job]] = {}
    for job in jobs:
        settings = dataclasses.astuple(dataclasses.replace(job.config, seed=0))
        try:
            working = imageio.working_size(*job.row.image_size, job.config.size, stride)
        except InputError:
            working = ("alone", job.row.line)  # fails when it runs, on its own
        buckets.setdefault((job.row.method, settings, working), []).append(job)
    groups = [bucket[i : i + batch_size] for bucket in buckets.values() for i in range(0, len(bucket), batch_size)]
    position = {id(job): index for index, job in enumerate(jobs)}
    return sorted(groups, key=lambda group: position[id(group[0])])


def written_by_older_version(recorded: dict[str, Any]) -> bool:
    """Whether an output's recorded parameters lack the model/file identity that outputs record now."""
    return not all(key in recorded for key in IDENTITY_KEYS)


def count_older_outputs(jobs: list[Job]) -> int:
    """How many of these jobs' outputs were written by an older ddsedit (see :func:`written_by_older_version`)."""
    older = 0
    for job in jobs:
        recorded = job.recorded_parameters()
        older += recorded is not None and written_by_older_version(recorded)
    return older
