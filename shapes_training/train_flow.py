"""Train shapes-flow: the shapes world in SD3's layout, by rectified flow, and write a diffusers folder.

    python -m shapes_training.train_flow --out DIR [--config tiny|default] [--resume] [--seed N] [--threads 1]
        [--stop-after N] [--stop-minutes M] [--transformer-minutes M] [--device cpu] [--pool-workers N]
    python -m shapes_training.train_flow --out DIR [--config ...] --export-now   # DIR/final from the checkpoint
    python -m shapes_training.train_flow --out DIR [--config ...] --extend-transformer N  # a finished run, N more

From the source model (``source_model``, the bundled ``shapes``): the VAE (frozen; its scaling_factor kept, a
shift_factor measured as the mean of the training latents), the world tokenizer and two frozen CLIP encoders
made from its text encoder (``shapes_training.flow_text``). Then:
  (pool)        the UNet run's pool of VAE-encoded images (DIR/latents.pt; re-encoded, identically, when absent);
  (transformer) a small SD3Transformer2DModel (adaLN-Zero start) trained by rectified flow as diffusers' SD3
                script does: x_t = (1 - t) x0 + t eps with t logit-normal, the transformer at timestep 1000 t
                predicting the velocity eps - x0 (MSE, optionally SD3-weighted); AdamW with warm-up + cosine,
                EMA, gradient clipping; captions full / short / empty (for classifier-free guidance).
Then the EMA weights are exported in fp16 to DIR/final (``export_flow_pipeline``).

The absent T5's 256 zero rows are folded into one during training (``shapes_training.folded_attention``): the
same function, 4x faster. Every batch is drawn from a generator seeded by (seed, phase, step), and the
checkpoint DIR/checkpoint.pt (< 25 MB, to be committed between sessions) stores the state compactly with the live
state rounded to match (``shapes_training.compact``), so a resumed run continues exactly as an uninterrupted one
would. A session stops only at a checkpoint step: --stop-after N / --stop-minutes M stop at the first checkpoint
step after N steps / M minutes (with the default config up to 250 steps, ~3 min, later). `--transformer-minutes`
sizes the whole run to a time budget, measured during the first session's warm-up, and records the step count
in the config. `--export-now` writes DIR/final from a checkpoint midway, to score it with
``shapes_training.sanity``, and leaves the run as it was.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from rich.console import Console
from rich.progress import Progress
from transformers import CLIPTokenizer

from ddsedit.flowscores import flow_noise
from ddsedit.loading import bundled_models
from ddsedit.shapes.world import IMAGE_SIZE
from shapes_training.bookkeeping import CHECKPOINT, TrainingRun, progress_bar, step_rng, warmup_cosine
from shapes_training.compact import BYTES_PER_PARAMETER, compact_ema, compact_module, compact_optimizer, load_ema
from shapes_training.config import FLOW_CONFIGS, FlowTrainConfig
from shapes_training.export import export_flow_pipeline
from shapes_training.flow_text import CaptionTable, build_text_encoders, load_source_text_encoder, world_captions
from shapes_training.folded_attention import fold_t5_tokens, unfold
from shapes_training.models import build_flow_scheduler, build_transformer

MAX_CHECKPOINT_BYTES = 25_000_000
PHASE = 3  # the step_rng stream of the transformer's batches (train.py's phases use 0-2)
RUN_TIME_FIELDS = ("transformer_steps",)  # set by --transformer-minutes while the run starts
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def resolve_source(name: str) -> Path:
    """A bundled model's folder by name, else `name` as a folder."""
    folder = bundled_models().get(name, Path(name))
    if not (folder / "vae").is_dir() or not (folder / "text_encoder").is_dir():
        raise SystemExit(f"source model {name!r}: not a bundled model or a shapes model folder (vae/, text_encoder/)")
    return folder


def fingerprint(*models: torch.nn.Module) -> str:
    """sha256 of the models' weights: a resumed run must train against the same frozen parts."""
    digest = hashlib.sha256()
    for model in models:
        for key, value in sorted(model.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class StopRule:
    """When a session may end early: after `steps` steps or `minutes` minutes, at the next checkpoint step."""

    steps: int | None = None
    minutes: float | None = None
    started: float = 0.0

    def due(self, done: int) -> bool:
        by_steps = self.steps is not None and done >= self.steps
        by_time = self.minutes is not None and time.time() - self.started >= self.minutes * 60
        return by_steps or by_time


class FlowTrainer(TrainingRun):
    """Owns the models, optimizer and progress of one shapes-flow run; `run()` does what remains."""

    max_checkpoint_bytes = MAX_CHECKPOINT_BYTES  # the checkpoint is committed between sessions

    def __init__(
        self,
        cfg: FlowTrainConfig,
        out: Path,
        console: Console | None = None,
        device: str = "cpu",
        pool_workers: int = 1,
        transformer_minutes: float | None = None,
    ) -> None:
        if cfg.loss_weighting not in LOSS_WEIGHTINGS:
            raise SystemExit(f"loss_weighting {cfg.loss_weighting!r}: one of {', '.join(LOSS_WEIGHTINGS)}")
        super().__init__(cfg, out, console, device, pool_workers)
        self.transformer_minutes = transformer_minutes
        source = resolve_source(cfg.source_model)
        self.tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        self.vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
        self.vae.eval().requires_grad_(False)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.text_encoders = build_text_encoders(load_source_text_encoder(source))
        joint_dim = sum(encoder.config.hidden_size for encoder in self.text_encoders)
        pooled_dim = sum(encoder.config.projection_dim for encoder in self.text_encoders)
        self.captions = CaptionTable.build(world_captions(), self.tokenizer, self.text_encoders, joint_dim)
        latent_size = IMAGE_SIZE // 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.transformer: SD3Transformer2DModel = build_transformer(
            cfg.transformer, self.vae.config.latent_channels, latent_size, joint_dim, pooled_dim
        )
        compact_module(self.transformer)  # start from fp16 values, as a checkpoint at step 0 would hold
        self._check_checkpoint_size()
        fold_t5_tokens(self.transformer, cfg.t5_tokens)
        self.scheduler = build_flow_scheduler(cfg.scheduler_shift)
        self.fingerprint = fingerprint(self.vae, *self.text_encoders)
        self.vae.to(self.device)
        self.transformer.to(self.device)
        self.captions = self.captions.to(self.device)
        self.ema = EMAModel(self.transformer.parameters(), decay=cfg.ema_decay, update_after_step=-1, foreach=True)
        self.optimizer = torch.optim.AdamW(self.transformer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.phase = "transformer"
        self.shift_factor: float | None = None
        self.seconds = {"pool": 0.0, "transformer": 0.0, "export": 0.0}

    def _check_checkpoint_size(self) -> None:
        """Refuse a transformer whose checkpoint (8 bytes a parameter, compact.py) would pass the limit."""
        params = sum(p.numel() for p in self.transformer.parameters())
        if params * BYTES_PER_PARAMETER > MAX_CHECKPOINT_BYTES * 0.97:  # a margin for the config and history
            raise SystemExit(f"{params / 1e6:.2f} M parameters: the checkpoint would pass {MAX_CHECKPOINT_BYTES} bytes")

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        """What resuming needs, compact: the live state is rounded to it (compact.py), so resuming is exact."""
        return {
            "config": self.cfg.to_dict(),
            "phase": self.phase,
            "step": self.step,
            "shift_factor": self.shift_factor,
            "seconds": self.seconds,
            "history": self.history,
            "fingerprint": self.fingerprint,
            "transformer": compact_module(self.transformer),
            "ema": compact_ema(self.ema),
            "optimizer": compact_optimizer(self.optimizer),
        }

    def load_checkpoint(self, path: Path, extend: int = 0) -> None:
        """Continue from a checkpoint made with the same config, seed and source model.

        With `extend` a finished run trains N steps more, its cosine schedule stretched to the new end.
        """
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        saved = FlowTrainConfig.from_dict(ckpt["config"])
        for name in RUN_TIME_FIELDS:
            setattr(self.cfg, name, getattr(saved, name))
        if saved.to_dict() != self.cfg.to_dict():
            raise SystemExit(f"{path} was made with another config; resume with the same --config and --seed")
        if ckpt["fingerprint"] != self.fingerprint:
            raise SystemExit(f"{path}: the source model's VAE or text encoder changed since the run started")
        self.phase, self.step, self.shift_factor = ckpt["phase"], ckpt["step"], ckpt["shift_factor"]
        self.seconds, self.history = ckpt["seconds"], ckpt["history"]
        self.transformer.load_state_dict(ckpt["transformer"])
        load_ema(self.ema, ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if extend:
            if self.phase != "done":
                raise SystemExit(f"{path} is not a finished run: finish it with --resume first")
            self.phase, self.cfg.transformer_steps = "transformer", self.cfg.transformer_steps + extend

    # ---------------------------------------------------------------- the transformer
    def flow_loss(self, latents: torch.Tensor, captions: list[str], gen: torch.Generator) -> torch.Tensor:
        """Rectified-flow loss of unscaled VAE latents: MSE of the predicted velocity against eps - x0."""
        cfg = self.cfg
        assert self.shift_factor is not None
        x0 = (latents - self.shift_factor) * self.scaling_factor  # what the pipeline decodes as x / scale + shift
        noise = self._randn(x0.shape, gen)
        t = compute_density_for_timestep_sampling(
            "logit_normal", x0.shape[0], logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, generator=gen
        ).to(self.device)
        prompt_embeds, pooled = self.captions.lookup(captions, t5_tokens=1)  # the folded T5 rows
        velocity = self.transformer(
            hidden_states=flow_noise(x0, noise, t),
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=t * self.scheduler.config.num_train_timesteps,
        ).sample
        mse = (velocity - (noise - x0)).pow(2).mean(dim=(1, 2, 3))
        return (compute_loss_weighting_for_sd3(cfg.loss_weighting, t) * mse).mean()

    def train_transformer(self, progress: Progress, stop: StopRule) -> None:
        """Train until the last step, or until `stop` is due at a checkpoint step."""
        cfg = self.cfg
        pool = self.latent_pool(self.vae)
        if self.shift_factor is None:
            self.shift_factor = round(float(pool.mean.mean()), 4)
            progress.console.print(f"shift_factor = {self.shift_factor} (mean of the pool's latents)")
        task = progress.add_task("transformer", total=cfg.transformer_steps, completed=self.step)
        self.transformer.train()
        params = list(self.transformer.parameters())
        done, t0, losses = 0, time.time(), []
        while self.step < cfg.transformer_steps:
            if self.step % cfg.checkpoint_every == 0 and stop.due(done):
                break
            self.calibrate(self.transformer_minutes, "transformer", "transformer_steps", progress, task)
            g, gen = step_rng(cfg.seed, PHASE, self.step)
            latents, captions = pool.draw(cfg.batch, g, gen, cfg.short_caption_prob, cfg.empty_caption_prob)
            lr = cfg.lr * warmup_cosine(self.step, cfg.warmup_steps, cfg.transformer_steps, cfg.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = self.flow_loss(latents.to(self.device), captions, gen)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.optimizer.step()
            self.ema.step(params)
            self.step, done = self.step + 1, done + 1
            losses.append(loss.detach())
            progress.advance(task)
            t0 = self._tick("transformer", t0, losses, progress)

    def export(self) -> int:
        """Write DIR/final with the EMA transformer and the frozen parts."""
        t0 = time.time()
        averaged = copy.deepcopy(self.transformer)
        self.ema.copy_to(averaged.parameters())
        unfold(averaged)
        info = {
            "config": self.cfg.to_dict(),
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "seconds": self.seconds,
            "history": self.history,
        }
        assert self.shift_factor is not None
        size = export_flow_pipeline(self.out / "final", copy.deepcopy(self.vae).cpu(), self.shift_factor,
                                    self.text_encoders, self.tokenizer, averaged.cpu(), self.scheduler, info)
        self.seconds["export"] += time.time() - t0
        return size

    def run(self, stop_after: int | None = None, stop_minutes: float | None = None, threads: int = 1) -> bool:
        """Train what remains, then export; a session may end early at a checkpoint step (StopRule).

        Returns True when the run is complete and DIR/final written.
        """
        torch.set_num_threads(threads)
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_budget(self.transformer_minutes, "transformer_steps")
        with progress_bar(self.console) as progress:
            if self.phase == "transformer":
                self.train_transformer(progress, StopRule(stop_after, stop_minutes, started=time.time()))
                if self.step < self.cfg.transformer_steps:
                    self.save_checkpoint()
                    return False
                self.phase = "done"
        size = self.export()
        self.console.print(f"wrote {self.out / 'final'} ({size / 1e6:.1f} MB); seconds per phase: "
                           + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items()))
        self.save_checkpoint()
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shapes_training.train_flow", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.pt, latents.pt and final/")
    parser.add_argument("--config", choices=sorted(FLOW_CONFIGS), default="default")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 is far faster than 2 when another process shares two cores")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="end this session, checkpointed, at the first checkpoint step after N steps")
    parser.add_argument("--stop-minutes", type=float, default=None,
                        help="end this session, checkpointed, at the first checkpoint step after M minutes")
    parser.add_argument("--transformer-minutes", type=float, default=None,
                        help="size the whole run to this budget (measured in the first session's warm-up)")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    parser.add_argument("--pool-workers", type=int, default=1, help="processes rendering the latent pool")
    parser.add_argument("--extend-transformer", type=int, default=0,
                        help="train a finished run N steps more (its cosine schedule stretched to the new end)")
    parser.add_argument("--export-now", action="store_true",
                        help="write DIR/final from the checkpoint's EMA as it stands (for sanity midway)")
    args = parser.parse_args(argv)

    cfg = FLOW_CONFIGS[args.config]()
    cfg.seed = args.seed
    trainer = FlowTrainer(cfg, args.out, device=args.device, pool_workers=args.pool_workers,
                          transformer_minutes=args.transformer_minutes)
    ckpt = args.out / CHECKPOINT
    if args.export_now:
        if not ckpt.exists():
            raise SystemExit(f"--export-now needs a run's {ckpt}")
        trainer.load_checkpoint(ckpt)
        size = trainer.export()
        trainer.console.print(f"wrote {args.out / 'final'} ({size / 1e6:.1f} MB) at step {trainer.step}")
        return
    if args.extend_transformer:
        if not ckpt.exists():
            raise SystemExit(f"--extend-transformer needs a finished run's {ckpt}")
        trainer.load_checkpoint(ckpt, extend=args.extend_transformer)
        trainer.console.print(f"extending to {trainer.cfg.transformer_steps} steps, from step {trainer.step}")
    elif args.resume and ckpt.exists():
        trainer.load_checkpoint(ckpt)
        trainer.console.print(f"resuming at phase {trainer.phase}, step {trainer.step}")
    elif ckpt.exists():
        raise SystemExit(f"{ckpt} exists: pass --resume to continue it, or choose another --out")
    trainer.run(stop_after=args.stop_after, stop_minutes=args.stop_minutes, threads=args.threads)


if __name__ == "__main__":
    main()
