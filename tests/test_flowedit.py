"""FlowEdit's sampler (ddsedit.flowedit) against a slow reference written from the paper's algorithm."""

from __future__ import annotations

import pytest
import torch

from ddsedit.flowedit import flowedit

SIGMAS = [1.0, 0.9, 0.75, 0.6, 0.45, 0.3, 0.15, 0.0]  # T = 7 steps and the trailing 0


def _field(seed: int):
    """A toy velocity model v(x, t, prompt) = A_prompt x + t b_prompt, different per prompt, float64."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        prompt: (torch.randn(4, 4, generator=generator, dtype=torch.float64) * 0.3,
                 torch.randn(4, 1, 1, generator=generator, dtype=torch.float64))
        for prompt in ("ref", "query")
    }  # fmt: skip

    def velocity(x: torch.Tensor, t: torch.Tensor, prompt: str) -> torch.Tensor:
        a, b = weights[prompt]
        return torch.einsum("ij,kjhw->kihw", a, x.double()) + t.double().reshape(-1, 1, 1, 1) * b

    return velocity


def _pair(velocity):
    def velocities(source_points, target_points, times):
        return velocity(source_points, times, "ref"), velocity(target_points, times, "query")

    return velocities


def _reference(velocity, source, seeds, n_max, n_avg=1, n_min=0):
    """Algorithm 1 of the FlowEdit paper, one image at a time, noises drawn in the sampler's order."""
    results = []
    for image, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        x_src = source[image : image + 1].double()
        z = x_src.clone()
        steps = len(SIGMAS) - 1
        for i in range(steps - n_max, steps - n_min):
            t, t_next = SIGMAS[i], SIGMAS[i + 1]
            v_delta = torch.zeros_like(z)
            for _ in range(n_avg):
                eps = torch.randn(x_src.shape, generator=generator, dtype=torch.float32).double()
                x_t_src = (1 - t) * x_src + t * eps
                x_t_tgt = z + x_t_src - x_src
                t_row = torch.tensor([t])
                v_delta += (velocity(x_t_tgt, t_row, "query") - velocity(x_t_src, t_row, "ref")) / n_avg
            z = z + (t_next - t) * v_delta
        if n_min:
            t = SIGMAS[steps - n_min]
            eps = torch.randn(x_src.shape, generator=generator, dtype=torch.float32).double()
            z = z + ((1 - t) * x_src + t * eps) - x_src
            for i in range(steps - n_min, steps):
                z = z + (SIGMAS[i + 1] - SIGMAS[i]) * velocity(z, torch.tensor([SIGMAS[i]]), "query")
        results.append(z)
    return torch.cat(results)


@pytest.fixture
def source() -> torch.Tensor:
    return torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("n_max", "n_avg", "n_min"), [(7, 1, 0), (5, 1, 0), (5, 3, 0), (6, 2, 2)])
def test_flowedit_follows_the_papers_algorithm(source, n_max: int, n_avg: int, n_min: int) -> None:
    velocity = _field(1)
    seeds = [11, 12]
    ours = flowedit(_pair(velocity), source, SIGMAS, n_max, [torch.Generator().manual_seed(s) for s in seeds],
                    n_avg=n_avg, n_min=n_min, target_velocity=lambda x, t: velocity(x, t, "query"))  # fmt: skip
    expected = _reference(velocity, source, seeds, n_max, n_avg, n_min)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, source.float(), atol=1e-3)  # it edited


def test_same_prompts_leave_the_source_unchanged_and_seeds_reproduce(source) -> None:
    """With one prompt for both branches V = v(x_t_src) - v(x_t_src) = 0 at the first step, and so at every step."""
    velocity = _field(2)

    def same(source_points, target_points, times):
        return velocity(source_points, times, "ref"), velocity(target_points, times, "ref")

    unchanged = flowedit(same, source, SIGMAS, 7, [torch.Generator().manual_seed(0) for _ in range(2)])
    assert torch.allclose(unchanged, source, atol=1e-6)
    runs = [flowedit(_pair(velocity), source, SIGMAS, 6, [torch.Generator().manual_seed(s) for s in (3, 4)])
            for _ in range(2)]  # fmt: skip
    assert torch.equal(runs[0], runs[1])
    alone = flowedit(_pair(velocity), source[1:], SIGMAS, 6, [torch.Generator().manual_seed(4)])
    assert torch.allclose(alone, runs[0][1:], atol=1e-6)  # an image gets its own edit, batched or not


def test_steps_are_reported_and_bad_settings_refused(source) -> None:
    velocity = _field(3)
    seen = []
    flowedit(
        _pair(velocity), source, SIGMAS, 4, [torch.Generator().manual_seed(0)] * 2, n_min=1,
        target_velocity=lambda x, t: velocity(x, t, "query"), on_step=lambda step, _: seen.append(step),
    )  # fmt: skip
    assert seen == [1, 2, 3, 4]
    generators = [torch.Generator()] * 2
    refused = [({"n_max": 8}, "n_max"), ({"n_max": 4, "n_min": 4}, "n_min"), ({"n_max": 4, "n_avg": 0}, "n_avg"),
               ({"n_max": 4, "n_min": 1}, "target_velocity")]  # fmt: skip
    for settings, text in refused:
        with pytest.raises(ValueError, match=text):
            flowedit(_pair(velocity), source, SIGMAS, generators=generators, **settings)
