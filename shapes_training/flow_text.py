"""The text side of shapes-flow: SD3's two CLIP encoders made from the shapes text encoder, and the prompt encoding.

SD3's pipeline (``StableDiffusion3Pipeline.encode_prompt``) conditions on
* the penultimate hidden states (``hidden_states[-2]``) of ``text_encoder`` and ``text_encoder_2``, concatenated
  on features and zero-padded to the transformer's ``joint_attention_dim``, followed on the sequence by
  ``max_sequence_length`` rows from T5, which are zeros when ``text_encoder_3`` is absent (as here);
* the two encoders' projected pooled outputs (``text_embeds``), concatenated.

The shapes text encoder (a CLIPTextModel) has 2 layers, so its penultimate hidden state is its first layer's
output. Two CLIPTextModelWithProjection are made from it, frozen:
* ``text_encoder`` ("deep"): the source plus one identity layer (its attention and MLP output projections
  zeroed), so that its penultimate state is the source's last layer (before the final LayerNorm) and its pooled
  output, before projection, is exactly the source's;
* ``text_encoder_2`` ("shallow"): the source as it is; its penultimate state is the source's first layer.
Each gets a fresh, seeded ``text_projection``. The two sequence features differ (as SD3's CLIP-L and CLIP-G do),
so a loader that swapped or duplicated the encoders would condition differently.

Every weight is rounded to fp16 when built: the export stores fp16, and the transformer trains against exactly
the encoders it ships with. Frozen encoders see a closed set of captions (every caption the shapes world makes),
so their outputs are computed once (`CaptionTable`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ddsedit.shapes.world import BACKGROUNDS, COLOURS, SHAPES, make_caption


def world_captions() -> list[str]:
    """Every caption the latent pool draws: the empty one, then each short and each full caption."""
    short = [make_caption(c, s, None) for c in COLOURS for s in SHAPES]
    full = [make_caption(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    return ["", *short, *full]


def _with_projection(source: CLIPTextModel, extra_layers: int) -> CLIPTextModelWithProjection:
    """A CLIPTextModelWithProjection holding `source`'s weights, `extra_layers` identity layers on top."""
    config = copy.deepcopy(source.config)
    config.num_hidden_layers = source.config.num_hidden_layers + extra_layers
    model = CLIPTextModelWithProjection(config)
    missing, unexpected = model.text_model.load_state_dict(source.state_dict(), strict=False)
    added = {f"encoder.layers.{source.config.num_hidden_layers + i}." for i in range(extra_layers)}
    assert not unexpected and all(any(key.startswith(a) for a in added) for key in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in model.text_model.encoder.layers[source.config.num_hidden_layers :]:
            for output in (layer.self_attn.out_proj, layer.mlp.fc2):  # zero residual branches: an identity layer
                output.weight.zero_()
                output.bias.zero_()
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half())
    return model.eval().requires_grad_(False)


def build_text_encoders(source: CLIPTextModel) -> tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection]:
    """The pipeline's (text_encoder, text_encoder_2): the deep and the shallow encoder (module docstring).

    Random parts (the projections, the identity layer's unused attention and MLP inputs) come from torch's
    global generator: seed it first.
    """
    return _with_projection(source, extra_layers=1), _with_projection(source, extra_layers=0)


def load_source_text_encoder(folder: Path) -> CLIPTextModel:
    """The shapes model's text encoder in float32 (stored in fp16, so build_text_encoders' rounding keeps it)."""
    return CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.float32)


@torch.no_grad()
def encode_prompts(
    captions: list[str],
    tokenizer: CLIPTokenizer,
    encoders: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection],
    joint_attention_dim: int,
    t5_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) as StableDiffusion3Pipeline.encode_prompt makes them without T5 (clip_skip None).

    prompt_embeds is (n, 77 + t5_tokens, joint_attention_dim); pooled is (n, sum of projection widths).
    """
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    outputs = [encoder(ids, output_hidden_states=True) for encoder in encoders]
    clip = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
    clip = F.pad(clip, (0, joint_attention_dim - clip.shape[-1]))
    t5 = torch.zeros(len(captions), t5_tokens, joint_attention_dim)
    pooled = torch.cat([out.text_embeds for out in outputs], dim=-1)
    return torch.cat([clip, t5], dim=-2), pooled


@dataclass
class CaptionTable:
    """The CLIP part of the conditioning (n, 77, joint_attention_dim) and the pooled vectors of known captions."""

    captions: list[str]
    clip: torch.Tensor
    pooled: torch.Tensor

    @classmethod
    def build(
        cls,
        captions: list[str],
        tokenizer: CLIPTokenizer,
        encoders: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection],
        joint_attention_dim: int,
    ) -> CaptionTable:
        embeds, pooled = encode_prompts(captions, tokenizer, encoders, joint_attention_dim, t5_tokens=0)
        return cls(list(captions), embeds, pooled)

    def to(self, device: torch.device) -> CaptionTable:
        return CaptionTable(self.captions, self.clip.to(device), self.pooled.to(device))

    def lookup(self, captions: list[str], t5_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled) of `captions`, with `t5_tokens` zero rows appended (the absent T5's)."""
        index = torch.tensor([self.captions.index(c) for c in captions])
        clip = self.clip[index]
        t5 = clip.new_zeros(len(captions), t5_tokens, clip.shape[-1])
        return torch.cat([clip, t5], dim=-2), self.pooled[index]
