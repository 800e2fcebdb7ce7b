"""The score math: small pure functions on latents and noise predictions.

Notation follows the DDS paper (Hertz et al., 2023): a latent ``z`` is noised to
``z_t = sqrt(alpha_bar_t) * z + sqrt(1 - alpha_bar_t) * noise``; the UNet predicts
``eps(z_t, y, t)``, and classifier-free guidance mixes the unconditional and the
conditional prediction. Nothing here touches a model, a file or a device choice.
"""

from __future__ import annotations

import torch

from ddsedit.names import PREDICTION_TYPES

# The DDS reference code divides its loss by the latent's pixel count, which is 64 * 64
# for SD's 512 px images. We keep that number fixed so that one step moves each latent
# element by lr * GRADIENT_SCALE * grad whatever the image size: dividing by the real
# h * w would make small latents take much larger steps.
REFERENCE_LATENT_PIXELS = 64 * 64
LOSS_SCALE = 2000.0
GRADIENT_SCALE = LOSS_SCALE / REFERENCE_LATENT_PIXELS


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector [B] so it broadcasts over a [B, C, H, W] tensor."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward diffusion: ``sqrt(a) * latents + sqrt(1 - a) * noise`` with ``a = alpha_bar`` per sample."""
    alpha_bar = _broadcast(alpha_bar, latents)
    return alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise


def epsilon_from_prediction(
    prediction: torch.Tensor, noisy_latents: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a UNet output to a noise prediction.

    For v-prediction models (SD 2.x 768), ``v = sqrt(a) * eps - sqrt(1 - a) * x0`` and
    ``x_t = sqrt(a) * x0 + sqrt(1 - a) * eps`` give ``eps = sqrt(a) * v + sqrt(1 - a) * x_t``.
    """
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":
        alpha_bar = _broadcast(alpha_bar, prediction)
        return alpha_bar.sqrt() * prediction + (1.0 - alpha_bar).sqrt() * noisy_latents
    raise ValueError(f"unsupported prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def classifier_free_guidance(
    unconditional: torch.Tensor, conditional: torch.Tensor, guidance: float
) -> torch.Tensor:
    """``uncond + guidance * (cond - uncond)``: guidance 1 is the plain conditional prediction."""
    return unconditional + guidance * (conditional - unconditional)


def sds_gradient(target_epsilon: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Score Distillation Sampling: the guided prediction minus the noise that was added."""
    return target_epsilon - noise


def dds_gradient(target_epsilon: torch.Tensor, source_epsilon: torch.Tensor) -> torch.Tensor:
    """Delta Denoising Score: the target's guided prediction minus the source's.

    Both predictions must come from the same timestep and the same noise, so that the
    noise and the prompt-independent part of the score cancel.
    """
    return target_epsilon - source_epsilon


def zero_nonfinite(gradient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient with NaN and +-inf elements set to 0, and whether there were any (a 0-dim bool tensor).

    Zero, not ``nan_to_num``'s +-3.4e38: one infinite element of a UNet output would
    otherwise move its latent to about 1e37 in a single step. The flag stays on the
    device, so that checking it costs no host sync per step.
    """
    finite = torch.isfinite(gradient)
    return torch.where(finite, gradient, torch.zeros_like(gradient)), ~finite.all()


def sgd_step(latents: torch.Tensor, gradient: torch.Tensor, lr: float) -> torch.Tensor:
    """One plain SGD step on ``LOSS_SCALE * sum(latents * gradient) / REFERENCE_LATENT_PIXELS``.

    That loss's derivative with respect to the latents is ``GRADIENT_SCALE * gradient``
    (the gradient itself is held fixed: stop-gradient through the UNet), so the step is
    written directly, without building an autograd graph.
    """
    return latents - (lr * GRADIENT_SCALE) * gradient


def predicted_clean_latents(
    noisy_latents: torch.Tensor, epsilon: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """The x0 (Tweedie) estimate ``(z_t - sqrt(1 - a) * eps) / sqrt(a)`` behind a noise prediction."""
    alpha_bar = _broadcast(alpha_bar, noisy_latents)
    return (noisy_latents - (1.0 - alpha_bar).sqrt() * epsilon) / alpha_bar.sqrt()


def posterior_noise(
    clean_latents: torch.Tensor,
    epsilon: torch.Tensor,
    noise: torch.Tensor,
    previous_noise: torch.Tensor,
    alpha_bar: torch.Tensor,
    previous_alpha_bar: torch.Tensor,
) -> torch.Tensor:
    """PDS's standardised posterior sample ``(x_prev - mu) / sigma`` for one branch (Koo et al., 2024).

    ``x_t`` is ``clean_latents`` noised with ``noise`` to ``alpha_bar``; ``mu`` and ``sigma`` are the
    mean and deviation of the DDPM posterior q(x_prev | x_t, x0hat) between two grid steps, with x0hat
    taken from the model's ``epsilon``; ``x_prev`` is ``clean_latents`` noised with ``previous_noise`` to
    ``previous_alpha_bar``. Matching this quantity for target and source keeps the target's posterior
    (its fine structure) that of the source, where DDS only matches the scores.
    """
    alpha_bar = _broadcast(alpha_bar, clean_latents)
    previous_alpha_bar = _broadcast(previous_alpha_bar, clean_latents)
    noisy = alpha_bar.sqrt() * clean_latents + (1.0 - alpha_bar).sqrt() * noise
    clean_estimate = (noisy - (1.0 - alpha_bar).sqrt() * epsilon) / alpha_bar.sqrt()
    alpha = alpha_bar / previous_alpha_bar  # the one-step alpha between the two grid points
    beta = 1.0 - alpha
    mean = (previous_alpha_bar.sqrt() * beta * clean_estimate + alpha.sqrt() * (1.0 - previous_alpha_bar) * noisy) / (
        1.0 - alpha_bar
    )
    deviation = ((1.0 - previous_alpha_bar) / (1.0 - alpha_bar) * beta).sqrt()
    previous = previous_alpha_bar.sqrt() * clean_latents + (1.0 - previous_alpha_bar).sqrt() * previous_noise
    return (previous - mean) / deviation


def pds_gradient(target_posterior_noise: torch.Tensor, source_posterior_noise: torch.Tensor) -> torch.Tensor:
    """Posterior Distillation Sampling: the target's standardised posterior sample minus the source's."""
    return target_posterior_noise - source_posterior_noise


def patch_nce_loss(source_features: torch.Tensor, target_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """PatchNCE (the CUT loss): each target patch must pick its own source patch among all of them.

    ``source_features`` and ``target_features`` are [N, C] features of the same N positions, each
    row L2-normalised. Row i's logits are ``<s_i, t_i>`` (the positive) and ``<s_i, t_j>`` for
    ``j != i`` (the negatives), over ``temperature``; the loss is the cross-entropy with the positive
    as the label, averaged over the rows. The source features are constants: only the target learns.
    """
    similarities = source_features.detach() @ target_features.T / temperature  # [N, N], row i: s_i against all t
    positives = similarities.diagonal()
    negatives = similarities.masked_fill(torch.eye(len(similarities), dtype=torch.bool, device=similarities.device),
                                         float("-inf"))  # fmt: skip
    logits = torch.cat([positives[:, None], negatives], dim=1)
    return torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
