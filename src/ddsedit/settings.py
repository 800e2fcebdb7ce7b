"""Settings: each declared once, as a dataclass field with its help, flag, panel and valid range; checked
without importing torch (the CLI checks flags before the slow imports).

A setting's declaration (:func:`setting`) is what the CLI's flags, batch's flags, eval-shapes' flags, the
checks of a model's ``ddsedit.json`` and of the Python API, and the recorded metadata are all derived from.
:class:`EditConfig` holds the settings every method shares; each method's own live in its options class
(see :mod:`ddsedit.methods`), which ``EditConfig.options`` holds.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from ddsedit.errors import InputError

# The panels of a command's --help, in the order they are shown.
INPUT_PANEL = "Input and output"
EDIT_PANEL = "Edit"
METHOD_PANEL = "Method"
MASK_PANEL = "Mask"
MODEL_PANEL = "Model and device"
SPEED_PANEL = "Speed"


@dataclass(frozen=True)
class SettingInfo:
    """What a setting's declaration says beyond its type and default."""

    help: str
    panel: str = EDIT_PANEL
    flags: tuple[str, ...] = ()  # CLI flags; default: --name-with-dashes
    minimum: float | None = None
    maximum: float | None = None
    above_minimum: bool = False  # the minimum itself is not valid (lr > 0)
    needs: str | None = None  # acts only while this other setting is truthy (cut_patches needs cut_weight)
    recorded: bool = True  # part of the output's metadata (and so of batch resume's comparison)
    # Acts only on models whose denoiser predicts this ("noise": SD, SDXL; "velocity": SD3, Flux); None: on all.
    applies_to: str | None = None


def setting(default: Any, help: str, **info: Any) -> Any:
    """A dataclass field declaring one setting (see :class:`SettingInfo` for ``info``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("settings hold immutable defaults (use a tuple)")
    return field(default=default, metadata={"setting": SettingInfo(help=help, **info)})


@dataclass(frozen=True)
class Declared:
    """One declared setting: its name, type and default with its :class:`SettingInfo`."""

    name: str
    kind: Any  # int, float, str, bool, int | None, tuple[int, ...]
    default: Any
    info: SettingInfo

    @property
    def flags(self) -> tuple[str, ...]:
        return self.info.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def flag(self) -> str:
        return self.flags[0]

    def problem(self, value: Any, label: str | None = None) -> str | None:
        """Why ``value`` cannot be this setting (None: it can); ``label`` names it (default: its flag)."""
        label = label or self.flag
        base, optional = base_kind(self.kind)
        if value is None:
            return None if optional else f"{label} must be set"
        if base is tuple:
            if not isinstance(value, (tuple, list)) or not value or not all(_is_int(item) for item in value):
                return f"{label} must be a list of integers, got {_shown(value)}"
            return next((self._range_problem(item, label) for item in value if self._range_problem(item, label)), None)
        if base is bool:
            return None if isinstance(value, bool) else f"{label} must be true or false, got {_shown(value)}"
        if base is str:
            return None if isinstance(value, str) else f"{label} must be text, got {_shown(value)}"
        if base is int and not _is_int(value):
            return f"{label} must be an integer, got {_shown(value)}"
        if base is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            return f"{label} must be a number, got {_shown(value)}"
        return self._range_problem(value, label)

    def _range_problem(self, value: float, label: str) -> str | None:
        info = self.info
        low_ok = info.minimum is None or (value > info.minimum if info.above_minimum else value >= info.minimum)
        high_ok = info.maximum is None or value <= info.maximum
        if math.isfinite(value) and low_ok and high_ok:
            return None
        return f"{label} must be in the range {self.valid_range()}, got {_shown(value)}"

    def valid_range(self) -> str:
        info = self.info
        low = "-inf" if info.minimum is None else _number(info.minimum)
        high = "inf" if info.maximum is None else _number(info.maximum)
        opening = "(" if info.above_minimum or info.minimum is None else "["
        closing = "]" if info.maximum is not None else ")"
        return f"{opening}{low}, {high}{closing}"

    def default_text(self) -> str:
        """The default as the help shows it."""
        return shown_default(self.default)


def shown_default(value: Any) -> str:
    """A default as help texts show it: ``1,2`` for a tuple, ``0.07`` or ``1000000`` for a number, ``""`` for None."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return _number(value) if isinstance(value, float) else str(value)


def base_kind(kind: Any) -> tuple[Any, bool]:
    """(int, False) for int; (int, True) for int | None; (tuple, False) for tuple[int, ...]."""
    arguments = [item for item in typing.get_args(kind) if item is not type(None)]
    optional = type(None) in typing.get_args(kind)
    if typing.get_origin(kind) is tuple:
        return tuple, False
    if optional:
        return arguments[0], True
    return kind, False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else (f"{value:g}" if isinstance(value, float) else str(value))


@cache
def declared(cls: type) -> tuple[Declared, ...]:
    """The declared settings of a settings dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    return tuple(
        Declared(item.name, hints[item.name], item.default, item.metadata["setting"])
        for item in dataclasses.fields(cls)
        if "setting" in item.metadata
    )


def declared_by_name(cls: type) -> dict[str, Declared]:
    return {item.name: item for item in declared(cls)}


def acting(values: Any, prediction: str | None = None) -> Iterator[Declared]:
    """The declared settings of ``values`` (a settings dataclass) that act given the others' values, on a model
    whose denoiser predicts ``prediction`` (None: any)."""
    for item in declared(type(values)):
        if prediction is not None and item.info.applies_to not in (None, prediction):
            continue
        if item.info.needs is None or getattr(values, item.info.needs):
            yield item


def misapplied(item: Declared, family: Any) -> str | None:
    """Why the setting ``item``, given explicitly, cannot act on a model of ``family`` (None: it can): a setting of
    noise-predicting models (``--t-min``) on SD3, or of rectified-flow ones (``--eta``) on SD."""
    applies_to = item.info.applies_to
    if applies_to is None or applies_to == family.prediction:
        return None
    from ddsedit.families import FAMILIES

    labels = [each.label for each in FAMILIES.values() if each.prediction == applies_to]
    return f"{item.flag} acts only on {' and '.join(labels)} models, not on {family.label} ones"


@dataclass(frozen=True)
class NoOptions:
    """The options class of a method that has none beyond the shared settings."""


@dataclass(frozen=True)
class EditConfig:
    """Settings of one edit. The defaults are those of the DDS paper's code.

    ``lr`` is the SGD learning rate on the loss ``2000 * sum(z * grad) / 4096``: each step
    moves every latent element by ``lr * 2000 / 4096 * grad`` (about ``0.049 * grad`` at
    the default), whatever the image size. Timesteps are drawn uniformly from the integers
    ``t_min, ..., t_max - 1`` (50 to 949 by default). A model may store its own defaults (``ddsedit.json``), which
    :meth:`Editor.config` applies before explicit overrides. ``options`` holds the method's own settings (an
    instance of its declaration's options class); :meth:`replace` reaches into it by field name.
    """

    steps: int = setting(200, "Optimisation steps.", flags=("--steps", "--iterations"), minimum=1, maximum=1_000_000)
    guidance: float = setting(7.5, "Classifier-free guidance scale.", minimum=0, maximum=1000)
    lr: float = setting(
        0.1, "SGD learning rate: a step moves the latents by lr * 2000/4096 * gradient (SD3, Flux: a multiple of "
        "DVRF's step sizes, default 1).", minimum=0, above_minimum=True, maximum=1000,
    )  # fmt: skip
    t_min: int = setting(50, "Lowest timestep drawn.", minimum=1, maximum=999, applies_to="noise")
    t_max: int = setting(950, "Timesteps are drawn below this.", minimum=2, maximum=999, applies_to="noise")
    seed: int | None = setting(
        None, "Seed: same seed, same result. Default: random, recorded in the output.", minimum=0, maximum=2**63 - 1,
        recorded=False,  # recorded on its own, as the seed actually drawn
    )  # fmt: skip
    negative: str = setting("", "Negative prompt (replaces the empty unconditional prompt).")
    size: int = setting(
        512, "Longest side of the working image, in pixels (default: the model's).", panel=INPUT_PANEL, minimum=8,
        maximum=16384,
    )  # fmt: skip
    keep_working_size: bool = setting(
        False, "Write the result at the working size, not the source's.", panel=INPUT_PANEL, recorded=False
    )
    paste_back: bool = setting(
        True, "Keep the source's pixels outside the mask.", panel=MASK_PANEL, flags=("--paste-back/--no-paste-back",)
    )
    feather: float = setting(
        2.0, "Seam blend width in pixels, inside the mask.", panel=MASK_PANEL, minimum=0, maximum=1000,
        needs="paste_back",
    )  # fmt: skip
    save_every: int = setting(
        0, "Keep a decoded frame every N steps (0: none; CLI default: steps / 25).", panel=INPUT_PANEL, minimum=0,
        maximum=1_000_000, recorded=False,
    )  # fmt: skip
    options: Any = None  # the method's own settings (None: a method without any, or not resolved yet)

    def __getattr__(self, name: str) -> Any:
        """The method's options read like shared settings: ``config.cut_weight`` is ``config.options.cut_weight``."""
        options = self.__dict__.get("options")
        if options is not None and name in option_names(options):
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__} has no setting {name!r} (for this method)")

    def replace(self, **overrides: Any) -> EditConfig:
        """A copy with ``overrides`` applied, each checked; ``None`` values are ignored (flag not given).

        Keys of the method's options go into ``options``; unknown keys are an InputError.
        """
        return apply_settings(self, {key: value for key, value in overrides.items() if value is not None})

    def validate(self, num_train_timesteps: int = 1000) -> None:
        """Raise InputError for settings that cannot work together, with the flags' names in the message."""
        for values in (self, self.options):
            if values is None:
                continue
            for item in declared(type(values)):
                problem = item.problem(getattr(values, item.name))
                if problem:
                    raise InputError(problem)
        highest = min(999, num_train_timesteps - 1)
        if not 1 <= self.t_min < self.t_max <= highest:
            raise InputError(
                f"timestep range must satisfy 1 <= --t-min < --t-max <= {highest}, got [{self.t_min}, {self.t_max})"
            )

    def settings(self) -> dict[str, Any]:
        """Every setting by name, the method's options included (lists for tuples: as JSON records them)."""
        values = {item.name: getattr(self, item.name) for item in declared(EditConfig)}
        if self.options is not None:
            values.update({item.name: getattr(self.options, item.name) for item in declared(type(self.options))})
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


def option_names(options: Any) -> set[str]:
    return set() if options is None else {item.name for item in declared(type(options))}


def apply_settings(config: EditConfig, values: dict[str, Any], label: Callable[[str], str] | None = None) -> EditConfig:
    """``config`` with ``values`` applied, each checked for type and range (``label(name)`` names it in errors)."""
    shared = declared_by_name(EditConfig)
    own = {} if config.options is None else declared_by_name(type(config.options))
    unknown = sorted(set(values) - set(shared) - set(own))
    if unknown:
        raise InputError(f"unknown edit setting(s): {', '.join(unknown)}")
    for name, value in values.items():
        item = shared.get(name) or own[name]
        value = tuple(value) if isinstance(value, list) else value
        problem = item.problem(value, label(name) if label else None)
        if problem:
            raise InputError(problem)
    shared_values = {key: _stored(value) for key, value in values.items() if key in shared}
    option_values = {key: _stored(value) for key, value in values.items() if key in own}
    options = dataclasses.replace(config.options, **option_values) if option_values else config.options
    return dataclasses.replace(config, **shared_values, options=options)


def _stored(value: Any) -> Any:
    """JSON lists (cut_patch_sizes) as the tuples the dataclasses hold; ints where floats are declared stay ints."""
    return tuple(value) if isinstance(value, list) else value


def resolve_config(
    method: Any, model_defaults: dict[str, Any], overrides: dict[str, Any], source: str = "ddsedit.json",
    family: Any = None,
) -> EditConfig:  # fmt: skip
    """An edit's settings for ``method`` (a :class:`ddsedit.methods.Method`), layer over layer, each value checked
    for type and range as it is applied: EditConfig's defaults, the family's working size, the method's own
    defaults, the model's ``ddsedit.json`` (``source`` names it in errors: its flat settings, then its
    ``methods.<name>`` section), then ``overrides`` (flags or keyword arguments; ``None``: not given).

    Flat ``ddsedit.json`` settings of other methods' options are skipped (they act on the methods that read
    them); anything no method reads is an error naming the file and the key.
    """
    from ddsedit.methods import all_methods

    config = method.default_config(None if family is None else family.name)
    if family is not None and "size" not in method.family_defaults.get(family.name, {}):
        config = dataclasses.replace(config, size=family.default_size)
    shared = {item.name for item in declared(EditConfig)}
    own = option_names(config.options)
    anywhere = shared | {item.name for other in all_methods() for item in declared(other.options)}
    per_method = model_defaults.get("methods", {})
    if not isinstance(per_method, dict):
        raise InputError(f"{source}: 'methods' must map method names to settings")
    flat = {key: value for key, value in model_defaults.items() if key != "methods"}
    section = per_method.get(method.name, {})
    if not isinstance(section, dict):
        raise InputError(f"{source}: methods.{method.name} must map settings to values")
    for where, values, allowed in ((flat, flat, anywhere), (f"methods.{method.name}", section, shared | own)):
        unknown = sorted(set(values) - allowed)
        if unknown:
            prefix = "" if where is flat else f"{where}."
            raise InputError(f"{source}: unknown setting {prefix}{unknown[0]!r}")
    config = apply_settings(config, {k: v for k, v in flat.items() if k in shared | own},
                            label=lambda name: f"{source}: {name}")  # fmt: skip
    config = apply_settings(config, section, label=lambda name: f"{source}: methods.{method.name}.{name}")
    given = {key: value for key, value in overrides.items() if value is not None}
    unknown = sorted(set(given) - shared - own)
    if unknown:
        raise InputError(f"{method.name} has no setting {unknown[0]!r}")
    return apply_settings(config, given)


def parse_text(item: Declared, text: str) -> Any:
    """A setting's value from text (a CSV cell, a flag): ``None`` when the text cannot be read as its type
    (the caller reports it through :meth:`Declared.problem`, which then names the text)."""
    base, _ = base_kind(item.kind)
    text = text.strip()
    try:
        if base is tuple:
            return tuple(int(part) for part in text.split(",") if part.strip())
        if base is bool:
            return {"true": True, "false": False, "1": True, "0": False}.get(text.lower())
        if base is int:
            return int(text)
        if base is float:
            return float(text)
    except ValueError:
        return None
    return text


def cell_value(item: Declared, value: Any) -> tuple[Any, str | None]:
    """A manifest cell as a setting's value and the problem with it (None: none): text is parsed, a whole number
    written as a float is taken for an integer setting."""
    if isinstance(value, str):
        parsed = parse_text(item, value)
        if parsed is None:
            base, _ = base_kind(item.kind)
            wanted = {int: "an integer", float: "a number", tuple: "comma-separated integers", bool: "true or false"}
            return None, f"{item.name} must be {wanted.get(base, 'text')}, got {value!r}"
        value = parsed
    base, _ = base_kind(item.kind)
    if base is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, list):
        value = tuple(value)
    return value, item.problem(value, item.name)
