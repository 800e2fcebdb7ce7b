"""What an edit's output records: its parameters (batch resume compares them) and the text written into the file.

Imports no torch, so that batch's resume check reads and compares outputs without loading the libraries.
"""

from __future__ import annotations

import json
from typing import Any

from ddsedit import __version__
from ddsedit.methods import get_method
from ddsedit.settings import EditConfig

AUTO_MASK = "auto"  # as ddsedit.automask names it (not imported: that module imports numpy and PIL)


def edit_parameters(
    method: str, ref: str, query: str, seed: int, config: EditConfig, masked: bool = False,
    auto_mask: Any = None, prediction: str = "noise",
) -> dict[str, Any]:  # fmt: skip
    """What decides an edit's result, as its output's metadata records it (batch resume compares these).

    The method's declaration says which settings act (:meth:`ddsedit.methods.Method.recorded`): the shared
    ones, the method's own, the mask's only with a mask (masked-dds always has one; cds, pds and ids may).
    ``auto_mask`` (an AutoMaskSettings with its seed set): recorded as ``mask: auto`` and ``mask_*``.
    ``prediction``: what the model's denoiser predicts (``noise``, ``velocity``); settings of the other kind
    (``--t-min`` on SD3, ``--eta`` on SD) do not act and are not recorded.
    """
    parameters: dict[str, Any] = {"method": method, "ref": ref, "query": query, "seed": seed}
    parameters.update(get_method(method).recorded(config, masked=masked, prediction=prediction))
    if auto_mask is not None:
        parameters.update(auto_mask.recorded())
    return parameters


def _webui_value(value: Any) -> str:
    """A value as web UIs write it in ``Key: value, ...``: quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def webui_parameters(parameters: dict[str, Any], size: tuple[int, int]) -> str:
    """The ``parameters`` text of Stable Diffusion web UIs: the prompt (here the query), ``Negative prompt:``,
    then ``Steps: ..., CFG scale: ..., Seed: ..., Size: WxH, Model: ...`` (``VAE: ...`` if one was given) and
    ddsedit's own fields."""
    fields: dict[str, Any] = {
        "Steps": parameters["steps"],
        "CFG scale": parameters["guidance"],
        "Seed": parameters["seed"],
        "Size": f"{size[0]}x{size[1]}",
        "Model": parameters.get("model", ""),
    }
    if parameters.get("vae"):
        fields["VAE"] = parameters["vae"]
    fields["Method"] = parameters["method"]
    if parameters.get("ref"):
        fields["Ref prompt"] = parameters["ref"]
    if "lr" in parameters:  # FlowEdit's steps are the schedule's
        fields["Learning rate"] = parameters["lr"]
    if "t_min" in parameters:  # noise-predicting models draw timesteps; flow models walk their schedule
        fields["Timesteps"] = f"{parameters['t_min']}-{parameters['t_max'] - 1}"
    method = get_method(parameters["method"])
    own = [item for item in _declared_options(method) if item in parameters]
    fields.update({name.replace("_", " ").capitalize(): parameters[name] for name in own})
    if "paste_back" in parameters:
        fields["Paste back"] = parameters["paste_back"]
    if "feather" in parameters:
        fields["Feather"] = parameters["feather"]
    if parameters.get("mask") == AUTO_MASK:
        fields.update({
            "Mask": "auto", "Mask strength": parameters["mask_strength"], "Mask noises": parameters["mask_noises"],
            "Mask threshold": parameters["mask_threshold"], "Mask grow": parameters["mask_grow"],
            "Mask seed": parameters["mask_seed"],
        })  # fmt: skip
    fields["Version"] = f"ddsedit {parameters.get('ddsedit_version', __version__)}"
    lines = [str(parameters["query"])]
    if parameters.get("negative"):
        lines.append(f"Negative prompt: {parameters['negative']}")
    lines.append(", ".join(f"{key}: {_webui_value(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def _declared_options(method: Any) -> list[str]:
    from ddsedit.settings import declared

    return [item.name for item in declared(method.options)]


def file_text(parameters: dict[str, Any], size: tuple[int, int]) -> dict[str, str]:
    """Text for the output file: each parameter, all of them as JSON under ``ddsedit``, and ``parameters`` in the
    form Stable Diffusion web UIs write (which image browsers show)."""
    text = {key: str(value) for key, value in parameters.items()}
    text["ddsedit"] = json.dumps(parameters, sort_keys=True)
    text["parameters"] = webui_parameters(parameters, size)
    return text
