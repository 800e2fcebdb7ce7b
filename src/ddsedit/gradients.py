"""One gradient function per edit method: the denoiser calls each method needs, then the math of :mod:`ddsedit.scores`.

Every function takes the step's :class:`GradientInputs`, the latents being optimised and the step's
:class:`StepDraws`, and returns the gradient [K, C, h, w] that :func:`ddsedit.optimize.distill` steps
along (in DDS's units: one step moves the latents by ``lr * GRADIENT_SCALE * gradient``). Which function a
method uses, and its draws, are declared in :mod:`ddsedit.methods`.

- ``sds``: guided prediction minus the noise.
- ``dds`` (and ``masked-dds``, which masks the same gradient): target minus source guided prediction,
  both from one denoiser call of 4K samples.
- ``pds`` (Koo et al., 2024): the same call; target minus source standardised posterior samples, between t
  and the previous step of its grid, which :func:`pds_draws` draws with a second noise.
- ``cds`` (Nam et al., 2024): DDS plus the gradient of a contrastive (PatchNCE) loss between the
  self-attention features of the source and of the target branch, which keeps the target's
  structure patch by patch; one more forward pass with autograd, of the conditional target only.
- ``ids`` (Kim et al., 2025): before DDS, a few steps move the source branch's noisy latent until its
  x0 prediction is the source again; the noise that latent implies is then shared with the target.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ddsedit import scores
from ddsedit.attention import SelfAttentionRecorder, feature_grid
from ddsedit.conditioning import Conditioning, call_unet
from ddsedit.errors import InputError


@dataclass
class PromptEmbeddings:
    """The conditionings of the prompts, one row per image (tensors [K, tokens, dim] are taken as SD's)."""

    unconditional: Conditioning
    source: Conditioning  # the --ref prompt: what the image shows
    target: Conditioning  # the --query prompt: what it should show

    def __post_init__(self) -> None:
        for name in ("unconditional", "source", "target"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, Conditioning(value))


@dataclass
class StepDraws:
    """One step's random draws, one row per image, all from the images' own seeded generators.

    ``extra`` holds a method's own draws (PDS: the previous grid step and its noise), named by its draw function.
    """

    timesteps: torch.Tensor  # [K]
    noise: torch.Tensor  # [K, C, h, w]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class NoiseSchedule:
    """The model's noise schedule: what the draws and the methods need of its scheduler."""

    alphas_cumprod: torch.Tensor  # [T], fp32
    scheduler_config: dict[str, Any] = field(default_factory=dict)  # what PDS builds its grid from

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


@dataclass
class GradientInputs:
    """What stays fixed during an edit: the model, the source, the prompts and the method's settings."""

    unet: torch.nn.Module  # the denoiser (its attention layers are what CDS's recorder hooks)
    source_latents: torch.Tensor  # [K, C, h, w], fp32
    embeddings: PromptEmbeddings
    alphas_cumprod: torch.Tensor  # [T], fp32, on the latents' device
    prediction_type: str
    guidance: float
    options: Any = None  # the method's options (see ddsedit.methods)
    generators: list[torch.Generator] = field(default_factory=list)  # cds: the patch draws
    call: Callable[..., torch.Tensor] = call_unet  # the family's denoiser call (ddsedit.families)
    betas: torch.Tensor | None = None  # [T] the schedule's one-step betas (None: from alphas_cumprod)
    true_cfg: bool = True  # guidance by an unconditional call (False: Flux's guidance input; ddsedit.families)

    def one_step_betas(self) -> torch.Tensor:
        """The schedule's one-step betas: the scheduler's, else recovered from ``alphas_cumprod`` in float64."""
        if self.betas is not None:
            return self.betas.to(self.alphas_cumprod.device, torch.float32)
        cumulative = self.alphas_cumprod.double()
        previous = torch.cat([cumulative.new_ones(1), cumulative[:-1]])
        return (1.0 - cumulative / previous).float()


def predict_epsilon(
    inputs: GradientInputs,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: Conditioning,
    alpha_bar: torch.Tensor,
) -> torch.Tensor:
    """One denoiser call on a batch, returned as fp32 noise predictions."""
    prediction = inputs.call(inputs.unet, noisy_latents, timesteps, conditioning).float()
    return scores.epsilon_from_prediction(prediction, noisy_latents, alpha_bar, inputs.prediction_type)


def guided_predictions(
    inputs: GradientInputs, branches: list[tuple[torch.Tensor, Conditioning]], timesteps: torch.Tensor
) -> list[torch.Tensor]:
    """Guided noise predictions of several (noisy latents, conditioning) branches in ONE denoiser call.

    The batch is [uncond, cond] per branch, in the order given: for DDS [source uncond, source cond,
    target uncond, target cond], so that the source's conditional rows are the second K of the batch.
    """
    alpha_bar = inputs.alphas_cumprod[timesteps]
    count = 2 * len(branches)
    batch = torch.cat([noisy for noisy, _ in branches for noisy in (noisy, noisy)])
    conditions = Conditioning.cat(
        [row for _, condition in branches for row in (inputs.embeddings.unconditional, condition)]
    )
    epsilon = predict_epsilon(inputs, batch, timesteps.repeat(count), conditions, alpha_bar.repeat(count))
    chunks = epsilon.chunk(count)
    return [
        scores.classifier_free_guidance(chunks[2 * index], chunks[2 * index + 1], inputs.guidance)
        for index in range(len(branches))
    ]


def sds(inputs: GradientInputs, latents: torch.Tensor, draws: StepDraws) -> torch.Tensor:
    """SDS: one call of 2K samples."""
    noisy = scores.add_noise(latents, draws.noise, inputs.alphas_cumprod[draws.timesteps])
    (target,) = guided_predictions(inputs, [(noisy, inputs.embeddings.target)], draws.timesteps)
    return scores.sds_gradient(target, draws.noise)


def dds(inputs: GradientInputs, latents: torch.Tensor, draws: StepDraws) -> torch.Tensor:
    """DDS: one call of 4K samples; source and target share the timestep and the noise."""
    source, target = _source_and_target(inputs, latents, draws.timesteps, draws.noise)
    return scores.dds_gradient(target, source)


def pds(inputs: GradientInputs, latents: torch.Tensor, draws: StepDraws) -> torch.Tensor:
    """PDS: the DDS call, then each branch's standardised posterior sample between t and the grid's previous step,
    with the schedule's one-step beta and alpha at t, as the authors' code takes them."""
    source, target = _source_and_target(inputs, latents, draws.timesteps, draws.noise)
    betas = inputs.one_step_betas()
    beta = betas[draws.timesteps]
    coefficients = {
        "beta": beta, "alpha": 1.0 - beta, "alpha_bar": inputs.alphas_cumprod[draws.timesteps],
        "previous_alpha_bar": inputs.alphas_cumprod[draws.extra["previous_timesteps"]],
    }  # fmt: skip

    def posterior(clean: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
        return scores.posterior_noise(clean, epsilon, draws.noise, draws.extra["previous_noise"], **coefficients)

    return scores.pds_gradient(posterior(latents, target), posterior(inputs.source_latents, source))


@functools.lru_cache(maxsize=8)
def _pds_grid(scheduler_config: str, grid_steps: int, t_min: int, t_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid and the indices drawn from it, for a JSON-encoded scheduler config: built once, not at every step."""
    from ddsedit import pds as pds_grid

    grid = pds_grid.pds_timesteps(json.loads(scheduler_config), grid_steps)
    try:
        low, high = pds_grid.pds_index_range(grid_steps)
    except ValueError as error:
        raise InputError(f"--pds-grid {grid_steps}: {error}") from None
    indices = torch.arange(low, high)
    inside = indices[(grid[indices] >= t_min) & (grid[indices] < t_max)]
    if len(inside) == 0:
        raise InputError(
            f"--pds-grid {grid_steps} puts no grid step in [--t-min, --t-max) = [{t_min}, {t_max}) "
            f"(its steps drawn are {int(grid[low])} to {int(grid[high - 1])}): use a wider range"
        )
    return grid, inside


def pds_steps(schedule: NoiseSchedule, grid_steps: int, t_min: int, t_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PDS's grid (ascending, the model scheduler's own; see :mod:`ddsedit.pds`) and the indices it draws from: the
    authors' range (2% to 98% of the grid) within ``[t_min, t_max)``."""
    return _pds_grid(json.dumps(schedule.scheduler_config, sort_keys=True, default=str), grid_steps, t_min, t_max)


def pds_draws(
    generators: list[torch.Generator], settings: Any, image_shape: tuple[int, ...], device: torch.device,
    schedule: NoiseSchedule, step: int = 0,
) -> StepDraws:  # fmt: skip
    """PDS's draws, per image in a fixed order: a grid index (t and the grid's previous step), the noise at t, then
    the noise at the previous step. The grid is the model scheduler's own (:mod:`ddsedit.pds`)."""
    from ddsedit import pds as pds_grid

    grid, allowed = pds_steps(schedule, settings.options.pds_grid, settings.t_min, settings.t_max)
    grid, allowed = grid.to(device), allowed.to(device)
    indices, noises, previous_noises = [], [], []
    for generator in generators:
        indices.append(allowed[torch.randint(0, len(allowed), (1,), generator=generator, device=device)])
        noises.append(torch.randn(image_shape, generator=generator, device=device, dtype=torch.float32))
        previous_noises.append(torch.randn(image_shape, generator=generator, device=device, dtype=torch.float32))
    timesteps, previous_timesteps = pds_grid.pds_step_pair(grid, torch.cat(indices))
    return StepDraws(timesteps, torch.cat(noises),
                     {"previous_timesteps": previous_timesteps, "previous_noise": torch.cat(previous_noises)})


def cds(inputs: GradientInputs, latents: torch.Tensor, draws: StepDraws) -> torch.Tensor:
    """CDS: the DDS gradient plus the contrastive term's."""
    return _dds_with_contrast(inputs, latents, draws.timesteps, draws.noise, inputs.options.cut_weight)


def ids(inputs: GradientInputs, latents: torch.Tensor, draws: StepDraws) -> torch.Tensor:
    """IDS: correct the source branch's noisy latent, share the noise it implies, then DDS (with CUT if weighted)."""
    noise = identity_corrected_noise(inputs, draws.timesteps, draws.noise)
    return _dds_with_contrast(inputs, latents, draws.timesteps, noise, inputs.options.cut_weight)


GradientFunction = Callable[[GradientInputs, torch.Tensor, StepDraws], torch.Tensor]


# --------------------------------------------------------------------------- the pieces


def _source_and_target(
    inputs: GradientInputs, latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_bar = inputs.alphas_cumprod[timesteps]
    noisy_source = scores.add_noise(inputs.source_latents, noise, alpha_bar)
    noisy_target = scores.add_noise(latents, noise, alpha_bar)
    source, target = guided_predictions(
        inputs, [(noisy_source, inputs.embeddings.source), (noisy_target, inputs.embeddings.target)], timesteps
    )
    return source, target


def _dds_with_contrast(
    inputs: GradientInputs, latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, cut_weight: float
) -> torch.Tensor:
    """``dds_weight * DDS + cut_weight * d(CUT)/dz``, the second in DDS's units (divided by GRADIENT_SCALE).

    The CDS authors step on ``dds_weight * 2000 * sum(z * grad) / (h * w) + cut_weight * CUT``; ddsedit
    steps on ``GRADIENT_SCALE * gradient``, hence the division, which keeps the two terms' balance.
    """
    if cut_weight == 0:
        source, target = _source_and_target(inputs, latents, timesteps, noise)
        return inputs.options.dds_weight * scores.dds_gradient(target, source)
    count = latents.shape[0]
    with SelfAttentionRecorder(inputs.unet) as recorder:
        source, target = _source_and_target(inputs, latents, timesteps, noise)
        # The source's conditional rows of the call: constants for the contrastive loss.
        source_features = {name: output[count : 2 * count].detach().float()
                           for name, output in recorder.outputs.items()}  # fmt: skip
        contrast = contrastive_gradient(inputs, recorder, source_features, latents, timesteps, noise)
    return inputs.options.dds_weight * scores.dds_gradient(target, source) + (
        cut_weight / scores.GRADIENT_SCALE
    ) * contrast


def contrastive_gradient(
    inputs: GradientInputs,
    recorder: SelfAttentionRecorder,
    source_features: dict[str, torch.Tensor],
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """d(CUT)/d(latents): one conditional forward of the noised target with autograd, then PatchNCE per layer.

    The UNet's weights get no gradient (they do not require one); only the path from the latents
    through the noising and the attention features is differentiated.
    """
    options = inputs.options
    height, width = latents.shape[-2:]
    with torch.enable_grad():
        variable = latents.detach().requires_grad_(True)
        alpha_bar = inputs.alphas_cumprod[timesteps]
        noisy = scores.add_noise(variable, noise, alpha_bar)
        inputs.call(inputs.unet, noisy, timesteps, inputs.embeddings.target)
        loss = variable.new_zeros(())
        for image, generator in enumerate(inputs.generators):
            for name in sorted(recorder.layers):  # a fixed order: the patch draws are part of the seeded sequence
                source_map = _feature_map(source_features[name][image], height, width)
                target_map = _feature_map(recorder.outputs[name][image].float(), height, width)
                loss = loss + _patch_loss(source_map, target_map, generator, options)
        if not loss.requires_grad:  # every patch size was larger than every feature map
            largest = max(min(feature_grid(len(features[0]), height, width)) for features in source_features.values())
            raise InputError(
                f"--cut-patch-sizes {','.join(map(str, options.cut_patch_sizes))}: no size fits this model's "
                f"attention maps at this image size (the largest is {largest} positions on its short side)"
            )
        (gradient,) = torch.autograd.grad(loss, variable)
    return gradient


def _feature_map(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """[positions, C] attention tokens as a [1, C, H, W] map."""
    height, width = feature_grid(tokens.shape[0], latent_height, latent_width)
    return tokens.T.reshape(1, -1, height, width)


def _patch_loss(source_map: torch.Tensor, target_map: torch.Tensor, generator: torch.Generator, options: Any
                ) -> torch.Tensor:  # fmt: skip
    """PatchNCE summed over the patch sizes, on positions drawn from ``generator`` (the same for both maps)."""
    loss = target_map.new_zeros(())
    for size in options.cut_patch_sizes:
        if size > min(source_map.shape[-2:]):
            continue  # a map smaller than the patch has no patch of that size
        source_pooled = F.avg_pool2d(source_map, size) if size > 1 else source_map
        target_pooled = F.avg_pool2d(target_map, size) if size > 1 else target_map
        source_rows = F.normalize(source_pooled.flatten(2)[0].T, dim=1)
        target_rows = F.normalize(target_pooled.flatten(2)[0].T, dim=1)
        positions = source_rows.shape[0]
        chosen = torch.randperm(positions, generator=generator, device=generator.device)[: options.cut_patches]
        chosen = chosen.to(source_rows.device)
        loss = loss + scores.patch_nce_loss(source_rows[chosen], target_rows[chosen], options.cut_temperature)
    return loss


def identity_corrected_noise(inputs: GradientInputs, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """IDS's fixed-point correction: the noise under which the source branch's x0 prediction is the source.

    Starting at the noised source, each of ``identity_steps`` steps moves the noisy latent against the
    gradient of ``||z_src - x0hat(z_t, ref)||_2`` (the norm, per image, not its square), scaled by
    ``identity_weight``; the result's implied noise ``(z_t - sqrt(a) z_src) / sqrt(1 - a)`` is returned.
    Caching these passes would not pay: they depend on the step's fresh timestep and noise.
    """
    alpha_bar = inputs.alphas_cumprod[timesteps]
    source = inputs.source_latents
    noisy = scores.add_noise(source, noise, alpha_bar)
    for _ in range(inputs.options.identity_steps):
        with torch.enable_grad():
            variable = noisy.detach().requires_grad_(True)
            (epsilon,) = guided_predictions(inputs, [(variable, inputs.embeddings.source)], timesteps)
            clean = scores.predicted_clean_latents(variable, epsilon, alpha_bar)
            distance = (source - clean).flatten(1).norm(dim=1).sum()  # images are independent: sum their norms
            (gradient,) = torch.autograd.grad(distance, variable)
        noisy = noisy - inputs.options.identity_weight * gradient
    alpha_bar = alpha_bar.reshape(-1, *([1] * (source.ndim - 1)))
    return (noisy - alpha_bar.sqrt() * source) / (1.0 - alpha_bar).sqrt()
