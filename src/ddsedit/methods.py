"""The edit methods, one declaration each: what everything else (the CLI's commands and flags, batch, eval-shapes,
the settings' checks, the recorded metadata, batch resume) is derived from. Imports no torch.

A :class:`Method` names its gradient function (``"module:function"``, imported when an edit runs) on the
noise-predicting families (SD, SDXL), its velocity form on the rectified-flow families (SD3, Flux) or the sampler
that replaces the loop there (FlowEdit), its own random draws, its options class (a frozen dataclass of
:func:`ddsedit.settings.setting` fields), its defaults (and per family), whether it compares against ``--ref``,
whether it takes a mask and whether a CUDA graph can record its step. The families it supports follow from the
forms it declares. Adding a method is one :func:`register` call; see ``tests/test_method_registry.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ddsedit.errors import InputError
from ddsedit.families import FAMILIES, FLOW_FAMILIES, NOISE, NOISE_FAMILIES, VELOCITY
from ddsedit.settings import MASK_PANEL, METHOD_PANEL, EditConfig, NoOptions, acting, declared, setting

MASK_NONE, MASK_OPTIONAL, MASK_REQUIRED = "none", "optional", "required"
SHARED_DRAWS = "ddsedit.optimize:draw_step"  # one timestep and one noise per image


@dataclass(frozen=True)
class Method:
    """One edit method's declaration."""

    name: str
    summary: str  # the command's help, first sentence first (``ddsedit --help`` lists it whole)
    # (GradientInputs, latents, StepDraws) -> gradient on noise-predicting models (ddsedit.gradients); None: none
    gradient: str | Callable[..., Any] | None
    options: type = NoOptions  # its own settings beyond EditConfig's
    defaults: Mapping[str, Any] = field(default_factory=dict)  # its own defaults over its options' declared ones
    # (generators, settings, image_shape, device, schedule, step=) -> draws, on noise-predicting models
    draws: str | Callable[..., Any] = SHARED_DRAWS
    needs_ref: bool = True  # compares against a description of the source (the DDS family)
    mask: str = MASK_OPTIONAL  # none, optional (edits everywhere without one) or required
    graphable: bool = False  # one UNet call without autograd: a CUDA graph can record its step
    # The velocity form on rectified-flow models, (GradientInputs, latents, StepDraws) -> gradient, stepped down
    # the model's sigma schedule (ddsedit.flowgradients); None: none.
    velocity: str | Callable[..., Any] | None = None
    # On rectified-flow models, a sampler that replaces the loop: (GradientInputs, FlowSchedule, generators, mask,
    # on_step) -> latents (FlowEdit's ODE); None: the loop with ``velocity``.
    sampler: str | Callable[..., Any] | None = None
    # Defaults by family name, over ``defaults`` (the authors' settings for SD3 and for Flux differ).
    family_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    ignores: tuple[str, ...] = ()  # shared settings it does not read (FlowEdit: --lr): no flag, not recorded
    families: tuple[str, ...] = ()  # derived: the families of the forms it declares

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "family_defaults", MappingProxyType(
            {family: MappingProxyType(dict(values)) for family, values in self.family_defaults.items()}
        ))  # fmt: skip
        supported = (NOISE_FAMILIES if self.gradient is not None else ()) + (
            FLOW_FAMILIES if self.velocity is not None or self.sampler is not None else ()
        )  # fmt: skip
        object.__setattr__(self, "families", supported)

    def predictions(self) -> tuple[str, ...]:
        """What the denoisers of the families it supports predict (``noise``, ``velocity``)."""
        return tuple(dict.fromkeys(FAMILIES[name].prediction for name in self.families))

    def gradient_function(self, velocity: bool = False) -> Callable[..., Any]:
        """The gradient on noise-predicting models, or (``velocity``) on rectified-flow ones."""
        declared_gradient = self.velocity if velocity else self.gradient
        if declared_gradient is None:
            kind = "rectified-flow" if velocity else "noise-predicting"
            raise ValueError(f"{self.name} declares no gradient on {kind} models")
        return _resolve(declared_gradient)

    def sampler_function(self) -> Callable[..., Any] | None:
        return None if self.sampler is None else _resolve(self.sampler)

    def draw_function(self) -> Callable[..., Any]:
        return _resolve(self.draws)

    def reads(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of ``values`` that are settings of this method (shared ones and its own options)."""
        own = {item.name for item in declared(self.options)} | {item.name for item in declared(EditConfig)}
        return {key: value for key, value in values.items() if key in own}

    def default_options(self) -> Any:
        """An instance of the options class with the method's own defaults."""
        own = {item.name for item in declared(self.options)}
        return self.options(**{key: value for key, value in self.defaults.items() if key in own})

    def default_config(self, family: str | None = None) -> EditConfig:
        """EditConfig's defaults with the method's own over them (options and shared settings alike), then the
        ``family``'s defaults for the method if it names one."""
        values = {**self.defaults, **(self.family_defaults.get(family, {}) if family else {})}
        own = {item.name for item in declared(self.options)}
        shared = {key: value for key, value in values.items() if key not in own}
        options = self.options(**{key: value for key, value in values.items() if key in own})
        return dataclasses.replace(EditConfig(**shared), options=options)

    def problem(self, config: EditConfig, num_train_timesteps: int = 1000, given: set[str] | None = None) -> str | None:
        """Why ``config`` cannot run under this method, beyond each setting's own range (None: it can).

        ``given``: the settings set explicitly, before a model's defaults are known (the CLI's check before the
        load): a check that also reads a setting not given is left for later, when the model's defaults are in.
        """
        check = getattr(config.options, "problem", None)
        return check(config, num_train_timesteps, given) if check is not None else None

    def takes(self, item: Any) -> bool:
        """Whether a shared setting's declaration acts on some model this method supports."""
        applies_to = item.info.applies_to
        return item.name not in self.ignores and (applies_to is None or applies_to in self.predictions())

    def recorded(self, config: EditConfig, masked: bool, prediction: str = NOISE) -> dict[str, Any]:
        """The settings that act on an edit with ``config`` on a model whose denoiser predicts ``prediction``
        (``noise``, ``velocity``), by name: what its output records and resume compares."""
        values: dict[str, Any] = {}
        for item in acting(config, prediction):
            if item.name in self.ignores:
                continue
            if not item.info.recorded or (item.info.panel == MASK_PANEL and not masked):
                continue
            values[item.name] = getattr(config, item.name)
        if config.options is not None:
            values.update({
                item.name: getattr(config.options, item.name) for item in acting(config.options, prediction)
            })  # fmt: skip
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


def _resolve(reference: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(reference):
        return reference
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------- the methods' options


@dataclass(frozen=True)
class ContrastOptions:
    """CDS's settings: the DDS gradient's weight and the contrastive (CUT, PatchNCE) term's."""

    dds_weight: float = setting(1.0, "Weight of the DDS gradient.", panel=METHOD_PANEL, minimum=0, maximum=10_000)
    cut_weight: float = setting(
        3.0, "Weight of the contrastive (CUT) term; 0 turns it off.", panel=METHOD_PANEL, minimum=0, maximum=10_000
    )
    cut_patches: int = setting(
        256, "Positions drawn per attention layer and patch size.", panel=METHOD_PANEL, minimum=1, maximum=1_000_000,
        needs="cut_weight",
    )  # fmt: skip
    cut_patch_sizes: tuple[int, ...] = setting(
        (1, 2), "Comma-separated patch sizes (2: 2x2 average pooling first).", panel=METHOD_PANEL, minimum=1,
        maximum=1024, needs="cut_weight",
    )  # fmt: skip
    cut_temperature: float = setting(
        0.07, "PatchNCE temperature.", panel=METHOD_PANEL, minimum=0.001, maximum=1000, needs="cut_weight"
    )

    def problem(self, config: EditConfig, num_train_timesteps: int, given: set[str] | None) -> str | None:
        if given is not None and not {"dds_weight", "cut_weight"} <= given:
            return None
        if self.dds_weight == 0 and self.cut_weight == 0:
            return "--dds-weight 0 with --cut-weight 0 leaves nothing to move the image: raise one of them"
        return None


@dataclass(frozen=True)
class IdentityOptions(ContrastOptions):
    """IDS's settings: CDS's (the CUT term optional, off by default) and the identity correction's."""

    identity_steps: int = setting(
        3, "Corrections of the source branch per step.", panel=METHOD_PANEL, minimum=0, maximum=100
    )
    identity_weight: float = setting(
        1.0, "Step size (lambda) of each correction.", panel=METHOD_PANEL, minimum=0, maximum=1000,
        needs="identity_steps",
    )  # fmt: skip


@dataclass(frozen=True)
class PosteriorOptions:
    """PDS's settings: the grid its two timesteps come from."""

    pds_grid: int = setting(
        500, "Steps of the scheduler's grid (its own set_timesteps) that t and the previous step come from; t is "
        "drawn from its 2% to 98% indices, within [--t-min, --t-max).", panel=METHOD_PANEL, minimum=50,
        maximum=1000,
    )  # fmt: skip

    def problem(self, config: EditConfig, num_train_timesteps: int, given: set[str] | None) -> str | None:
        if self.pds_grid > num_train_timesteps:
            return f"--pds-grid must be in [50, {num_train_timesteps}], got {self.pds_grid}"
        return None  # whether the grid meets [t_min, t_max) is known once the scheduler is (ddsedit.gradients)


@dataclass(frozen=True)
class DeltaVelocityOptions:
    """DDS's settings on rectified-flow models (DVRF): the source branch's guidance and the path's shift."""

    source_guidance: float = setting(
        6.0, "Guidance scale of the --ref branch (--guidance is the --query branch's). SD3, Flux only.",
        panel=METHOD_PANEL, minimum=0, maximum=1000, applies_to=VELOCITY,
    )  # fmt: skip
    # 0, not the DVRF authors' 1: on the flow oracle's tune cases (shapes-flow, 24 cases, seed 123) eta 0 kept the
    # shape better by a settled +0.038 IoU at the same recolour rate (docs/methods.md).
    eta: float = setting(
        0.0, "DVRF's shift of the --query branch's path towards the edit, grown over the steps (0: DDS on "
        "velocities; 1: FlowEdit's coupling, the DVRF authors' choice). SD3, Flux only.", panel=METHOD_PANEL,
        minimum=0, maximum=10, applies_to=VELOCITY,
    )  # fmt: skip


@dataclass(frozen=True)
class FlowEditOptions:
    """FlowEdit's settings: the source branch's guidance and which steps of the schedule run, how."""

    source_guidance: float = setting(
        3.5, "Guidance scale of the --ref branch (--guidance is the --query branch's).", panel=METHOD_PANEL,
        minimum=0, maximum=1000,
    )  # fmt: skip
    n_max: int = setting(
        33, "Steps of the --steps schedule that run: the first steps - n_max are skipped (more: bigger change).",
        panel=METHOD_PANEL, minimum=1, maximum=10_000,
    )  # fmt: skip
    n_avg: int = setting(1, "Noises each step's velocity difference averages.", panel=METHOD_PANEL, minimum=1,
                         maximum=100)  # fmt: skip
    n_min: int = setting(
        0, "Last steps sampled plainly under --query from the coupled point, not edited.", panel=METHOD_PANEL,
        minimum=0, maximum=10_000,
    )  # fmt: skip

    def problem(self, config: EditConfig, num_train_timesteps: int, given: set[str] | None) -> str | None:
        if given is not None and not {"n_max", "steps"} <= given:
            return None
        if self.n_max > config.steps:
            return f"--n-max must be at most --steps ({config.steps}), got {self.n_max}"
        if self.n_min >= self.n_max:
            return f"--n-min must be below --n-max ({self.n_max}), got {self.n_min}"
        return None

    def active_steps(self) -> int:
        """The steps an edit runs (and reports progress over)."""
        return self.n_max


# The flow methods' defaults on each family: the DVRF authors' SD3 settings (50 steps, guidance 6 and 16.5; their
# step sizes, lr 1), FlowEdit's for Flux (28 steps, guidance 1.5 and 5.5).
_DVRF_DEFAULTS = {
    "sd3": {"steps": 50, "guidance": 16.5, "source_guidance": 6.0, "lr": 1.0},
    "flux": {"steps": 28, "guidance": 5.5, "source_guidance": 1.5, "lr": 1.0},
}

# --------------------------------------------------------------------------- the registry

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; its command, flags, batch column value and eval run follow from the declaration."""
    if method.name in _REGISTRY:
        raise ValueError(f"a method named {method.name!r} is registered already")
    if method.mask not in (MASK_NONE, MASK_OPTIONAL, MASK_REQUIRED):
        raise ValueError(f"mask must be {MASK_NONE}, {MASK_OPTIONAL} or {MASK_REQUIRED}, got {method.mask!r}")
    declared(method.options)  # fails early on a field without a setting() declaration's types
    if method.gradient is None and method.velocity is None and method.sampler is None:
        raise ValueError(f"{method.name} declares no gradient, velocity form or sampler")
    known = {i.name for i in declared(method.options)} | {i.name for i in declared(EditConfig)}
    for values in (method.defaults, *method.family_defaults.values()):
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{method.name}'s defaults name unknown settings: {', '.join(sorted(unknown))}")
    unknown_families = set(method.family_defaults) - set(method.families)
    if unknown_families:
        raise ValueError(f"{method.name} has defaults for families it does not support: {sorted(unknown_families)}")
    _REGISTRY[method.name] = method
    return method


@contextlib.contextmanager
def registered(method: Method) -> Iterator[Method]:
    """Register ``method`` for the duration of a ``with`` block (tests, experiments)."""
    register(method)
    try:
        yield method
    finally:
        _REGISTRY.pop(method.name, None)


def all_methods() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The declaration of ``name``; an InputError naming the choices if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}: use one of {', '.join(_REGISTRY)}") from None


def option_methods() -> dict[str, tuple[Method, ...]]:
    """Each method option's name and the methods that read it (batch and eval-shapes take the union)."""
    readers: dict[str, list[Method]] = {}
    for method in _REGISTRY.values():
        for item in declared(method.options):
            readers.setdefault(item.name, []).append(method)
    return {name: tuple(methods) for name, methods in readers.items()}


def option_declaration(name: str):
    """The first declaration of the option ``name`` among the registered methods."""
    for method in _REGISTRY.values():
        for item in declared(method.options):
            if item.name == name:
                return item
    raise KeyError(name)


register(Method(
    "sds", "SDS edit: pull the image toward --query (no --ref needed; tends to lose detail). On SD3 and Flux: "
    "rectified-flow SDS.",
    gradient="ddsedit.gradients:sds", needs_ref=False, mask=MASK_NONE, graphable=True,
    velocity="ddsedit.flowgradients:rf_sds",
    family_defaults={family: {k: v for k, v in values.items() if k != "source_guidance"}
                     for family, values in _DVRF_DEFAULTS.items()},
))  # fmt: skip
register(Method(
    "dds", "DDS edit: change what --ref describes into what --query describes, keeping the rest. On SD3 and Flux: "
    "DVRF (delta velocity, --eta).",
    gradient="ddsedit.gradients:dds", options=DeltaVelocityOptions, mask=MASK_NONE, graphable=True,
    velocity="ddsedit.flowgradients:dvrf", family_defaults=_DVRF_DEFAULTS,
))  # fmt: skip
register(Method(
    "masked-dds", "Masked DDS: DDS confined to --mask (white = editable); outside it the source pixels are kept.",
    gradient="ddsedit.gradients:dds", options=DeltaVelocityOptions, mask=MASK_REQUIRED, graphable=True,
    velocity="ddsedit.flowgradients:dvrf", family_defaults=_DVRF_DEFAULTS,
))  # fmt: skip
register(Method(
    "flowedit", "FlowEdit (Kulikov et al. 2025), SD3 and Flux only: an inversion-free ODE from the source along the "
    "difference of the --query and --ref velocities. --mask optional.",
    gradient=None, options=FlowEditOptions, sampler="ddsedit.flowgradients:flowedit_edit", ignores=("lr",),
    family_defaults={
        "sd3": {"steps": 50, "n_max": 33, "guidance": 13.5, "source_guidance": 3.5},
        "flux": {"steps": 28, "n_max": 24, "guidance": 5.5, "source_guidance": 1.5},
    },
))  # fmt: skip
register(Method(
    "cds", "CDS edit (Nam et al. 2024): DDS plus a contrastive term on the UNet's self-attention features that "
    "keeps the source's structure patch by patch. --mask optional.",
    gradient="ddsedit.gradients:cds", options=ContrastOptions,
))  # fmt: skip
register(Method(
    "pds", "PDS edit (Koo et al. 2024): match the target's posterior samples to the source's. --mask optional.",
    gradient="ddsedit.gradients:pds", options=PosteriorOptions, draws="ddsedit.gradients:pds_draws",
    defaults={"t_min": 1, "t_max": 999},  # the authors draw from their grid's 2% to 98%: [--t-min, --t-max) all of it
))  # fmt: skip
register(Method(
    "ids", "IDS edit (Kim et al. 2025): DDS whose source branch is first corrected to predict the source again. "
    "--mask optional.",
    gradient="ddsedit.gradients:ids", options=IdentityOptions, defaults={"cut_weight": 0.0},
))  # fmt: skip
