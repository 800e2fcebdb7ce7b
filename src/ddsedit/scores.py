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
    *,
    beta: torch.Tensor,
    alpha: torch.Tensor,
    alpha_bar: torch.Tensor,
    previous_alpha_bar: torch.Tensor,
) -> torch.Tensor:
    """PDS's standardised posterior sample ``(x_prev - mu) / sigma`` for one branch, as the PDS authors compute it.

    ``x_t`` is ``clean_latents`` noised with ``noise`` to ``alpha_bar`` (the cumulative product at t);
    ``x_prev`` is ``clean_latents`` noised with ``previous_noise`` to ``previous_alpha_bar`` (the
    cumulative product at t_prev, the grid point before t); x0hat is the Tweedie estimate behind the
    model's ``epsilon`` at ``x_t``. ``beta`` and ``alpha = 1 - beta`` are the training schedule's
    ONE-step values at t (a scheduler's ``betas[t]`` and ``alphas[t]``), whatever the grid's spacing.
    All four coefficients are per-sample [B] vectors.

    The DDPM posterior between two adjacent training steps is
    ``q(x_{t-1} | x_t, x0) = N(c0 * x0 + c1 * x_t, sigma^2)`` with
    ``c0 = sqrt(abar_{t-1}) * beta_t / (1 - abar_t)``, ``c1 = sqrt(alpha_t) * (1 - abar_{t-1}) / (1 - abar_t)``
    and ``sigma^2 = beta_t * (1 - abar_{t-1}) / (1 - abar_t)``. The authors' ``pds/pds.py``
    (KAIST-Visual-AI-Group/PDS) keeps ``beta_t`` and ``alpha_t`` of that one step but puts the
    grid's previous point in place of ``t - 1``: ``abar_{t-1}`` becomes ``abar_{t_prev}``. On a grid
    of spacing 1 this is the exact posterior. On a coarser grid it is not the posterior between
    t_prev and t (that one has the grid step's ``alpha = abar_t / abar_prev``, several training steps'
    worth, in place of ``alpha_t``, which is what this function took before): ``sigma`` is smaller
    (``beta_t`` is about 1/spacing of the grid step's ``1 - alpha``), and the mean's weight on
    x0, ``c0 + c1 * sqrt(abar_t)`` when x0hat = x0, is no longer ``sqrt(abar_prev)``. So with the
    same noises in both branches, the target-minus-source difference keeps a term in
    ``x0_tgt - x0_src`` (coefficient ``(sqrt(abar_prev) - c0 - c1 * sqrt(abar_t)) / sigma``, positive:
    it pulls the target back to the source) besides the weighted ``eps_tgt - eps_src``; the exact
    grid posterior cancels it. We follow the authors, whose results came from their formula.
    """
    beta = _broadcast(beta, clean_latents)
    alpha = _broadcast(alpha, clean_latents)
    alpha_bar = _broadcast(alpha_bar, clean_latents)
    previous_alpha_bar = _broadcast(previous_alpha_bar, clean_latents)
    noisy = alpha_bar.sqrt() * clean_latents + (1.0 - alpha_bar).sqrt() * noise
    clean_estimate = (noisy - (1.0 - alpha_bar).sqrt() * epsilon) / alpha_bar.sqrt()
    clean_weight = previous_alpha_bar.sqrt() * beta / (1.0 - alpha_bar)
    noisy_weight = alpha.sqrt() * (1.0 - previous_alpha_bar) / (1.0 - alpha_bar)
    mean = clean_weight * clean_estimate + noisy_weight * noisy
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
