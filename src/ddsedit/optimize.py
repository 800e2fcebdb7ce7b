"""The optimisation loop shared by SDS, DDS and masked DDS.

Each step draws one timestep and one noise tensor per image, makes ONE UNet call for
every prediction the method needs, applies classifier-free guidance, turns the
predictions into a gradient with the functions in :mod:`ddsedit.scores`, and takes an
SGD step on the latents. Only the gradient differs between methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddsedit import scores
from ddsedit.names import METHODS as METHODS  # defined there, torch-free; the editor imports it from here

StepCallback = Callable[[int, torch.Tensor], None]
NonfiniteCallback = Callable[[int], None]


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know; validated by :class:`ddsedit.editor.EditConfig`."""

    method: str = "dds"
    steps: int = 200
    guidance: float = 7.5
    lr: float = 0.1
    t_min: int = 50
    t_max: int = 950  # exclusive: t is drawn uniformly from the integers t_min, ..., t_max - 1 (50 to 949)


@dataclass
class PromptEmbeddings:
    """Text embeddings, one row per image: [K, tokens, dim] each."""

    unconditional: torch.Tensor
    source: torch.Tensor  # the --ref prompt: what the image shows
    target: torch.Tensor  # the --query prompt: what it should show


def predict_epsilon(
    unet: torch.nn.Module,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    embeddings: torch.Tensor,
    alpha_bar: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """One UNet call on a batch, returned as fp32 noise predictions."""
    unet_dtype = next(unet.parameters()).dtype
    prediction = unet(noisy_latents.to(unet_dtype), timesteps, encoder_hidden_states=embeddings, return_dict=False)[
        0
    ].float()
    return scores.epsilon_from_prediction(prediction, noisy_latents, alpha_bar, prediction_type)


def distillation_gradient(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    source_latents: torch.Tensor,
    embeddings: PromptEmbeddings,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    method: str,
    guidance: float,
) -> torch.Tensor:
    """The SDS or DDS gradient for one step, for K images at once, with one UNet call.

    DDS batches [source uncond, source cond, target uncond, target cond] (4K samples);
    SDS batches [target uncond, target cond] (2K samples). Source and target share the
    timestep and the noise.
    """
    alpha_bar = alphas_cumprod[timesteps]
    noisy_latents = scores.add_noise(latents, noise, alpha_bar)
    if method == "sds":
        batch = torch.cat([noisy_latents, noisy_latents])
        conditions = torch.cat([embeddings.unconditional, embeddings.target])
        repeats = 2
    else:
        noisy_source = scores.add_noise(source_latents, noise, alpha_bar)
        batch = torch.cat([noisy_source, noisy_source, noisy_latents, noisy_latents])
        conditions = torch.cat(
            [embeddings.unconditional, embeddings.source, embeddings.unconditional, embeddings.target]
        )
        repeats = 4
    epsilon = predict_epsilon(
        unet, batch, timesteps.repeat(repeats), conditions, alpha_bar.repeat(repeats), prediction_type
    )
    chunks = epsilon.chunk(repeats)
    if method == "sds":
        target = scores.classifier_free_guidance(chunks[0], chunks[1], guidance)
        return scores.sds_gradient(target, noise)
    source = scores.classifier_free_guidance(chunks[0], chunks[1], guidance)
    target = scores.classifier_free_guidance(chunks[2], chunks[3], guidance)
    return scores.dds_gradient(target, source)


def draw_step(
    generators: list[torch.Generator], settings: LoopSettings, image_shape: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's timesteps [K] and noise [K, C, h, w]: each image draws from its own generator.

    Drawn on the device from seeded generators: reproducible, and no host sync.
    """
    draws = [
        (
            torch.randint(settings.t_min, settings.t_max, (1,), generator=generator, device=device),
            torch.randn(image_shape, generator=generator, device=device, dtype=torch.float32),
        )
        for generator in generators
    ]
    return torch.cat([t for t, _ in draws]), torch.cat([n for _, n in draws])


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
    gradient_method = "sds" if settings.method == "sds" else "dds"
    if len(generators) != source_latents.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for {source_latents.shape[0]} images")
    image_shape = (1, *source_latents.shape[1:])
    start = source_latents if initial_latents is None else initial_latents.to(device=device, dtype=torch.float32)
    if start.shape != source_latents.shape:
        raise ValueError(f"initial latents {tuple(start.shape)} differ from the source's {tuple(source_latents.shape)}")

    # Steps whose gradient had a non-finite element, counted on the device (read once, at the end).
    nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)

    def update(latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        gradient = distillation_gradient(
            unet, latents, source_latents, embeddings, timesteps, noise,
            alphas_cumprod, prediction_type, gradient_method, settings.guidance,
        )  # fmt: skip
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
                timesteps, noise = draw_step(generators, settings, image_shape, device)
                latents = update(latents, timesteps, noise)
                if on_step is not None:
                    on_step(step, latents)
    count = int(nonfinite_steps)
    if count and on_nonfinite is not None:
        on_nonfinite(count)
    return latents


def _distill_replayed(
    update: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
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
    timesteps, noise = draw_step(generators, settings, image_shape, device)
    timestep_buffer, noise_buffer = torch.empty_like(timesteps), torch.empty_like(noise)

    def step_in_place() -> None:
        latents.copy_(update(latents, timestep_buffer, noise_buffer))

    replay = step_in_place
    if device.type == "cuda":
        # Warm-up on a side stream (allocator and library workspaces settle), as CUDA graph
        # capture requires; the warm-up's update is undone before the real steps.
        timestep_buffer.copy_(timesteps)
        noise_buffer.copy_(noise)
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
            timesteps, noise = draw_step(generators, settings, image_shape, device)
        timestep_buffer.copy_(timesteps)
        noise_buffer.copy_(noise)
        replay()
        if on_step is not None:
            on_step(step, latents)
    return latents.clone()
