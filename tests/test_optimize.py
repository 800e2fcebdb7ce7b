"""The loop: one UNet call per step, shared timestep and noise, guidance, mask, seed."""

from __future__ import annotations

import torch

from ddsedit import gradients as methods
from ddsedit import scores
from ddsedit.gradients import GradientInputs, StepDraws
from ddsedit.optimize import LoopSettings, PromptEmbeddings, distill


class RecordingUNet(torch.nn.Module):
    """A stand-in UNet: its prediction is latents * 0.5 + the embedding's mean, and it records calls."""

    def __init__(self, output_nan: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.output_nan = output_nan

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        self.calls.append((sample.clone(), timestep.clone(), encoder_hidden_states.clone()))
        prediction = sample * 0.5 + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if self.output_nan:
            prediction = torch.full_like(prediction, float("nan"))
        return (prediction,)


def _embeddings() -> PromptEmbeddings:
    return PromptEmbeddings(
        unconditional=torch.zeros(1, 3, 2),
        source=torch.full((1, 3, 2), 1.0),
        target=torch.full((1, 3, 2), 3.0),
    )


def _alphas() -> torch.Tensor:
    return torch.linspace(0.999, 0.01, 1000)


def test_dds_uses_one_call_of_four_with_shared_timestep_and_noise() -> None:
    unet = RecordingUNet()
    source = torch.randn(1, 4, 4, 4)
    latents = source + 0.3
    timesteps = torch.tensor([500])
    noise = torch.randn(1, 4, 4, 4)
    inputs = GradientInputs(unet, source, _embeddings(), _alphas(), "epsilon", 7.5)
    gradient = methods.dds(inputs, latents, StepDraws(timesteps, noise))
    assert len(unet.calls) == 1
    sample, timestep, conditions = unet.calls[0]
    assert sample.shape[0] == 4 and timestep.tolist() == [500] * 4
    alpha_bar = _alphas()[500]
    torch.testing.assert_close(sample[0], sample[1])
    torch.testing.assert_close(sample[2], sample[3])
    # Same noise: the noisy latents differ only by sqrt(alpha_bar) * (latents - source).
    torch.testing.assert_close(sample[2] - sample[0], alpha_bar.sqrt() * (latents - source)[0])
    torch.testing.assert_close(conditions[:, 0, 0], torch.tensor([0.0, 1.0, 0.0, 3.0]))
    # Hand computation: guided = 0.5 * noisy + 7.5 * embedding mean; the noisy halves differ as above.
    expected = 0.5 * alpha_bar.sqrt() * (latents - source) + 7.5 * (3.0 - 1.0)
    torch.testing.assert_close(gradient, expected)


def test_sds_uses_one_call_of_two_and_subtracts_the_noise() -> None:
    unet = RecordingUNet()
    latents = torch.randn(1, 4, 4, 4)
    noise = torch.randn(1, 4, 4, 4)
    inputs = GradientInputs(unet, latents, _embeddings(), _alphas(), "epsilon", 2.0)
    gradient = methods.sds(inputs, latents, StepDraws(torch.tensor([100]), noise))
    assert len(unet.calls) == 1 and unet.calls[0][0].shape[0] == 2
    noisy = scores.add_noise(latents, noise, _alphas()[[100]])
    torch.testing.assert_close(gradient, 0.5 * noisy + 2.0 * 3.0 - noise)


def test_distill_calls_the_unet_once_per_step_and_is_reproducible() -> None:
    source = torch.randn(1, 4, 4, 4)
    settings = LoopSettings(method="dds", steps=7, guidance=7.5, lr=0.1, t_min=50, t_max=950)
    unet = RecordingUNet()
    first = distill(unet, source, _embeddings(), _alphas(), "epsilon", settings, [torch.Generator().manual_seed(3)])
    assert len(unet.calls) == 7
    drawn = [int(call[1][0]) for call in unet.calls]
    assert all(50 <= t < 950 for t in drawn) and len(set(drawn)) > 1
    second = distill(
        RecordingUNet(),
        source,
        _embeddings(),
        _alphas(),
        "epsilon",
        settings,
        [torch.Generator().manual_seed(3)],
    )
    assert torch.equal(first, second)
    third = distill(
        RecordingUNet(),
        source,
        _embeddings(),
        _alphas(),
        "epsilon",
        settings,
        [torch.Generator().manual_seed(4)],
    )
    assert not torch.equal(first, third)


def test_mask_confines_the_update() -> None:
    source = torch.randn(1, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0
    settings = LoopSettings(method="masked-dds", steps=5)
    latents = distill(
        RecordingUNet(), source, _embeddings(), _alphas(), "epsilon", settings,
        [torch.Generator().manual_seed(0)], mask=mask,
    )  # fmt: skip
    assert torch.equal(latents[..., 2:], source[..., 2:])
    assert not torch.equal(latents[..., :2], source[..., :2])


def test_nan_predictions_do_not_poison_the_latents() -> None:
    source = torch.randn(1, 4, 4, 4)
    latents = distill(
        RecordingUNet(output_nan=True), source, _embeddings(), _alphas(), "epsilon",
        LoopSettings(steps=3), [torch.Generator().manual_seed(0)],
    )  # fmt: skip
    assert torch.isfinite(latents).all()
    assert torch.equal(latents, source)


class InfiniteElementUNet(RecordingUNet):
    """RecordingUNet whose target-conditional prediction has +inf in one element."""

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        (prediction,) = super().forward(sample, timestep, encoder_hidden_states)
        prediction = prediction.clone()
        prediction[3, 0, 0, 0] = float("inf")  # DDS batches [source uncond, source cond, target uncond, target cond]
        return (prediction,)


def test_an_infinite_prediction_element_leaves_its_latent_alone() -> None:
    """The element becomes 0 (nan_to_num made it 3.4e38 and moved the latent to ~1e37); the rest steps as usual."""
    source = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    counted: list[int] = []
    latents = distill(
        InfiniteElementUNet(), source, _embeddings(), _alphas(), "epsilon", LoopSettings(steps=1, guidance=7.5),
        [torch.Generator().manual_seed(0)], on_nonfinite=counted.append,
    )  # fmt: skip
    assert counted == [1]
    assert latents[0, 0, 0, 0].item() == source[0, 0, 0, 0].item()
    # Everywhere else: the stand-in's predictions are 0.5 * z_t + mean(prompt embedding), so the guided
    # target minus the guided source is 7.5 * (3 - 1) = 15 while both branches share z_t (the first step),
    # and the step moves by 0.1 * 2000/4096 * 15.
    expected = source - 0.1 * 2000 / 4096 * 15.0
    expected[0, 0, 0, 0] = source[0, 0, 0, 0]
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)


def test_finite_runs_report_nothing() -> None:
    counted: list[int] = []
    distill(
        RecordingUNet(), torch.randn(1, 4, 4, 4), _embeddings(), _alphas(), "epsilon", LoopSettings(steps=2),
        [torch.Generator().manual_seed(0)], on_nonfinite=counted.append,
    )  # fmt: skip
    assert counted == []


def test_on_step_sees_every_step() -> None:
    seen: list[int] = []
    distill(
        RecordingUNet(), torch.randn(1, 4, 4, 4), _embeddings(), _alphas(), "epsilon", LoopSettings(steps=4),
        [torch.Generator().manual_seed(0)], on_step=lambda step, latents: seen.append(step),
    )  # fmt: skip
    assert seen == [1, 2, 3, 4]


def test_an_image_in_a_batch_gets_the_draws_it_gets_alone() -> None:
    sources = torch.randn(3, 4, 4, 4)
    embeddings = PromptEmbeddings(
        unconditional=torch.zeros(3, 3, 2), source=torch.ones(3, 3, 2), target=torch.full((3, 3, 2), 3.0)
    )
    settings = LoopSettings(steps=4)
    batched = distill(
        RecordingUNet(), sources, embeddings, _alphas(), "epsilon", settings,
        [torch.Generator().manual_seed(seed) for seed in (10, 11, 12)],
    )  # fmt: skip
    for index, seed in enumerate((10, 11, 12)):
        alone = distill(
            RecordingUNet(), sources[index : index + 1], _embeddings(), _alphas(), "epsilon", settings,
            [torch.Generator().manual_seed(seed)],
        )  # fmt: skip
        torch.testing.assert_close(batched[index : index + 1], alone)


def test_the_replayed_loop_matches_the_plain_loop(tiny_editor) -> None:
    """The CUDA-graph loop's fixed buffers (run here without recording) give the plain loop's latents."""
    unet = tiny_editor.components.unet
    channels, side = unet.config.in_channels, unet.config.sample_size
    sources = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))
    text = torch.randn(3, 1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    embeddings = PromptEmbeddings(*(rows.expand(2, -1, -1) for rows in text))
    mask = torch.zeros(1, 1, side, side)
    mask[..., : side // 2] = 1.0
    alphas = tiny_editor.components.alphas_cumprod
    for method, step_mask in (("dds", None), ("sds", None), ("masked-dds", mask)):
        settings = LoopSettings(method=method, steps=5)
        seen: list[tuple[int, torch.Tensor]] = []

        def record(step: int, latents: torch.Tensor, seen: list = seen) -> None:
            seen.append((step, latents.clone()))

        results = [
            distill(
                unet, sources, embeddings, alphas, "epsilon", settings,
                [torch.Generator().manual_seed(seed) for seed in (3, 4)], mask=step_mask,
                on_step=record if replayed else None, cuda_graph=replayed,
            )  # fmt: skip
            for replayed in (False, True)
        ]
        torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
        assert not torch.equal(results[0], sources)
        assert [step for step, _ in seen] == [1, 2, 3, 4, 5]
        torch.testing.assert_close(seen[-1][1], results[0], rtol=0, atol=0)
