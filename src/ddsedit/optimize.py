"""The optimisation loop shared by every method.

Each step draws one timestep and one noise tensor per image (PDS: two of each), asks the method's
gradient function in :mod:`ddsedit.methods` for the gradient (one batched UNet call for SDS, DDS and
PDS), sets its non-finite elements to 0, applies the mask, and takes an SGD step on the latents.
Only the gradient differs between methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ddsedit import scores
from ddsedit.methods import (
    GRADIENTS,
    GradientInputs,
    MethodOptions,
    PromptEmbeddings,
    StepDraws,
    predict_epsilon,
)
from ddsedit.names import METHODS as METHODS  # defined there, torch-free; the editor imports it from here

__all__ = ["METHODS", "LoopSettings", "MethodOptions", "PromptEmbeddings", "distill", "draw_step", "predict_epsilon"]

StepCallback = Callable[[int, torch.Tensor], None]
NonfiniteCallback = Callable[[int], None]
# Methods whose step is one UNet call without autograd: the ones a CUDA graph can record.
GRAPHABLE_METHODS = ("sds", "dds", "masked-dds")


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know; validated by :class:`ddsedit.settings.EditConfig`."""

    method: str = "dds"
    steps: int = 200
    guidance: float = 7.5
    lr: float = 0.1
    t_min: int = 50
    t_max: int = 950  # exclusive: t is drawn uniformly from the integers t_min, ..., t_max - 1 (50 to 949)
    options: MethodOptions = field(default_factory=MethodOptions)


def pds_grid(num_train_timesteps: int, grid_steps: int, t_min: int, t_max: int) -> tuple[torch.Tensor, int]:
    """The DDIM grid points PDS draws t from (within ``[t_min, t_max)``, each with a previous point) and the spacing."""
    spacing = num_train_timesteps // grid_steps
    points = torch.arange(spacing, num_train_timesteps, spacing)
    return points[(points >= t_min) & (points < t_max)], spacing


def draw_step(
    generators: list[torch.Generator],
    settings: LoopSettings,
    image_shape: tuple[int, ...],
    device: torch.device,
    num_train_timesteps: int = 1000,
) -> StepDraws:
    """One step's draws: each image draws from its own generator, in a fixed order (t, noise, then PDS's).

    Drawn on the device from seeded generators: reproducible, and no host sync.
    """
    grid, spacing = (None, 0)
    if settings.method == "pds":
        grid, spacing = pds_grid(num_train_timesteps, settings.options.pds_grid, settings.t_min, settings.t_max)
        grid = grid.to(device)
    timesteps, noises, previous_noises = [], [], []
    for generator in generators:
        if grid is None:
            timesteps.append(torch.randint(settings.t_min, settings.t_max, (1,), generator=generator, device=device))
        else:
            index = torch.randint(0, len(grid), (1,), generator=generator, device=device)
            timesteps.append(grid[index])
        noises.append(torch.randn(image_shape, generator=generator, device=device, dtype=torch.float32))
        if grid is not None:
            previous_noises.append(torch.randn(image_shape, generator=generator, device=device, dtype=torch.float32))
    draws = StepDraws(torch.cat(timesteps), torch.cat(noises))
    if grid is not None:
        draws.previous_timesteps = draws.timesteps - spacing
        draws.previous_noise = torch.cat(previous_noises)
    return draws


def distill(
    unet: torch.nn.Module,
    source_latents: torch.Tensor,
    embeddings: PromptEmbeddings,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    settings: LoopSettings,
    generators: list[torch.Generator],
    mask: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
    cuda_graph: bool = False,
    initial_latents: torch.Tensor | None = None,
    on_nonfinite: NonfiniteCallback | None = None,
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

    NaN and infinite gradient elements are treated as 0 (:func:`ddsedit.scores.zero_nonfinite`);
    if any step had some, ``on_nonfinite(steps_with_any)`` is called once at the end.
    """
    device = source_latents.device
    alphas_cumprod = alphas_cumprod.to(device=device, dtype=torch.float32)
    source_latents = source_latents.float()
    gradient_function = GRADIENTS[settings.method]
    if cuda_graph and settings.method not in GRAPHABLE_METHODS:
        raise ValueError(f"a CUDA graph records {', '.join(GRAPHABLE_METHODS)} steps, not {settings.method}")
    if len(generators) != source_latents.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for {source_latents.shape[0]} images")
    image_shape = (1, *source_latents.shape[1:])
    start = source_latents if initial_latents is None else initial_latents.to(device=device, dtype=torch.float32)
    if start.shape != source_latents.shape:
        raise ValueError(f"initial latents {tuple(start.shape)} differ from the source's {tuple(source_latents.shape)}")

    # Steps whose gradient had a non-finite element, counted on the device (read once, at the end).
    nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)

    inputs = GradientInputs(
        unet, source_latents, embeddings, alphas_cumprod, prediction_type, settings.guidance, settings.options,
        generators,
    )  # fmt: skip
    num_train_timesteps = alphas_cumprod.shape[0]

    def update(latents: torch.Tensor, draws: StepDraws) -> torch.Tensor:
        gradient = gradient_function(inputs, latents, draws)
        gradient, had_nonfinite = scores.zero_nonfinite(gradient)
        nonfinite_steps.add_(had_nonfinite)
        if mask is not None:
            gradient = gradient * mask
        return scores.sgd_step(latents, gradient, settings.lr)

    with torch.no_grad():
        if cuda_graph:
            latents = _distill_replayed(update, start, generators, settings, image_shape, on_step, nonfinite_steps)
        else:
            latents = start.clone()
            for step in range(1, settings.steps + 1):
                latents = update(latents, draw_step(generators, settings, image_shape, device, num_train_timesteps))
                if on_step is not None:
                    on_step(step, latents)
    count = int(nonfinite_steps)
    if count and on_nonfinite is not None:
        on_nonfinite(count)
    return latents


def _distill_replayed(
    update: Callable[[torch.Tensor, StepDraws], torch.Tensor],
    start_latents: torch.Tensor,
    generators: list[torch.Generator],
    settings: LoopSettings,
    image_shape: tuple[int, ...],
    on_step: StepCallback | None,
    nonfinite_steps: torch.Tensor,
) -> torch.Tensor:
    """The loop over fixed buffers: each step copies its draws in and replays the recorded update.

    A CUDA graph replays kernels on fixed addresses, so the latents, timesteps and noise
    live in buffers that the step reads and overwrites in place.
    """
    device = start_latents.device
    latents = start_latents.clone()
    draws = draw_step(generators, settings, image_shape, device)
    timestep_buffer, noise_buffer = torch.empty_like(draws.timesteps), torch.empty_like(draws.noise)
    buffers = StepDraws(timestep_buffer, noise_buffer)

    def step_in_place() -> None:
        latents.copy_(update(latents, buffers))

    replay = step_in_place
    if device.type == "cuda":
        # Warm-up on a side stream (allocator and library workspaces settle), as CUDA graph
        # capture requires; the warm-up's update is undone before the real steps.
        timestep_buffer.copy_(draws.timesteps)
        noise_buffer.copy_(draws.noise)
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
    for step in range(1, settings.steps + 1):
        if step > 1:
            draws = draw_step(generators, settings, image_shape, device)
        timestep_buffer.copy_(draws.timesteps)
        noise_buffer.copy_(draws.noise)
        replay()
        if on_step is not None:
            on_step(step, latents)
    return latents.clone()
