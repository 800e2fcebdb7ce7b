"""What a shapes model reads in a noisy source under each caption: its clean-image prediction, scored.

    python -m shapes_training.readout --model shapes-flow --cases 16 [--levels 0.2,0.4,0.6,0.8] [--guidance 1,6]

Every edit method with a reference branch (DDS, DVRF, FlowEdit) moves the image along the difference of two
predictions at the same noisy source: the model's under the query and under the reference. It can recolour a
shape only if, under the query, the model predicts the query-coloured shape where the source's shape is; if the
model reads the wrongly coloured shape as background, the difference erases the shape instead. This measures that
directly, on recolour cases (seeded apart from eval-shapes', as tune's): the source is noised to a level (flow
models: sigma; noise models: the timestep of the same signal-to-noise ratio, ((1 - s) / s)^2), the model predicts
the clean latents under the query and under the reference (guidance 1 and others), the prediction is decoded and
read back as an edit would be:
- ``query IoU``: the query-coloured pixels against the source's shape (what a recolour needs);
- ``shape IoU``: pixels of any shape colour against the source's shape (the shape is there, whatever its colour);
- ``read as background``: the share of cases whose shape IoU is below 0.2 (the shape predicted away).
Figures per background, medians over the cases; the same noise per case for every prompt and scale.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import numpy as np
import torch

from ddsedit import scores
from ddsedit.editor import Editor
from ddsedit.flowscores import flow_noise, guided_velocity
from ddsedit.imageio import image_to_tensor, tensor_to_image
from ddsedit.shapes import evaluate
from ddsedit.shapes.metrics import colour_mask, iou
from ddsedit.shapes.world import BACKGROUNDS, COLOURS, DOT_GREY, IMAGE_SIZE, render
from shapes_training.tune import TUNE_SEED

LEVELS = (0.2, 0.4, 0.6, 0.8)
LOST = 0.2  # shape IoU below this: the shape was predicted away


@dataclass
class ReadoutRow:
    level: float
    background: str
    prompt: str  # "query" or "ref"
    guidance: float
    query_iou: float
    shape_iou: float
    read_as_background: float


def any_shape_mask(image: np.ndarray, background: str) -> np.ndarray:
    """Pixels nearer to some shape colour than to the background and the dots' grey."""
    palette = np.array([*COLOURS.values(), BACKGROUNDS[background], DOT_GREY], dtype=np.float32)
    distances = ((image[:, :, None, :].astype(np.float32) - palette[None, None]) ** 2).sum(-1)
    return distances.argmin(-1) < len(COLOURS)


def matched_timestep(alphas_cumprod: torch.Tensor, level: float) -> int:
    """The noise model's timestep whose signal-to-noise ratio is the flow level's, ((1 - s) / s)^2."""
    wanted = (1 - level) ** 2 / ((1 - level) ** 2 + level**2)  # alpha_bar of that SNR
    return int((alphas_cumprod.float() - wanted).abs().argmin())


@torch.no_grad()
def predicted_clean(editor: Editor, latents: torch.Tensor, noise: torch.Tensor, level: float, prompts: list[str],
                    guidance: float) -> torch.Tensor:  # fmt: skip
    """The model's guided prediction of the clean latents from `latents` noised to `level`, one prompt per row."""
    components = editor.components
    if not editor.family.true_cfg:
        raise SystemExit(f"readout guides by an unconditional call; {editor.family.name} takes guidance as an input")
    call = editor.family.function("call_denoiser")
    count = len(prompts)
    conditions = editor.encode_prompt(["" for _ in prompts] + prompts)
    if editor.is_flow:
        sigma = torch.full((count,), level, device=editor.device)
        noisy = flow_noise(latents, noise, sigma)
        velocity = call(components.unet, torch.cat([noisy, noisy]).to(editor.dtype), sigma.repeat(2), conditions)
        unconditional, conditional = velocity.float().chunk(2)
        return noisy - sigma.reshape(-1, 1, 1, 1) * guided_velocity(unconditional, conditional, guidance)
    alphas_cumprod = components.alphas_cumprod.to(editor.device, torch.float32)
    timestep = torch.full((count,), matched_timestep(alphas_cumprod, level), device=editor.device)
    alpha_bar = alphas_cumprod[timestep]
    noisy = scores.add_noise(latents, noise, alpha_bar)
    prediction = call(components.unet, torch.cat([noisy, noisy]).to(editor.dtype), timestep.repeat(2), conditions)
    epsilon = scores.epsilon_from_prediction(prediction.float(), torch.cat([noisy, noisy]), alpha_bar.repeat(2),
                                             components.prediction_type)  # fmt: skip
    unconditional, conditional = epsilon.chunk(2)
    guided = scores.classifier_free_guidance(unconditional, conditional, guidance)
    ab = alpha_bar.reshape(-1, 1, 1, 1)
    return (noisy - (1 - ab).sqrt() * guided) / ab.sqrt()


def readout(editor: Editor, cases: list[evaluate.EditCase], levels: tuple[float, ...] = LEVELS,
            guidances: tuple[float, ...] = (1.0,), seed: int = 0) -> list[ReadoutRow]:  # fmt: skip
    """The rows of the table: per level, background, prompt and guidance, over `cases`."""
    pixels = torch.cat([image_to_tensor(render(case.source)[0], (IMAGE_SIZE, IMAGE_SIZE)) for case in cases])
    latents = editor.encode_image(pixels).float()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for level in levels:
        noise = torch.randn(latents.shape, generator=generator).to(editor.device)
        for prompt in ("query", "ref"):
            for guidance in guidances:
                prompts = [case.query if prompt == "query" else case.ref for case in cases]
                clean = predicted_clean(editor, latents, noise, level, prompts, guidance)
                images = [np.asarray(tensor_to_image(image)) for image in editor.decode(clean.to(editor.dtype))]
                for background in BACKGROUNDS:
                    chosen = [(c, im) for c, im in zip(cases, images, strict=True) if c.source.background == background]
                    if not chosen:
                        continue
                    query_ious, shape_ious = [], []
                    for case, image in chosen:
                        source_shape = render(case.source)[1]
                        colour = case.target.colour if prompt == "query" else case.source.colour
                        query_ious.append(iou(colour_mask(image, colour, background), source_shape))
                        shape_ious.append(iou(any_shape_mask(image, background), source_shape))
                    rows.append(ReadoutRow(level, background, prompt, guidance, statistics.median(query_ious),
                                           statistics.median(shape_ious),
                                           float(np.mean([value < LOST for value in shape_ious]))))  # fmt: skip
    return rows


def format_table(rows: list[ReadoutRow]) -> str:
    lines = ["| level | background | prompt | guidance | its colour's IoU | shape IoU | read as background |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row.level:g} | {row.background} | {row.prompt} | {row.guidance:g} | {row.query_iou:.3f} | "
                     f"{row.shape_iou:.3f} | {row.read_as_background:.0%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shapes_training.readout", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--seed", type=int, default=TUNE_SEED, help="the cases' seed (tune's by default)")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="noise levels (flow sigma), in (0, 1)")
    parser.add_argument("--guidance", default="1", help="comma-separated guidance scales")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        levels = tuple(float(v) for v in args.levels.split(","))
        guidances = tuple(float(v) for v in args.guidance.split(","))
    except ValueError:
        parser.error("--levels and --guidance are comma-separated numbers")
    if not all(0 < level < 1 for level in levels) or args.cases < 1:
        parser.error("levels must be in (0, 1) and --cases at least 1")

    from ddsedit.loading import quiet_third_party_output

    quiet_third_party_output()
    editor = Editor.from_pretrained(args.model, device=args.device)
    cases = evaluate.recolour_cases(args.cases, seed=args.seed)
    print(format_table(readout(editor, cases, levels, guidances)))


if __name__ == "__main__":
    main()
