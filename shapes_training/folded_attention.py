"""Joint attention over a context whose last token stands for many identical ones: SD3's T5 zeros, folded.

Without T5 the SD3 pipeline appends 256 zero rows to the 77 CLIP rows of the context. The context embedder
maps them all to the same token, and nothing in the transformer tells them apart (the context has no position
embedding; every layer acts on each token alone except attention, where identical queries get identical
outputs). So in every layer they stay identical, and in softmax attention L identical keys and values weigh
exactly as one of them whose logit is raised by log L. Training with that one token (77 + 1 context rows instead
of 77 + 256) computes the same function 4x faster (the default transformer, a batch of 32 forward and backward
on one CPU thread: 0.66 s against 2.65 s); the exported model has diffusers' own processor and is run by the
pipeline with the 256 real rows (tests/test_training_flow.py checks that both agree).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0


class FoldedJointAttnProcessor:
    """JointAttnProcessor2_0's computation, the context's last token counted `count` times in the softmax."""

    def __init__(self, count: int) -> None:
        self.log_count = math.log(count)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert encoder_hidden_states is not None and attention_mask is None, "only SD3's joint attention is folded"
        n, image_tokens = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(n, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        c_query = heads(attn.add_q_proj(encoder_hidden_states))
        c_key = heads(attn.add_k_proj(encoder_hidden_states))
        c_value = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.norm_added_q is not None:
            c_query, c_key = attn.norm_added_q(c_query), attn.norm_added_k(c_key)
        query, key, value = (torch.cat(pair, dim=2) for pair in ((query, c_query), (key, c_key), (value, c_value)))
        bias = query.new_zeros(1, key.shape[2])  # added to every query's logits
        bias[0, -1] = self.log_count
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).reshape(n, -1, attn.heads * out.shape[-1]).to(query.dtype)
        image, context = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def fold_t5_tokens(transformer: SD3Transformer2DModel, count: int) -> None:
    """Make `transformer` expect one T5 row standing for `count` (training); see the module docstring."""
    transformer.set_attn_processor(FoldedJointAttnProcessor(count))


def unfold(transformer: SD3Transformer2DModel) -> None:
    """Back to diffusers' processor, which the pipeline and an exported model use."""
    transformer.set_attn_processor(JointAttnProcessor2_0())
