"""Typed configuration of the shapes models: architecture and training, with the named presets.

The UNet model (`TrainConfig`, `CONFIGS`, trained by ``shapes_training.train``): `tiny` runs every phase
for a few steps in seconds (tests); `default` is the real run, sized for about 45 minutes on one CPU
thread (`--threads 1`): VAE ~7 min, latent pool ~1.5 min, UNet ~35 min; `gpu` trains the same
architecture's UNet far longer on a GPU; `finetune` continues a finished model's UNet and text encoder
(``--init-model``) on CPU.

The flow model `shapes-flow` (`FlowTrainConfig`, `FLOW_CONFIGS`, trained by ``shapes_training.train_flow``):
the SD3 layout on the shapes model's VAE and text encoder; `tiny` for tests, `default` the real CPU run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VAEConfig:
    """AutoencoderKL: 64x64x3 <-> 16x16x4 (two downsamplings for three blocks)."""

    channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_groups: int = 8  # 32 groups decoded red/green as olive/brown in prototypes
    init_logvar: float = -6.0  # initial posterior log-variance (std 0.05)


@dataclass
class TextConfig:
    """CLIPTextModel over the world tokenizer."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 512


@dataclass
class UNetConfig:
    """UNet2DConditionModel on 16x16x4 latents; cross-attention width = text hidden size."""

    channels: tuple[int, ...] = (64, 96, 128)
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = (1, 2)  # resolution levels (0 = 16x16) with transformer blocks
    heads: int = 2
    norm_groups: int = 32


@dataclass
class TrainConfig:
    """All settings of a training run; stored in checkpoints so that --resume can check them."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    seed: int = 0
    init_vae: str = ""  # a shapes model folder whose VAE was taken (phase (a) skipped), or "" when trained here
    init_model: str = ""  # a shapes model folder whose text encoder and UNet were fine-tuned, or ""
    # phase (a): autoencoder
    vae_steps: int = 900
    vae_batch: int = 8
    vae_lr: float = 2e-3
    vae_warmup_steps: int = 30
    vae_kl_weight: float = 1e-6
    vae_shape_weight: float = 5.0  # loss weight of shape pixels and a 1 px ring around them
    vae_dot_weight: float = 10.0  # loss weight of grey-dot pixels
    scale_images: int = 1024  # images encoded to measure the latents' std (scaling_factor = 1/std)
    # phase (c): UNet (and text encoder when train_text_encoder)
    pool_size: int = 16384  # images encoded once; each UNet batch draws fresh posterior samples from them
    unet_steps: int = 1500
    unet_batch: int = 32
    unet_lr: float = 5e-4
    text_lr: float = 5e-4
    train_text_encoder: bool = True
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decays the learning rate to this fraction of its peak
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    min_snr_gamma: float = 5.0  # 0 disables min-SNR loss weighting
    empty_caption_prob: float = 0.1
    short_caption_prob: float = 0.25
    # bookkeeping
    checkpoint_every: int = 250
    log_every: int = 50

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        subs = {"vae": VAEConfig, "text": TextConfig, "unet": UNetConfig}
        for key, sub in subs.items():
            d[key] = sub(**{k: tuple(v) if isinstance(v, list) else v for k, v in d[key].items()})
        return cls(**d)


def tiny() -> TrainConfig:
    """Every phase for a few steps on a very small model: seconds, for tests."""
    return TrainConfig(
        vae=VAEConfig(channels=(8, 8, 8), norm_groups=4),
        text=TextConfig(hidden=32, layers=1, heads=2, intermediate=64),
        unet=UNetConfig(channels=(16, 32, 32), attention_levels=(1, 2), heads=2, norm_groups=8),
        vae_steps=3,
        vae_batch=4,
        vae_warmup_steps=1,
        scale_images=16,
        pool_size=32,
        unet_steps=4,
        unet_batch=4,
        warmup_steps=2,
        checkpoint_every=2,
        log_every=2,
    )


def default() -> TrainConfig:
    """The real run on CPU."""
    return TrainConfig()


def _long_unet_run(lr: float, **settings: Any) -> TrainConfig:
    """The default architecture, its UNet and text encoder at one peak `lr`, with the slower EMA (0.999)."""
    return TrainConfig(unet_lr=lr, text_lr=lr, ema_decay=0.999, **settings)


def gpu() -> TrainConfig:
    """The same architecture trained on a GPU: a larger pool and batch, many more UNet steps.

    Used with ``--init-vae`` (the CPU-trained autoencoder is already near its ceiling) and
    ``--unet-minutes`` (the step count is set from the measured speed and recorded).
    """
    return _long_unet_run(
        1e-3, pool_size=131072, unet_steps=20000, unet_batch=256, warmup_steps=300, checkpoint_every=5000, log_every=500
    )


def finetune() -> TrainConfig:
    """Continue a finished model's UNet and text encoder (``--init-model``) on CPU, about 45 min on one thread.

    A low peak learning rate and a slow EMA, and 40% empty captions: the unconditional
    prediction, which every guided step subtracts, gets four times its usual share. Measured
    from version 3 (model card, "Where the drift comes from"): less drift at the right answer,
    weaker recolour; not better by the eval.
    """
    return _long_unet_run(
        1e-4, unet_steps=1800, warmup_steps=50, empty_caption_prob=0.4, checkpoint_every=300, log_every=100
    )


CONFIGS = {"tiny": tiny, "default": default, "gpu": gpu, "finetune": finetune}


# ---------------------------------------------------------------------------- shapes-flow (SD3 layout)
@dataclass
class TransformerConfig:
    """SD3Transformer2DModel on 16x16x4 latents: 2x2 patches make 64 image tokens.

    The default (inner width 128 = 4 heads x 32, 4 joint blocks, 2.33 M parameters, 4.7 MB in fp16) is sized
    by the resumable checkpoint (< 25 MB at 8 bytes a parameter, ``shapes_training.compact``; 18.8 MB), not by
    the 20 MB export (8.3 MB in all): SD3's adaLN-Zero modulations make a block 36 x width^2 parameters, so 5
    blocks would fill the checkpoint to 23.6 MB and 6 blocks (28 MB) or width 192 (41 MB) would not fit.
    """

    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    patch_size: int = 2


@dataclass
class FlowTrainConfig:
    """All settings of a shapes-flow run; stored in checkpoints so that --resume can check them.

    The VAE, the tokenizer and the text encoder come from `source_model` (frozen: the checkpoint holds
    only the transformer's training state). SD3's pipeline conditions on two CLIP encoders' penultimate
    hidden states; both are made from the source's encoder (``shapes_training.flow_text``).
    """

    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    seed: int = 0
    source_model: str = "shapes"  # a bundled model's name or a shapes model folder: VAE, tokenizer, text encoder
    # The SD3 pipeline appends max_sequence_length (default 256) zero rows for the absent T5 encoder; the model
    # is trained with exactly that many (folded into one, shapes_training.folded_attention), so it expects them.
    t5_tokens: int = 256
    # FlowMatchEulerDiscreteScheduler's shift: 1.0, no shift. SD3's 3.0 moves 1024 px sampling towards noise
    # because large images keep their layout under more noise; a 64 px image (64 tokens) has no such excess.
    scheduler_shift: float = 1.0
    pool_size: int = 16384  # images encoded once (the UNet run's pool: same VAE, same seed)
    transformer_steps: int = 12000  # ~2.5 h at 0.73 s a step (batch 32, one thread, 2 shared cores)
    batch: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05  # cosine decays the learning rate to this fraction of its peak
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # flow times t (the scheduler's sigma) drawn logit-normal, as SD3 trained ("rf/lognorm(0.00, 1.00)")
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss_weighting: str = "none"  # diffusers' compute_loss_weighting_for_sd3: "none", "sigma_sqrt" or "cosmap"
    empty_caption_prob: float = 0.1
    short_caption_prob: float = 0.25
    # bookkeeping
    checkpoint_every: int = 250  # also where a run may stop (--stop-after, --stop-minutes): see compact.py
    log_every: int = 50

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlowTrainConfig:
        d = dict(d)
        d["transformer"] = TransformerConfig(**d["transformer"])
        return cls(**d)


def tiny_flow() -> FlowTrainConfig:
    """Every phase for a few steps on a very small transformer: seconds, for tests."""
    return FlowTrainConfig(
        transformer=TransformerConfig(layers=2, heads=2, head_dim=8),
        pool_size=32,
        transformer_steps=6,
        batch=4,
        warmup_steps=2,
        checkpoint_every=2,
        log_every=1,
    )


def default_flow() -> FlowTrainConfig:
    """The real run on CPU."""
    return FlowTrainConfig()


FLOW_CONFIGS = {"tiny": tiny_flow, "default": default_flow}
