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
from ddsedit.editor import Editor, method_options
from ddsedit.imageio import image_to_tensor
from ddsedit.methods import GRADIENTS, GradientInputs, PromptEmbeddings, StepDraws
from ddsedit.names import METHODS_WITH_REF
from ddsedit.optimize import predict_epsilon
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
    if method not in METHODS_WITH_REF:
        raise ValueError(f"drift needs a method with a reference branch ({', '.join(METHODS_WITH_REF)}), got {method}")
    config = editor.config(method, **{**(overrides or {}), "guidance": guidance})  # None: the model's
    components = editor.components
    source = _latents(editor, [render(case.source)[0] for case in cases])
    target = _latents(editor, [render(case.target)[0] for case in cases])
    query = editor.encode_prompts([case.query for case in cases])
    reference = editor.encode_prompts([case.ref for case in cases])
    empty = editor.encode_prompts([""] * len(cases))
    alphas_cumprod = components.alphas_cumprod.to(device=editor.device, dtype=torch.float32)
    num_train_timesteps = alphas_cumprod.shape[0]

    def inputs_at(scale: float) -> GradientInputs:
        patch_generators = [torch.Generator(device=editor.device).manual_seed(seed + i) for i in range(len(cases))]
        return GradientInputs(
            components.unet, source, PromptEmbeddings(empty, reference, query), alphas_cumprod,
            components.prediction_type, scale, method_options(config), patch_generators,
        )  # fmt: skip

    guided_inputs, plain_inputs = inputs_at(config.guidance), inputs_at(1.0)
    gradient_function = GRADIENTS[method]
    spacing = num_train_timesteps // config.pds_grid  # pds: t_prev is one grid spacing below t
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
            if method == "pds":
                step.previous_timesteps = (t - spacing).clamp(min=0)
                step.previous_noise = torch.randn(source.shape, generator=generator, device=editor.device)
            gradient += gradient_function(guided_inputs, target, step).detach() / draws
            conditional += gradient_function(plain_inputs, target, step).detach() / draws
            noisy_target = scores.add_noise(target, step.noise, alpha_bar)
            noisy_source = scores.add_noise(source, step.noise, alpha_bar)
            with torch.no_grad():
                epsilon = predict_epsilon(components.unet, torch.cat([noisy_target, noisy_source]), t.repeat(2),
                                          torch.cat([query, query]), alpha_bar.repeat(2),
                                          components.prediction_type)  # fmt: skip
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
    parser.add_argument("--method", default="dds", choices=METHODS_WITH_REF)
    parser.add_argument("--cut-weight", type=float, default=None, help="cds, ids: default: the model's")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from ddsedit.loading import quiet_third_party_output

    quiet_third_party_output()
    editor = Editor.from_pretrained(args.model, device=args.device)
    cases = evaluate.recolour_cases(args.cases, seed=args.seed)
    timesteps = tuple(int(t) for t in args.timesteps.split(","))
    rows = drift_table(editor, cases, timesteps, draws=args.draws, guidance=args.guidance, method=args.method,
                       overrides={"cut_weight": args.cut_weight})  # fmt: skip
    print(format_table(rows))


if __name__ == "__main__":
    main()
