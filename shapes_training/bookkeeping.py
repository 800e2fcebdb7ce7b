"""What both shapes trainers share: the bookkeeping of a run, apart from its models and losses.

`TrainingRun` holds a run's folder, device, step, time per phase and loss history, and does for
`Trainer` (train.py, the UNet model) and `FlowTrainer` (train_flow.py, the flow model) alike: atomic checkpoints
(a size limit where the checkpoint is committed), the pool of encoded images, noise drawn on the CPU, logging and
checkpointing every so many steps, and sizing a phase to a time budget from the speed of its first steps.
The two functions every phase draws on, `step_rng` and `warmup_cosine`, live here too.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from shapes_training.latents import LatentPool

# A phase sized to a time budget (--unet-minutes, --transformer-minutes) times its steps [CALIBRATION_START,
# CALIBRATION_START + CALIBRATION_STEPS), then sets its total with a margin (a 3-minute H200 run measured
# 61 ms/step over 30 early steps and averaged 79 ms).
CALIBRATION_START = 20
CALIBRATION_STEPS = 100
CALIBRATION_MARGIN = 0.85

CHECKPOINT = "checkpoint.pt"
LATENTS = "latents.pt"


def step_rng(seed: int, phase: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Independent numpy and torch generators for one step of one phase: a run resumed anywhere draws the same."""
    g = np.random.default_rng([seed, phase, step])
    return g, torch.Generator().manual_seed(int(g.integers(2**62)))


# Not diffusers' get_cosine_schedule_with_warmup: that one decays to 0 (here to min_ratio) and fixes `total` when
# built, while a time budget and --extend-* change it mid-run.
def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def progress_bar(console: Console) -> Progress:
    """The run's progress display: one bar per phase with steps done, time spent and time left."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    return Progress(*columns, console=console)


class TrainingRun:
    """A run's folder, device and progress, and the bookkeeping both trainers do the same way.

    A subclass builds its models after `__init__`, sets `seconds` (time per phase) and implements `state()`,
    what resuming needs. `max_checkpoint_bytes` refuses a checkpoint that would be too large to commit.
    """

    max_checkpoint_bytes: int | None = None

    def __init__(self, cfg: Any, out: Path, console: Console | None, device: str, pool_workers: int) -> None:
        self.cfg, self.out = cfg, out
        self.console = console or Console()
        self.device = torch.device(device)
        if self.device.type == "cuda":  # TF32 matmuls and convolutions: ample precision for these models
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.pool_workers = pool_workers
        self.step = 0
        self.seconds: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self._calibration_began = 0.0
        torch.manual_seed(cfg.seed)

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_checkpoint(self) -> None:
        """Write DIR/checkpoint.pt atomically (a temporary file, then a rename), within `max_checkpoint_bytes`."""
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save(self.state(), tmp)
        size = tmp.stat().st_size
        if self.max_checkpoint_bytes is not None and size > self.max_checkpoint_bytes:
            tmp.unlink()
            raise RuntimeError(f"checkpoint of {size} bytes: over the {self.max_checkpoint_bytes} allowed")
        tmp.replace(self.out / CHECKPOINT)

    def latent_pool(self, vae: AutoencoderKL) -> LatentPool:
        """The pool of images encoded by `vae`: loaded from DIR/latents.pt, or encoded (deterministically) and saved.

        Not part of the checkpoint (16,384 images take 134 MB): a session without it encodes it again.
        """
        path = self.out / LATENTS
        if path.exists():
            return LatentPool.load(path)
        t0 = time.time()
        pool = LatentPool.encode(vae, self.cfg.pool_size, seed=self.cfg.seed * 1000 + 3, workers=self.pool_workers)
        pool.save(path)
        self.seconds["pool"] += time.time() - t0
        return pool

    def _randn(self, shape: torch.Size | tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        """Standard normal noise drawn from a CPU generator (the same on every device), moved to the device."""
        return torch.randn(shape, generator=gen).to(self.device)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _tick(self, phase: str, t0: float, losses: list[Any], progress: Progress, label: str = "loss",
              **extra: float) -> float:  # fmt: skip
        """Account time, log every `log_every` steps and checkpoint every `checkpoint_every` steps."""
        now = time.time()
        self.seconds[phase] += now - t0
        if self.step % self.cfg.log_every == 0:
            mean_loss = float(np.mean([float(v) for v in losses[-self.cfg.log_every :]]))  # syncs once per line
            self.history.append({"phase": phase, "step": self.step, "loss": mean_loss,
                                 "seconds": self.seconds[phase], **extra})  # fmt: skip
            progress.console.print(f"{phase} step {self.step}: {label} {mean_loss:.4f}  "
                                   f"({self.seconds[phase] / 60:.1f} min in phase)")  # fmt: skip
        if self.step % self.cfg.checkpoint_every == 0:
            self.save_checkpoint()
        return time.time()

    def check_budget(self, minutes: float | None, steps_field: str) -> None:
        """Refuse to size a phase to a time budget once past its timed steps (it is sized from them)."""
        if minutes is not None and self.step > CALIBRATION_START:
            raise SystemExit(f"a time budget sizes a run from its first steps; this one is at step {self.step} "
                             f"({steps_field} = {getattr(self.cfg, steps_field)})")

    def calibrate(self, minutes: float | None, phase: str, steps_field: str, progress: Progress, task: Any) -> None:
        """Before each step of a phase with a time budget: time the calibration steps, then size the phase.

        Sets `cfg.<steps_field>` so that the phase's `minutes` are spent, at the speed just measured and with a
        margin, and never ends before the warm-up does; the count is recorded in the config (and checkpoint).
        """
        if minutes is None:
            return
        if self.step == CALIBRATION_START:
            self._synchronize()
            self._calibration_began = time.time()
        elif self.step == CALIBRATION_START + CALIBRATION_STEPS:
            self._synchronize()
            per_step = (time.time() - self._calibration_began) / CALIBRATION_STEPS
            remaining = minutes * 60 - self.seconds[phase]
            steps = max(self.cfg.warmup_steps + 1, self.step + int(CALIBRATION_MARGIN * remaining / per_step))
            setattr(self.cfg, steps_field, steps)
            progress.update(task, total=steps)
            progress.console.print(f"{phase}: {per_step * 1000:.1f} ms/step -> {steps_field} = {steps}")
