"""The score math against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from ddsedit import scores


def test_add_noise_matches_formula() -> None:
    latents = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 0.0]]]])
    noise = torch.tensor([[[[0.3, 0.1]]], [[[-1.0, 2.0]]]])
    alpha_bar = torch.tensor([0.64, 0.25])
    noisy = scores.add_noise(latents, noise, alpha_bar)
    expected_first = 0.8 * torch.tensor([1.0, -2.0]) + 0.6 * torch.tensor([0.3, 0.1])
    expected_second = 0.5 * torch.tensor([0.5, 0.0]) + math.sqrt(0.75) * torch.tensor([-1.0, 2.0])
    torch.testing.assert_close(noisy[0, 0, 0], expected_first)
    torch.testing.assert_close(noisy[1, 0, 0], expected_second)


def test_classifier_free_guidance() -> None:
    unconditional = torch.tensor([1.0, 2.0])
    conditional = torch.tensor([2.0, 0.0])
    torch.testing.assert_close(
        scores.classifier_free_guidance(unconditional, conditional, 7.5), torch.tensor([8.5, -13.0])
    )
    torch.testing.assert_close(scores.classifier_free_guidance(unconditional, conditional, 1.0), conditional)
    torch.testing.assert_close(
        scores.classifier_free_guidance(unconditional, conditional, 0.0), unconditional
    )


def test_v_prediction_converts_to_the_true_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 4, 5, 5, generator=generator)
    noise = torch.randn(3, 4, 5, 5, generator=generator)
    alpha_bar = torch.tensor([0.9, 0.5, 0.05])
    a = alpha_bar.view(-1, 1, 1, 1)
    noisy = a.sqrt() * clean + (1 - a).sqrt() * noise
    velocity = a.sqrt() * noise - (1 - a).sqrt() * clean
    recovered = scores.epsilon_from_prediction(velocity, noisy, alpha_bar, "v_prediction")
    torch.testing.assert_close(recovered, noise, atol=1e-5, rtol=1e-5)
    assert scores.epsilon_from_prediction(noise, noisy, alpha_bar, "epsilon") is noise
    with pytest.raises(ValueError, match="unsupported prediction type"):
        scores.epsilon_from_prediction(noise, noisy, alpha_bar, "sample")


def test_gradients_are_plain_differences() -> None:
    target = torch.tensor([1.0, 2.0, 3.0])
    noise = torch.tensor([0.5, 0.0, 1.0])
    assert torch.equal(scores.sds_gradient(target, noise), torch.tensor([0.5, 2.0, 2.0]))
    assert torch.equal(scores.dds_gradient(target, noise), torch.tensor([0.5, 2.0, 2.0]))


def test_nonfinite_elements_become_exactly_zero() -> None:
    """NaN and +-inf become 0 (nan_to_num would make +-inf into +-3.4e38), and the flag says so."""
    gradient = torch.tensor([1.5, float("nan"), float("inf"), float("-inf"), -2.0])
    cleaned, had_nonfinite = scores.zero_nonfinite(gradient)
    assert cleaned.tolist() == [1.5, 0.0, 0.0, 0.0, -2.0]
    assert bool(had_nonfinite)
    finite = torch.tensor([1.0, -1.0])
    cleaned, had_nonfinite = scores.zero_nonfinite(finite)
    assert torch.equal(cleaned, finite) and not bool(had_nonfinite)


def test_sgd_step_equals_autograd_sgd_on_the_reference_loss() -> None:
    """The direct update is SGD on 2000 * sum(z * grad) / 4096 with grad held fixed."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    gradient = torch.randn(1, 4, 16, 16, generator=generator)
    parameter = latents.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    loss = 2000.0 * (parameter * gradient).sum() / 4096
    loss.backward()
    optimizer.step()
    torch.testing.assert_close(scores.sgd_step(latents, gradient, 0.1), parameter.detach())
    # The scale is fixed, whatever the latent's size.
    assert scores.GRADIENT_SCALE == pytest.approx(2000 / 4096)


def _one_step_schedule(
    alpha_bar: torch.Tensor, previous_alpha_bar: torch.Tensor, spacing: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A made-up schedule's one-step (beta, alpha) at t: with equal one-step alphas over the ``spacing`` steps
    from t_prev to t, each is ``(abar_t / abar_prev) ** (1 / spacing)``."""
    alpha = (alpha_bar / previous_alpha_bar) ** (1.0 / spacing)
    return 1.0 - alpha, alpha


def _vector(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


def test_posterior_noise_matches_the_ddpm_posterior_with_the_one_step_beta() -> None:
    """One sample against hand arithmetic: mu = c0 * x0hat + c1 * x_t, sigma^2 = beta (1 - abar_prev) / (1 - abar_t)."""
    clean, epsilon, noise, previous_noise = (torch.tensor([[[[value]]]], dtype=torch.float64)
                                             for value in (0.5, -0.2, 0.3, 1.1))  # fmt: skip
    beta, abar, abar_prev = 0.01, 0.36, 0.49  # the one-step beta, not 1 - 0.36 / 0.49
    noisy = 0.6 * 0.5 + 0.8 * 0.3
    x0hat = (noisy - 0.8 * -0.2) / 0.6
    mean = math.sqrt(abar_prev) * beta / (1 - abar) * x0hat + math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * noisy
    sigma = math.sqrt(beta * (1 - abar_prev) / (1 - abar))
    expected = (0.7 * 0.5 + math.sqrt(0.51) * 1.1 - mean) / sigma
    result = scores.posterior_noise(clean, epsilon, noise, previous_noise, beta=_vector(beta), alpha=_vector(1 - beta),
                                    alpha_bar=_vector(abar), previous_alpha_bar=_vector(abar_prev))  # fmt: skip
    assert float(result) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("spacing", [1, 2, 20])
def test_pds_with_shared_noises_is_weighted_dds_plus_an_identity_term(spacing: int) -> None:
    """With eps and eps' shared by both branches, the posterior samples' noise terms cancel and
    z_tgt - z_src = (k * (x0_tgt - x0_src) + c0 * sqrt(1 - abar_t) / sqrt(abar_t) * (eps_tgt - eps_src)) / sigma,
    with k = sqrt(abar_prev) - c0 - c1 * sqrt(abar_t) (c0, c1: the mean's weights on x0hat and x_t).

    Derived by hand from (x_prev - mu) / sigma. On a grid of spacing 1, k = 0 and the weight is
    sqrt(beta_t / (alpha_t * (1 - abar_prev))): DDS weighted by timestep. On coarser grids k > 0:
    the one-step beta leaves a pull of the target back to the source.
    """
    generator = torch.Generator().manual_seed(3)
    shape = (2, 4, 5, 5)
    target, source, eps_target, eps_source, noise, previous_noise = (
        torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(6)
    )
    previous_alpha_bar = torch.tensor([0.33, 0.07], dtype=torch.float64)
    alpha_bar = previous_alpha_bar * torch.tensor([0.985, 0.97], dtype=torch.float64) ** spacing
    beta, alpha = _one_step_schedule(alpha_bar, previous_alpha_bar, spacing)
    coefficients = {"beta": beta, "alpha": alpha, "alpha_bar": alpha_bar, "previous_alpha_bar": previous_alpha_bar}
    gradient = scores.pds_gradient(
        scores.posterior_noise(target, eps_target, noise, previous_noise, **coefficients),
        scores.posterior_noise(source, eps_source, noise, previous_noise, **coefficients),
    )
    c0 = previous_alpha_bar.sqrt() * beta / (1 - alpha_bar)
    c1 = alpha.sqrt() * (1 - previous_alpha_bar) / (1 - alpha_bar)
    sigma = (beta * (1 - previous_alpha_bar) / (1 - alpha_bar)).sqrt()
    identity = (previous_alpha_bar.sqrt() - c0 - c1 * alpha_bar.sqrt()) / sigma
    weight = c0 * ((1 - alpha_bar) / alpha_bar).sqrt() / sigma
    expected = identity.view(-1, 1, 1, 1) * (target - source) + weight.view(-1, 1, 1, 1) * (eps_target - eps_source)
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-10)
    if spacing == 1:
        torch.testing.assert_close(identity, torch.zeros_like(identity), rtol=0, atol=1e-12)
        torch.testing.assert_close(weight, (beta / (alpha * (1 - previous_alpha_bar))).sqrt(), rtol=1e-10, atol=0)
    else:
        assert bool((identity > 1e-3).all())


def test_patch_nce_loss_against_a_loop() -> None:
    generator = torch.Generator().manual_seed(5)
    source = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1)
    target = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1)
    losses = []
    for i in range(6):
        positive = float(source[i] @ target[i]) / 0.07
        negatives = [float(source[i] @ target[j]) / 0.07 for j in range(6) if j != i]
        logits = torch.tensor([positive, *negatives], dtype=torch.float64)
        losses.append(float(torch.logsumexp(logits, 0) - positive))
    expected = sum(losses) / len(losses)
    assert abs(float(scores.patch_nce_loss(source, target, 0.07)) - expected) < 1e-5
    # Only the target learns: the source's features are held constant.
    source.requires_grad_(True)
    target.requires_grad_(True)
    scores.patch_nce_loss(source, target, 0.07).backward()
    assert source.grad is None and target.grad is not None and float(target.grad.abs().sum()) > 0
