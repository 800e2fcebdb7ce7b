"""Train the shapes text-to-image pipeline from scratch on CPU, in phases, and write a diffusers folder.

    python -m shapes_training.train --out DIR [--config tiny|default|gpu] [--resume] [--seed N]
        [--device cuda] [--init-vae MODEL_DIR] [--unet-minutes M]

Phases:
  (a) vae   -- AutoencoderKL 64x64x3 <-> 16x16x4; L1 + MSE with shape pixels (and a 1 px ring) weighted
               x5 and grey-dot pixels x10, tiny KL. Then scaling_factor = 1 / std of encoded latents.
  (b) text  -- the world tokenizer (one token per word) and a randomly initialised CLIPTextModel.
  (c) unet  -- a pool of VAE-encoded images (DIR/latents.pt), then UNet2DConditionModel: epsilon
               prediction under SD's DDPM schedule, min-SNR weighting, AdamW with warm-up + cosine,
               EMA; the text encoder trains jointly unless configured frozen.
Then the EMA weights are exported in fp16 to DIR/final.

`--init-vae` takes the autoencoder (and its scaling_factor) of an existing shapes model and skips phase (a);
`--init-model` takes its text encoder and UNet as well, to fine-tune them (e.g. with `--config finetune`).
`--unet-minutes` sizes phase (c) to a time budget: the speed is measured during the warm-up (whose
learning rate does not depend on the total) and `unet_steps` set from it, then recorded in the config.

Every batch is drawn from a generator seeded by (seed, phase, step), so a run is reproducible and a
--resume from DIR/checkpoint.pt continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from rich.console import Console
from rich.progress import Progress
from transformers import CLIPTextModel, CLIPTokenizer

from ddsedit.scores import add_noise
from ddsedit.shapes.world import WORDS, render_batch, sample_case
from ddsedit.wordtokenizer import MAX_LENGTH, build_tokenizer
from shapes_training.bookkeeping import CHECKPOINT, TrainingRun, progress_bar, step_rng, warmup_cosine
from shapes_training.config import CONFIGS, TrainConfig
from shapes_training.export import export_pipeline
from shapes_training.models import build_scheduler, build_text_encoder, build_unet, build_vae

PHASES = ("vae", "unet", "done")
# config fields that --init-vae / --init-model / --unet-minutes set
RUN_TIME_FIELDS = ("init_vae", "init_model", "vae_steps", "unet_steps")


def reconstruction_loss(
    recon: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, dots: torch.Tensor,
    shape_weight: float, dot_weight: float,
) -> torch.Tensor:  # fmt: skip
    """L1 + MSE with shape pixels (and a 1 px ring) weighted `shape_weight` and grey-dot pixels `dot_weight`.

    The weights keep small things right: without them the loss is ruled by the background.
    """
    near_shape = F.max_pool2d(masks.float(), 3, stride=1, padding=1)  # the shape and a 1 px ring
    weight = 1 + (shape_weight - 1) * near_shape + (dot_weight - 1) * dots.float()
    diff = recon - images
    err = diff.abs() + diff.pow(2)
    return (weight * err).sum() / (weight.sum() * images.shape[1])


class Trainer(TrainingRun):
    """Owns the models, optimizers and progress of one run; `run()` does every remaining phase."""

    def __init__(
        self,
        cfg: TrainConfig,
        out: Path,
        console: Console | None = None,
        device: str = "cpu",
        pool_workers: int = 1,
        unet_minutes: float | None = None,
    ) -> None:
        super().__init__(cfg, out, console, device, pool_workers)
        self.unet_minutes = unet_minutes
        self.tokenizer: CLIPTokenizer = build_tokenizer(WORDS)
        self.vae: AutoencoderKL = build_vae(cfg.vae)
        self.text_encoder: CLIPTextModel = build_text_encoder(cfg.text, self.tokenizer)
        latent_size = 64 // 2 ** (len(cfg.vae.channels) - 1)
        self.unet: UNet2DConditionModel = build_unet(cfg.unet, cfg.vae.latent_channels, cfg.text.hidden, latent_size)
        self.scheduler: DDPMScheduler = build_scheduler()
        for model in (self.vae, self.text_encoder, self.unet):
            model.to(self.device)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.unet_ema, self.text_ema = self._ema(self.unet), self._ema(self.text_encoder)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        groups = [{"params": list(self.unet.parameters()), "lr": cfg.unet_lr}]
        if cfg.train_text_encoder:
            groups.append({"params": list(self.text_encoder.parameters()), "lr": cfg.text_lr})
        self.unet_opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.phase, self.step = "vae", 0
        self.scaling_factor: float | None = None
        self.seconds = {"vae": 0.0, "scale": 0.0, "pool": 0.0, "unet": 0.0, "export": 0.0}
        self._token_cache: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "phase": self.phase,
            "step": self.step,
            "scaling_factor": self.scaling_factor,
            "seconds": self.seconds,
            "history": self.history,
            "vae": self.vae.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "text_ema": self.text_ema.state_dict(),
            "unet": self.unet.state_dict(),
            "unet_ema": self.unet_ema.state_dict(),
            "unet_opt": self.unet_opt.state_dict(),
        }

    def load_checkpoint(self, path: Path, extend_unet: int = 0) -> None:
        """Continue from a checkpoint; with ``extend_unet`` a finished run trains its UNet N steps more."""
        ckpt = torch.load(path, map_location=self.device, weights_only=False)
        if extend_unet:
            self.cfg = TrainConfig.from_dict(ckpt["config"])
            if ckpt["phase"] != "done":
                raise SystemExit(f"{path} is not a finished run: finish it with --resume first")
        else:
            # --init-vae and --unet-minutes set these while the run starts: take what the run recorded
            saved = TrainConfig.from_dict(ckpt["config"])
            for name in RUN_TIME_FIELDS:
                setattr(self.cfg, name, getattr(saved, name))
            if saved.to_dict() != self.cfg.to_dict():  # via from_dict: fields added since then take defaults
                raise SystemExit(f"{path} was made with another config; resume with the same --config and --seed")
        self.phase, self.step = ckpt["phase"], ckpt["step"]
        if extend_unet:
            self.phase, self.step = "unet", self.cfg.unet_steps
            self.cfg.unet_steps += extend_unet
        self.scaling_factor, self.seconds, self.history = ckpt["scaling_factor"], ckpt["seconds"], ckpt["history"]
        for name, model in (("unet_ema", self.unet), ("text_ema", self.text_encoder)):
            if "shadow_params" not in ckpt[name]:  # written before EMAModel: the averaged module's state dict
                # the EMA's update count: the UNet steps done ("done" restarts `step` at 0)
                updates = {"vae": 0, "unet": ckpt["step"]}.get(ckpt["phase"], ckpt["config"]["unet_steps"])
                weights = [ckpt[name][key] for key, _ in model.named_parameters()]
                ckpt[name] = {"shadow_params": weights, "optimization_step": updates}
        for name in ("vae", "vae_opt", "text_encoder", "text_ema", "unet", "unet_ema", "unet_opt"):
            getattr(self, name).load_state_dict(ckpt[name])

    def init_vae_from(self, model_dir: Path) -> None:
        """Take the autoencoder and scaling_factor of a finished shapes model; phase (a) is then skipped."""
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch.float32)
        self.vae.load_state_dict(vae.state_dict())
        self.scaling_factor = float(vae.config.scaling_factor)
        self.cfg.vae_steps = 0
        self.cfg.init_vae = str(model_dir)
        self.phase, self.step = "unet", 0

    def init_model_from(self, model_dir: Path) -> None:
        """Start from a finished shapes model: its VAE (as ``init_vae_from``), text encoder and UNet.

        The trained weights and their EMA both start from the model's (EMA) weights, so a
        fine-tune's EMA does not average in the random initialisation.
        """
        self.init_vae_from(model_dir)
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", torch_dtype=torch.float32)
        self.unet.load_state_dict(unet.state_dict())
        self.text_encoder.load_state_dict(text_encoder.state_dict())
        self.unet_ema, self.text_ema = self._ema(self.unet), self._ema(self.text_encoder)
        self.cfg.init_model = str(model_dir)

    def _advance(self, phase: str) -> None:
        self.phase, self.step = phase, 0
        self.save_checkpoint()

    # ---------------------------------------------------------------- phase (a): autoencoder
    def vae_loss(self, images: torch.Tensor, masks: torch.Tensor, dots: torch.Tensor, gen: torch.Generator):
        """Weighted L1 + MSE reconstruction loss plus a tiny KL; returns (loss, plain L1)."""
        cfg = self.cfg
        posterior = self.vae.encode(images).latent_dist
        recon = self.vae.decode(posterior.mean + posterior.std * self._randn(posterior.mean.shape, gen)).sample
        rec = reconstruction_loss(recon, images, masks, dots, cfg.vae_shape_weight, cfg.vae_dot_weight)
        kl = posterior.kl().mean()
        return rec + cfg.vae_kl_weight * kl, (recon - images).abs().mean()

    def train_vae(self, progress: Progress, budget: int | None) -> int:
        cfg = self.cfg
        task = progress.add_task("(a) vae", total=cfg.vae_steps, completed=self.step)
        self.vae.train()
        done, t0, losses = 0, time.time(), []
        while self.step < cfg.vae_steps and (budget is None or done < budget):
            g, gen = step_rng(cfg.seed, 0, self.step)
            cases = [sample_case(g) for _ in range(cfg.vae_batch)]
            images, masks, dots = (x.to(self.device) for x in render_batch(cases))
            lr_mult = warmup_cosine(self.step, cfg.vae_warmup_steps, cfg.vae_steps, cfg.min_lr_ratio)
            for group in self.vae_opt.param_groups:
                group["lr"] = cfg.vae_lr * lr_mult
            loss, l1 = self.vae_loss(images, masks, dots, gen)
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.grad_clip)
            self.vae_opt.step()
            self.step, done = self.step + 1, done + 1
            losses.append(l1.item())
            progress.advance(task)
            t0 = self._tick("vae", t0, losses, progress, label="l1", loss=loss.item())
        return done

    @torch.no_grad()
    def measure_scaling(self) -> float:
        """1 / std of VAE latents (posterior samples) of `scale_images` fresh images."""
        self.vae.eval()
        g, gen = step_rng(self.cfg.seed, 1, 0)
        latents = []
        for start in range(0, self.cfg.scale_images, 64):
            n = min(64, self.cfg.scale_images - start)
            images, _, _ = render_batch([sample_case(g) for _ in range(n)])
            posterior = self.vae.encode(images.to(self.device)).latent_dist
            latents.append(posterior.mean + posterior.std * self._randn(posterior.mean.shape, gen))
        return float(1.0 / torch.cat(latents).std())

    # ---------------------------------------------------------------- phase (c): UNet
    def tokens(self, captions: list[str]) -> torch.Tensor:
        """Token ids (n, 77) of captions, padded with the end token as at inference."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._token_cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                 return_tensors="pt").input_ids
            self._token_cache.update(zip(missing, ids.to(self.device), strict=True))
        return torch.stack([self._token_cache[c] for c in captions])

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Text encoder hidden states (n, 77, hidden), run once per distinct caption in the batch."""
        unique = list(dict.fromkeys(captions))
        index = torch.tensor([unique.index(c) for c in captions], device=self.device)
        with torch.set_grad_enabled(self.cfg.train_text_encoder and self.text_encoder.training):
            hidden = self.text_encoder(self.tokens(unique))[0]
        return hidden[index]

    def unet_loss(self, latents: torch.Tensor, captions: list[str], gen: torch.Generator) -> torch.Tensor:
        """Epsilon-prediction MSE of scaled latents at uniform random timesteps, min-SNR weighted."""
        cfg = self.cfg
        noise = self._randn(latents.shape, gen)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        alpha_bar = self.alphas_cumprod[t.to(self.device)]
        noisy = add_noise(latents, noise, alpha_bar)
        pred = self.unet(noisy, t.to(self.device), self.encode_text(captions)).sample
        mse = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma > 0:
            snr = compute_snr(self.scheduler, t.to(self.device))
            mse = mse * snr.clamp(max=cfg.min_snr_gamma) / snr
        return mse.mean()

    def _ema(self, model: torch.nn.Module) -> EMAModel:
        """diffusers' EMA of `model`'s weights, its decay warmed up as (1 + n) / (10 + n) after n updates.

        By default EMAModel's first update copies the weights and its warm-up starts one update later;
        ``update_after_step=-1`` starts it at the first update, as this trainer always did, so a run's
        weights stay those of earlier versions.
        """
        return EMAModel(model.parameters(), decay=self.cfg.ema_decay, update_after_step=-1, foreach=True)

    @staticmethod
    def _averaged(model: torch.nn.Module, ema: EMAModel) -> torch.nn.Module:
        """A copy of `model` holding `ema`'s averaged weights (the model itself keeps the trained ones)."""
        averaged = copy.deepcopy(model)
        ema.copy_to(averaged.parameters())
        return averaged

    def update_ema(self) -> None:
        """Update the EMA of the UNet, and of the text encoder when it trains."""
        self.unet_ema.step(self.unet.parameters())
        if self.cfg.train_text_encoder:
            self.text_ema.step(self.text_encoder.parameters())

    def train_unet(self, progress: Progress, budget: int | None) -> int:
        cfg = self.cfg
        pool = self.latent_pool(self.vae)
        task = progress.add_task("(c) unet", total=cfg.unet_steps, completed=self.step)
        self.vae.eval().requires_grad_(False)
        self.unet.train()
        self.text_encoder.train(cfg.train_text_encoder).requires_grad_(cfg.train_text_encoder)
        params = [p for group in self.unet_opt.param_groups for p in group["params"]]
        peaks = [cfg.unet_lr, cfg.text_lr][: len(self.unet_opt.param_groups)]
        done, t0, losses = 0, time.time(), []
        while self.step < cfg.unet_steps and (budget is None or done < budget):
            self.calibrate(self.unet_minutes, "unet", "unet_steps", progress, task)
            g, gen = step_rng(cfg.seed, 2, self.step)
            latents, captions = pool.draw(cfg.unet_batch, g, gen, cfg.short_caption_prob, cfg.empty_caption_prob)
            latents = latents.to(self.device)
            lr_mult = warmup_cosine(self.step, cfg.warmup_steps, cfg.unet_steps, cfg.min_lr_ratio)
            for group, peak in zip(self.unet_opt.param_groups, peaks, strict=True):
                group["lr"] = peak * lr_mult
            loss = self.unet_loss(latents * self.scaling_factor, captions, gen)
            self.unet_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.unet_opt.step()
            self.step, done = self.step + 1, done + 1
            self.update_ema()
            losses.append(loss.detach())
            progress.advance(task)
            t0 = self._tick("unet", t0, losses, progress)
        return done

    def export(self) -> int:
        """Write DIR/final with the EMA UNet (and EMA text encoder when it was trained)."""
        t0 = time.time()
        text = self._averaged(self.text_encoder, self.text_ema) if self.cfg.train_text_encoder else self.text_encoder
        unet = self._averaged(self.unet, self.unet_ema)
        info = {
            "config": self.cfg.to_dict(),
            "scaling_factor": self.scaling_factor,
            "seconds": self.seconds,
            "history": self.history,
        }
        assert self.scaling_factor is not None
        size = export_pipeline(self.out / "final", self.vae.cpu(), text.cpu(), self.tokenizer, unet.cpu(),
                               self.scheduler, self.scaling_factor, info)
        self.seconds["export"] += time.time() - t0
        return size

    def run(self, stop_after: int | None = None, threads: int = 1) -> bool:
        """Train every remaining phase; stop early (with a checkpoint) after `stop_after` steps.

        Returns True when the run is complete and DIR/final written.
        """
        torch.set_num_threads(threads)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.phase == "unet":
            self.check_budget(self.unet_minutes, "unet_steps")
        budget = stop_after
        with progress_bar(self.console) as progress:
            if self.phase == "vae":
                done = self.train_vae(progress, budget)
                budget = None if budget is None else budget - done
                if self.step < self.cfg.vae_steps:
                    self.save_checkpoint()
                    return False
                t0 = time.time()
                self.scaling_factor = self.measure_scaling()
                self.seconds["scale"] += time.time() - t0
                progress.console.print(f"scaling_factor = {self.scaling_factor:.4f}")
                self._advance("unet")
            if self.phase == "unet":
                self.train_unet(progress, budget)
                if self.step < self.cfg.unet_steps:
                    self.save_checkpoint()
                    return False
                self._advance("done")
        size = self.export()
        self.console.print(f"wrote {self.out / 'final'} ({size / 1e6:.1f} MB); seconds per phase: "
                           + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items()))
        self.save_checkpoint()
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shapes_training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.pt and final/")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 is far faster than 2 when another process shares two cores",
    )
    parser.add_argument("--stop-after", type=int, default=None, help="stop, checkpointed, after N steps")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    parser.add_argument("--pool-workers", type=int, default=1, help="processes rendering the latent pool")
    parser.add_argument("--init-vae", type=Path, default=None, help="take the VAE of this shapes model folder")
    parser.add_argument(
        "--init-model", type=Path, default=None,
        help="fine-tune this shapes model folder: take its VAE, text encoder and UNet",
    )  # fmt: skip
    parser.add_argument("--unet-minutes", type=float, default=None, help="size the UNet phase to this budget")
    parser.add_argument(
        "--extend-unet",
        type=int,
        default=0,
        help="continue a finished run's UNet for N more steps (the cosine schedule is stretched to the new end)",
    )
    args = parser.parse_args(argv)

    # each flag needs the parts it takes: --init-vae only the VAE, --init-model all three
    for flag, folder, parts in (("--init-model", args.init_model, ("vae", "text_encoder", "unet")),
                                ("--init-vae", args.init_vae, ("vae",))):  # fmt: skip
        if folder is not None and not all((folder / part).is_dir() for part in parts):
            needed = ", ".join(f"{part}/" for part in parts)
            raise SystemExit(f"{flag}: {folder} is not a shapes model folder (with {needed})")
    if args.init_model is not None and args.init_vae is not None:
        raise SystemExit("--init-model already takes the model's VAE: leave out --init-vae")
    cfg = CONFIGS[args.config]()
    cfg.seed = args.seed
    trainer = Trainer(cfg, args.out, device=args.device, pool_workers=args.pool_workers,
                      unet_minutes=args.unet_minutes)
    ckpt = args.out / CHECKPOINT
    if args.extend_unet:
        if not ckpt.exists():
            raise SystemExit(f"--extend-unet needs a finished run's {ckpt}")
        trainer.load_checkpoint(ckpt, extend_unet=args.extend_unet)
        trainer.console.print(f"extending the UNet to {trainer.cfg.unet_steps} steps, from step {trainer.step}")
    elif args.resume and ckpt.exists():
        trainer.load_checkpoint(ckpt)
        trainer.console.print(f"resuming at phase {trainer.phase}, step {trainer.step}")
    elif ckpt.exists():
        raise SystemExit(f"{ckpt} exists: pass --resume to continue it, or choose another --out")
    elif args.init_model is not None:
        trainer.init_model_from(args.init_model)
        trainer.console.print(f"fine-tuning {args.init_model} (scaling_factor {trainer.scaling_factor:.4f})")
    elif args.init_vae is not None:
        trainer.init_vae_from(args.init_vae)
        trainer.console.print(f"VAE from {args.init_vae} (scaling_factor {trainer.scaling_factor:.4f})")
    trainer.run(stop_after=args.stop_after, threads=args.threads)


if __name__ == "__main__":
    main()
