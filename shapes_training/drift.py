"""Where an edit drifts from the right answer: the method's expected gradient there, per timestep and background.

    python -m shapes_training.drift --model shapes --cases 40 --draws 8 --method ids

Started at the right answer (the target image's latents), an edit stays there only if the method's
expected gradient vanishes. This measures it on recolour cases, at fixed timesteps, averaged over
``draws`` noise draws (drawn as the loop draws them: the same noise for source and target; PDS's
previous step one grid spacing below), by calling the method's own gradient function
(``ddsedit.methods.GRADIENTS``), so every method (``dds``, ``cds``, ``pds``, ``ids``) is measured
by the code that edits. It splits the gradient:

- ``conditional``: the gradient at guidance 1 (for DDS: query prediction at the target minus
  reference prediction at the source);
- ``guided``: what classifier-free guidance adds (the gradient minus its guidance-1 part; for DDS
  ``(g - 1)`` times the difference of the two branches' conditional-minus-unconditional
  predictions). Where the image already shows what the caption says, a perfect model's two
  predictions agree, so this part is the model's error scaled by the guidance.

It also reports the noise-prediction error of the query caption at the target (what training
minimises) and at the source (how far the query caption pulls an unedited image): a quick look at
a model before the 20-minute eval. Mean squares per latent element, averaged over the cases of
each background.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ddsedit import scores
from ddsedit.conditioning import Conditioning
from ddsedit.editor import Editor
from ddsedit.errors import InputError
from ddsedit.gradients import GradientInputs, PromptEmbeddings, StepDraws, predict_epsilon
from ddsedit.imageio import image_to_tensor
from ddsedit.methods import get_method, method_names
from ddsedit.shapes import evaluate
from ddsedit.shapes.world import BACKGROUNDS, IMAGE_SIZE, render

TIMESTEPS = (50, 100, 200, 300, 400, 500, 600, 700, 800, 900)


@dataclass
class DriftRow:
    """One timestep, one background: mean squares per latent element."""

    timestep: int
    background: str
    gradient: float  # the method's expected gradient at the right answer
    conditional: float  # its guidance-1 part
    guided: float  # the part the guidance adds
    error_at_target: float  # noise-prediction error of the query caption at the target
    error_at_source: float  # the same caption's error at the unedited source


def _latents(editor: Editor, images: list[Image.Image]) -> torch.Tensor:
    pixels = torch.cat([image_to_tensor(image, (IMAGE_SIZE, IMAGE_SIZE)) for image in images])
    return editor.encode_image(pixels)


def drift_table(
    editor: Editor,
    cases: list[evaluate.EditCase],
    timesteps: tuple[int, ...] = TIMESTEPS,
    draws: int = 8,
    guidance: float | None = None,
    seed: int = 0,
    method: str = "dds",
    overrides: dict[str, Any] | None = None,
) -> list[DriftRow]:
    """The expected gradient of ``method`` at the right answer of ``cases``, per timestep and background.

    ``method``'s settings are the editor's (``editor.config(method)``), with ``overrides`` (e.g.
    ``{"cut_weight": 0.0}``) and ``guidance`` over them.
    """
    with_ref = reference_methods()
    if method not in with_ref:
        raise InputError(f"drift needs a method with a reference branch ({', '.join(with_ref)}), got {method}")
    declaration = get_method(method)
    config = editor.config(method, **declaration.reads({**(overrides or {}), "guidance": guidance}))  # None: model's
    config.validate(editor.components.num_train_timesteps)
    highest = editor.components.num_train_timesteps - 1
    if not timesteps or any(not 1 <= t <= highest for t in timesteps):
        raise InputError(f"timesteps must be in [1, {highest}], got {', '.join(map(str, timesteps)) or 'none'}")
    if draws < 1 or not cases:
        raise InputError(f"need at least one case and one draw, got {len(cases)} cases and {draws} draws")
    components = editor.components
    source = _latents(editor, [render(case.source)[0] for case in cases])
    target = _latents(editor, [render(case.target)[0] for case in cases])
    query = editor.encode_prompt([case.query for case in cases])
    reference = editor.encode_prompt([case.ref for case in cases])
    empty = editor.encode_prompt([""] * len(cases))
    alphas_cumprod = components.alphas_cumprod.to(device=editor.device, dtype=torch.float32)

    def inputs_at(scale: float) -> GradientInputs:
        patch_generators = [torch.Generator(device=editor.device).manual_seed(seed + i) for i in range(len(cases))]
        return GradientInputs(
            components.unet, source, PromptEmbeddings(empty, reference, query), alphas_cumprod,
            components.prediction_type, scale, config.options, patch_generators,
            betas=components.betas,
        )  # fmt: skip

    guided_inputs, plain_inputs = inputs_at(config.guidance), inputs_at(1.0)
    gradient_function = declaration.gradient_function()
    generator = torch.Generator(device=editor.device).manual_seed(seed)
    rows = []
    for timestep in timesteps:
        t = torch.full((len(cases),), timestep, device=editor.device)
        alpha_bar = alphas_cumprod[t]
        gradient = torch.zeros_like(source)
        conditional = torch.zeros_like(source)
        error_target = torch.zeros(len(cases), device=editor.device)
        error_source = torch.zeros(len(cases), device=editor.device)
        for _ in range(draws):
            step = StepDraws(t, torch.randn(source.shape, generator=generator, device=editor.device))
            if method == "pds":  # t on the scheduler's grid, and the grid's previous step
                step = pds_step_at(editor, config, timestep, step, generator)
            gradient += gradient_function(guided_inputs, target, step).detach() / draws
            conditional += gradient_function(plain_inputs, target, step).detach() / draws
            noisy_target = scores.add_noise(target, step.noise, alpha_bar)
            noisy_source = scores.add_noise(source, step.noise, alpha_bar)
            with torch.no_grad():
                epsilon = predict_epsilon(plain_inputs, torch.cat([noisy_target, noisy_source]), t.repeat(2),
                                          Conditioning.cat([query, query]), alpha_bar.repeat(2))  # fmt: skip
            query_at_target, query_at_source = epsilon.chunk(2)
            error_target += (query_at_target - step.noise).pow(2).mean((1, 2, 3)) / draws
            error_source += (query_at_source - step.noise).pow(2).mean((1, 2, 3)) / draws
        per_case = {
            "gradient": gradient.pow(2).mean((1, 2, 3)),
            "conditional": conditional.pow(2).mean((1, 2, 3)),
            "guided": (gradient - conditional).pow(2).mean((1, 2, 3)),
            "error_at_target": error_target,
            "error_at_source": error_source,
        }
        for background in BACKGROUNDS:
            chosen = torch.tensor([case.source.background == background for case in cases], device=editor.device)
            if chosen.any():
                rows.append(DriftRow(timestep, background,
                                     **{k: float(v[chosen].mean()) for k, v in per_case.items()}))  # fmt: skip
    return rows


def reference_methods() -> tuple[str, ...]:
    """The registered methods with a reference branch (drift is measured against the source's)."""
    return tuple(name for name in method_names() if get_method(name).needs_ref)


def pds_step_at(editor: Editor, config: Any, timestep: int, step: StepDraws, generator: torch.Generator) -> StepDraws:
    """PDS's draws at ``timestep``, which must be a point of its grid: the grid's previous step and a second noise."""
    from ddsedit import pds

    grid = pds.pds_timesteps(editor.components.scheduler_config, config.options.pds_grid).to(editor.device)
    index = int(torch.searchsorted(grid, torch.tensor(timestep, device=editor.device)))
    if index == 0 or index >= len(grid) or int(grid[index]) != timestep:
        near = ", ".join(str(int(t)) for t in grid[max(0, index - 1) : index + 1])
        raise InputError(f"pds: timestep {timestep} is not on its {config.options.pds_grid}-step grid (near: {near})")
    previous = torch.full_like(step.timesteps, int(grid[index - 1]))
    noise = torch.randn(step.noise.shape, generator=generator, device=editor.device)
    return StepDraws(step.timesteps, step.noise, {"previous_timesteps": previous, "previous_noise": noise})


def format_table(rows: list[DriftRow]) -> str:
    """A markdown table: one line per timestep, white and black side by side."""
    backgrounds = list(dict.fromkeys(row.background for row in rows))
    fields = ("gradient", "conditional", "guided", "error_at_target", "error_at_source")
    header = " | ".join(f"{field} ({'/'.join(backgrounds)})" for field in fields)
    lines = [f"| t | {header} |", "|---" * (len(fields) + 1) + "|"]
    for timestep in dict.fromkeys(row.timestep for row in rows):
        by_background = {row.background: row for row in rows if row.timestep == timestep}
        cells = [" / ".join(f"{getattr(by_background[b], field):.4f}" for b in backgrounds) for field in fields]
        lines.append(f"| {timestep} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shapes_training.drift", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=123, help="case seed (123: the tune cases, not the eval's)")
    parser.add_argument("--draws", type=int, default=8, help="noise draws averaged per timestep")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's")
    parser.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)))
    parser.add_argument("--method", default="dds", choices=reference_methods())
    parser.add_argument("--cut-weight", type=float, default=None, help="cds, ids: default: the model's")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from ddsedit.loading import quiet_third_party_output

    quiet_third_party_output()
    try:
        timesteps = tuple(int(t) for t in args.timesteps.split(",") if t.strip())
    except ValueError:
        parser.error(f"--timesteps must be comma-separated integers, got {args.timesteps!r}")
    if args.cases < 1 or args.draws < 1:
        parser.error("--cases and --draws must be at least 1")
    editor = Editor.from_pretrained(args.model, device=args.device)
    cases = evaluate.recolour_cases(args.cases, seed=args.seed)
    try:
        rows = drift_table(editor, cases, timesteps, draws=args.draws, guidance=args.guidance, method=args.method,
                           overrides={"cut_weight": args.cut_weight})  # fmt: skip
    except InputError as error:
        parser.error(str(error))
    print(format_table(rows))


if __name__ == "__main__":
    main()
