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
