"""Hooks into the UNet's attention: the one module of ddsedit that touches attention processors.

CDS (Nam et al., 2024) compares the UNet's self-attention features of the source and the target.
:class:`SelfAttentionRecorder` wraps the processor of every self-attention layer (``attn1``) in the
UNet's up blocks so that each call also keeps the layer's output (after the output projection, before
the transformer block adds its residual), and puts the original processors back when it exits, even
on an error: a DDS edit after a CDS edit runs exactly the UNet it ran before.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ddsedit.errors import DDSEditError, ModelError


class _RecordingProcessor:
    """Calls the layer's own processor and keeps its output under the layer's name."""

    def __init__(self, inner: Any, name: str, outputs: dict[str, torch.Tensor]) -> None:
        self.inner = inner
        self.name = name
        self.outputs = outputs

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = self.inner(attn, hidden_states, *args, **kwargs)
        self.outputs[self.name] = output
        return output


def up_block_self_attention(unet: torch.nn.Module) -> dict[str, Any]:
    """The self-attention layers (``attn1``) of the UNet's up blocks, by module name (9 in SD 1.x)."""
    layers = {}
    for name, module in unet.named_modules():
        parts = name.split(".")
        if parts[-1] == "attn1" and "up_blocks" in parts and hasattr(module, "set_processor"):
            layers[name] = module
    return layers


class SelfAttentionRecorder:
    """A context manager: while open, ``outputs[name]`` holds each up-block self-attention layer's last output.

    Raises:
        ModelError: the UNet has no self-attention layer in its up blocks (CDS has nothing to compare).
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        self.layers = up_block_self_attention(unet)
        if not self.layers:
            raise ModelError(
                "this model's UNet has no self-attention layer (attn1) in its up blocks: "
                "the contrastive term of cds/ids needs one"
            )
        self.outputs: dict[str, torch.Tensor] = {}
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> SelfAttentionRecorder:
        try:
            for name, layer in self.layers.items():
                original = layer.processor
                layer.set_processor(_RecordingProcessor(original, name, self.outputs))
                self._originals[name] = original
        except BaseException:
            self.__exit__(None, None, None)  # a later swap failed: put back the ones already swapped
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name, original in self._originals.items():
            self.layers[name].set_processor(original)
        self._originals.clear()
        self.outputs.clear()


def feature_grid(positions: int, latent_height: int, latent_width: int) -> tuple[int, int]:
    """The (height, width) of a layer's feature map with ``positions`` = height * width tokens.

    Each UNet level halves the latent with a stride-2 convolution (``ceil(n / 2)``), so the map is
    ``ceil(h / f) x ceil(w / f)`` for the level's factor ``f``, a power of two.
    """
    factor = 1
    while factor < 2 * max(latent_height, latent_width):  # up to the first factor whose map is 1x1
        height, width = math.ceil(latent_height / factor), math.ceil(latent_width / factor)
        if height * width == positions:
            return height, width
        factor *= 2
    raise DDSEditError(f"cannot place {positions} attention tokens on a {latent_height}x{latent_width} latent")
