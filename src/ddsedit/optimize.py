"""The optimisation loop shared by every method.

Each step draws one timestep and one noise tensor per image (or what the method's declared draw function
draws, e.g. PDS's second step and noise), asks the method's gradient function in :mod:`ddsedit.gradients` for
the gradient (one batched denoiser call for SDS, DDS and PDS), sets its non-finite elements to 0, applies the
mask, and takes an SGD step on the latents. Only the gradient and the draws differ between methods; both come
from the method's declaration (:mod:`ddsedit.methods`).

On a rectified-flow model (``flow_schedule`` given) the same loop walks the model's descending sigma schedule:
step ``i`` draws ``sigma_i`` and a noise (:func:`ddsedit.flowgradients.draw_flow_step`), the gradient is the
method's velocity form (:mod:`ddsedit.flowgradients`), and the step's size is DVRF's for that index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ddsedit import scores
from ddsedit.conditioning import call_unet
from ddsedit.flowgradients import FlowSchedule, draw_flow_step
from ddsedit.gradients import GradientInputs, NoiseSchedule, PromptEmbeddings, StepDraws, predict_epsilon
from ddsedit.methods import get_method

__all__ = ["LoopSettings", "PromptEmbeddings", "distill", "draw_step", "predict_epsilon"]

StepCallback = Callable[[int, torch.Tensor], None]
NonfiniteCallback = Callable[[int], None]


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know; checked by :class:`ddsedit.settings.EditConfig`."""

    method: str = "dds"
    steps: int = 200
    guidance: float = 7.5
    lr: float = 0.1
    t_min: int = 50
    t_max: int = 950  # exclusive: t is drawn uniformly from the integers t_min, ..., t_max - 1 (50 to 949)
    options: Any = None  # the method's options (None: its declared defaults)


def draw_step(
    generators: list[torch.Generator],
    settings: LoopSettings,
    image_shape: tuple[int, ...],
    device: torch.device,
    schedule: NoiseSchedule | None = None,
    step: int = 0,
) -> StepDraws:
    """The shared draws: per image, from its own generator, a timestep in ``[t_min, t_max)`` then a noise.

    Drawn on the device from seeded generators: reproducible, and no host sync. ``step`` (0-based) is not used:
    every step draws alike.
    """
    timesteps, noises = [], []
    for generator in generators:
        timesteps.append(torch.randint(settings.t_min, settings.t_max, (1,), generator=generator, device=device))
        noises.append(torch.randn(image_shape, generator=generator, device=device, dtype=torch.float32))
    return StepDraws(torch.cat(timesteps), torch.cat(noises))


def distill(
    unet: torch.nn.Module,
    source_latents: torch.Tensor,
    embeddings: PromptEmbeddings,
    alphas_cumprod: torch.Tensor | None,
    prediction_type: str,
    settings: LoopSettings,
    generators: list[torch.Generator],
    mask: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
    cuda_graph: bool = False,
    initial_latents: torch.Tensor | None = None,
    on_nonfinite: NonfiniteCallback | None = None,
    scheduler_config: dict[str, Any] | None = None,
    call: Callable[..., torch.Tensor] = call_unet,
    betas: torch.Tensor | None = None,
    flow_schedule: FlowSchedule | None = None,
    true_cfg: bool = True,
) -> torch.Tensor:
    """Optimise latents [K, C, h, w] starting from ``source_latents`` and return them (fp32).

    ``initial_latents`` (same shape) starts the optimisation elsewhere, e.g. from an earlier
    result; the DDS source branch still uses ``source_latents``.

    ``generators`` holds one seeded generator per image: each image draws its own timestep
    and noise, so an image gets the same draws whether it is edited alone or in a batch.

    ``mask`` ([K or 1, 1, h, w] in [0, 1]) scales the gradient, so that masked DDS only
    moves the latents where the mask is white. ``on_step(step, latents)`` is called after
    each update (1-based step), e.g. for a progress bar or intermediate frames.

    ``cuda_graph`` records one step (UNet call, guidance, gradient, update) as a CUDA graph
    and replays it: the same kernels on the same numbers, without launching each of the
    UNet's many kernels from Python every step. On a device other than CUDA the same
    static-buffer loop runs without recording (the tests check it against the plain loop).

    ``scheduler_config`` is the model's scheduler config (PDS's grid comes from it), ``betas`` its one-step
    betas; ``call`` is the family's denoiser call (:mod:`ddsedit.families`). ``flow_schedule`` makes it the loop of
    a rectified-flow model (``settings.steps`` must be its length; ``true_cfg``: how the family guides).

    NaN and infinite gradient elements are treated as 0 (:func:`ddsedit.scores.zero_nonfinite`);
    if any step had some, ``on_nonfinite(steps_with_any)`` is called once at the end.
    """
    device = source_latents.device
    if alphas_cumprod is not None:  # a flow scheduler has none
        alphas_cumprod = alphas_cumprod.to(device=device, dtype=torch.float32)
    source_latents = source_latents.float()
    method = get_method(settings.method)
    if settings.options is None:
        settings = dataclasses.replace(settings, options=method.default_options())
    options = settings.options
    if flow_schedule is not None and flow_schedule.steps != settings.steps:
        raise ValueError(f"the flow schedule has {flow_schedule.steps} steps, the settings {settings.steps}")
    gradient_function = method.gradient_function(velocity=flow_schedule is not None)
    if cuda_graph and not method.graphable:
        raise ValueError(f"a CUDA graph cannot record {settings.method}'s step")
    if len(generators) != source_latents.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for {source_latents.shape[0]} images")
    image_shape = (1, *source_latents.shape[1:])
    start = source_latents if initial_latents is None else initial_latents.to(device=device, dtype=torch.float32)
    if start.shape != source_latents.shape:
        raise ValueError(f"initial latents {tuple(start.shape)} differ from the source's {tuple(source_latents.shape)}")

    # Steps whose gradient had a non-finite element, counted on the device (read once, at the end).
    nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)

    inputs = GradientInputs(
        unet, source_latents, embeddings, alphas_cumprod, prediction_type, settings.guidance, options, generators,
        call, None if betas is None else betas.to(device=device, dtype=torch.float32), true_cfg,
    )  # fmt: skip
    if flow_schedule is None:
        draw = method.draw_function()
        schedule = NoiseSchedule(alphas_cumprod, dict(scheduler_config or {}))

        def draw_next(step: int) -> StepDraws:
            return draw(generators, settings, image_shape, device, schedule, step=step)
    else:
        eta = float(getattr(options, "eta", 0.0))

        def draw_next(step: int) -> StepDraws:
            return draw_flow_step(generators, flow_schedule, image_shape, device, step, eta)

    def update(latents: torch.Tensor, draws: StepDraws) -> torch.Tensor:
        gradient = gradient_function(inputs, latents, draws)
        gradient, had_nonfinite = scores.zero_nonfinite(gradient)
        nonfinite_steps.add_(had_nonfinite)
        if mask is not None:
            gradient = gradient * mask
        step_size = draws.extra.get("step_size")
        if step_size is None:
            return scores.sgd_step(latents, gradient, settings.lr)
        return latents - step_size.reshape(-1, *([1] * (latents.ndim - 1))) * gradient  # the flow schedule's size

    with torch.no_grad():
        if cuda_graph:
            latents = _distill_replayed(update, start, draw_next, settings.steps, on_step, nonfinite_steps)
        else:
            latents = start.clone()
            for step in range(1, settings.steps + 1):
                latents = update(latents, draw_next(step - 1))
                if on_step is not None:
                    on_step(step, latents)
    count = int(nonfinite_steps)
    if count and on_nonfinite is not None:
        on_nonfinite(count)
    return latents


def _distill_replayed(
    update: Callable[[torch.Tensor, StepDraws], torch.Tensor],
    start_latents: torch.Tensor,
    draw_next: Callable[[int], StepDraws],
    steps: int,
    on_step: StepCallback | None,
    nonfinite_steps: torch.Tensor,
) -> torch.Tensor:
    """The loop over fixed buffers: each step copies its draws in and replays the recorded update.

    A CUDA graph replays kernels on fixed addresses, so the latents and every draw (the method's own
    included) live in buffers that the step reads and overwrites in place.
    """
    device = start_latents.device
    latents = start_latents.clone()
    draws = draw_next(0)
    buffers = StepDraws(
        torch.empty_like(draws.timesteps), torch.empty_like(draws.noise),
        {name: torch.empty_like(value) for name, value in draws.extra.items()},
    )  # fmt: skip

    def load(drawn: StepDraws) -> None:
        buffers.timesteps.copy_(drawn.timesteps)
        buffers.noise.copy_(drawn.noise)
        for name, value in drawn.extra.items():
            buffers.extra[name].copy_(value)

    def step_in_place() -> None:
        latents.copy_(update(latents, buffers))

    replay = step_in_place
    if device.type == "cuda":
        # Warm-up on a side stream (allocator and library workspaces settle), as CUDA graph
        # capture requires; the warm-up's update is undone before the real steps.
        load(draws)
        side_stream = torch.cuda.Stream(device)
        side_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side_stream):
            for _ in range(2):
                step_in_place()
        torch.cuda.current_stream(device).wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step_in_place()
        latents.copy_(start_latents)
        nonfinite_steps.zero_()  # the warm-up and capture steps are not real steps
        replay = graph.replay
    for step in range(1, steps + 1):
        if step > 1:
            draws = draw_next(step - 1)
        load(draws)
        replay()
        if on_step is not None:
            on_step(step, latents)
    return latents.clone()
