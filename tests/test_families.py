"""Model families, one declaration each, and the conditioning their denoisers take."""

from __future__ import annotations

import pytest
import torch

from ddsedit.conditioning import Conditioning, vae_scaling
from ddsedit.errors import ModelError
from ddsedit.families import FAMILIES, NOISE, family_of_pipeline


def test_sd_is_the_first_family_and_others_are_refused_in_one_line() -> None:
    sd = family_of_pipeline("StableDiffusionPipeline")
    assert sd is FAMILIES["sd"] is family_of_pipeline(None)
    assert (sd.prediction, sd.default_size) == (NOISE, 512)
    assert callable(sd.function("encode_prompts")) and callable(sd.function("call_denoiser"))
    with pytest.raises(ModelError, match="HunyuanDiTPipeline models are not supported yet"):
        family_of_pipeline("HunyuanDiTPipeline")


def test_conditioning_rows_stack_and_split_with_their_extra_tensors() -> None:
    first = Conditioning(torch.zeros(1, 3, 2), {"pooled": torch.zeros(1, 4)})
    second = Conditioning(torch.ones(2, 3, 2), {"pooled": torch.ones(2, 4)})
    both = Conditioning.cat([first.expand(2), second])
    assert len(both) == 4 and both.extra["pooled"].shape == (4, 4)
    assert torch.equal(both.rows(2, 4).hidden_states, second.hidden_states)
    assert both.to(torch.float16).extra["pooled"].dtype == torch.float16


def test_latent_scaling_reads_the_vae_config() -> None:
    class Config:
        scaling_factor = 0.18215

    class Shifted(Config):
        shift_factor = 0.1159

    assert vae_scaling(Config()) == (0.18215, 0.0) and vae_scaling(Shifted()) == (0.18215, 0.1159)
