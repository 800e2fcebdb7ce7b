"""The readout of a shapes model's clean-image predictions at the noisy source (shapes_training/readout.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddsedit.editor import Editor
from ddsedit.imageio import image_to_tensor
from ddsedit.shapes import evaluate
from ddsedit.shapes.world import BACKGROUNDS, render
from shapes_training import readout


@pytest.fixture(scope="module")
def shapes_editor() -> Editor:
    return Editor.from_pretrained("shapes", device="cpu")


def source_latents(editor: Editor, cases: list[evaluate.EditCase]) -> torch.Tensor:
    pixels = torch.cat([image_to_tensor(render(case.source)[0], (64, 64)) for case in cases])
    return editor.encode_image(pixels).float()


def test_the_matched_timestep_has_the_flow_levels_signal_to_noise_ratio(shapes_editor):
    alphas_cumprod = shapes_editor.components.alphas_cumprod.double()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    for level in (0.1, 0.4, 0.8):
        wanted = ((1 - level) / level) ** 2
        timestep = readout.matched_timestep(alphas_cumprod.float(), level)
        # no other timestep's ratio is nearer (compared as alpha_bar, where the grid is even enough)
        nearest = int((snr / (1 + snr) - wanted / (1 + wanted)).abs().argmin())
        assert timestep == nearest
        assert 0.5 < float(snr[timestep]) / wanted < 2.0


def test_any_shape_mask_finds_every_rendered_shape():
    for seed in range(6):
        case = evaluate.recolour_cases(1, seed=seed)[0].source
        image, shape, _ = render(case)
        found = readout.any_shape_mask(np.asarray(image), case.background)
        assert (found == shape).mean() > 0.99


def test_the_noise_models_prediction_is_the_clean_latents_its_noise_estimate_implies(shapes_editor):
    cases = evaluate.recolour_cases(2, seed=3)
    latents = source_latents(shapes_editor, cases)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    prompts = [case.query for case in cases]
    clean = readout.predicted_clean(shapes_editor, latents, noise, 0.4, prompts, guidance=3.0)
    # the same from the UNet directly: x_t = sqrt(ab) x + sqrt(1 - ab) eps, x = (x_t - sqrt(1 - ab) eps_hat) / sqrt(ab)
    components = shapes_editor.components
    timestep = readout.matched_timestep(components.alphas_cumprod.float(), 0.4)
    alpha_bar = float(components.alphas_cumprod[timestep])
    noisy = alpha_bar**0.5 * latents + (1 - alpha_bar) ** 0.5 * noise
    hidden = torch.cat([shapes_editor.encode_prompt([""] * 2).hidden_states,
                        shapes_editor.encode_prompt(prompts).hidden_states])  # fmt: skip
    with torch.no_grad():
        eps = components.unet(torch.cat([noisy, noisy]), timestep, encoder_hidden_states=hidden).sample.float()
    guided = eps[:2] + 3.0 * (eps[2:] - eps[:2])
    torch.testing.assert_close(clean, (noisy - (1 - alpha_bar) ** 0.5 * guided) / alpha_bar**0.5,
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_the_flow_models_prediction_is_the_noisy_point_minus_sigma_times_the_velocity(tiny_sd3_no_t5_dir):
    editor = Editor.from_pretrained(tiny_sd3_no_t5_dir, device="cpu")
    cases = evaluate.recolour_cases(2, seed=4)
    latents = source_latents(editor, cases)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    prompts = [case.ref for case in cases]
    clean = readout.predicted_clean(editor, latents, noise, 0.6, prompts, guidance=2.5)
    noisy = 0.4 * latents + 0.6 * noise
    empty, prompted = editor.encode_prompt([""] * 2), editor.encode_prompt(prompts)
    with torch.no_grad():
        velocity = editor.components.unet(
            hidden_states=torch.cat([noisy, noisy]), timestep=torch.full((4,), 600.0),
            encoder_hidden_states=torch.cat([empty.hidden_states, prompted.hidden_states]),
            pooled_projections=torch.cat([empty.extra["pooled_projections"], prompted.extra["pooled_projections"]]),
        ).sample.float()
    guided = velocity[:2] + 2.5 * (velocity[2:] - velocity[:2])
    torch.testing.assert_close(clean, noisy - 0.6 * guided, rtol=1e-4, atol=1e-4)


def test_the_bundled_model_reads_its_own_caption_back_at_low_noise(shapes_editor):
    cases = evaluate.recolour_cases(4, seed=5)
    rows = readout.readout(shapes_editor, cases, levels=(0.2,), guidances=(1.0, 6.0))
    backgrounds = {case.source.background for case in cases}
    assert len(rows) == 2 * 2 * len(backgrounds) and backgrounds <= set(BACKGROUNDS)
    own = [row for row in rows if row.prompt == "ref"]
    assert all(row.query_iou > 0.9 and row.read_as_background == 0 for row in own)
    table = readout.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 0.2 |" in table
