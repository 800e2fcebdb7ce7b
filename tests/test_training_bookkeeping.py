"""The bookkeeping both shapes trainers share (shapes_training/bookkeeping.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from rich.console import Console

from shapes_training import bookkeeping


class Recorder(bookkeeping.TrainingRun):
    """A run whose state is a tensor of a chosen size: enough to exercise the shared bookkeeping."""

    def __init__(self, out, payload_bytes: int, limit: int | None = None) -> None:
        cfg = SimpleNamespace(seed=0, log_every=2, checkpoint_every=3, warmup_steps=5, steps=100)
        super().__init__(cfg, out, Console(quiet=True), "cpu", 1)
        self.max_checkpoint_bytes = limit
        self.payload = torch.zeros(payload_bytes // 4)
        self.seconds = {"phase": 0.0}

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "payload": self.payload}


def test_step_rng_is_a_function_of_seed_phase_and_step():
    first = bookkeeping.step_rng(0, 1, 7)
    again = bookkeeping.step_rng(0, 1, 7)
    assert first[0].integers(1 << 30) == again[0].integers(1 << 30)
    assert torch.equal(torch.randn(4, generator=first[1]), torch.randn(4, generator=again[1]))
    draws = {float(torch.randn(1, generator=bookkeeping.step_rng(*key)[1])) for key in [(0, 1, 7), (0, 2, 7),
                                                                                         (0, 1, 8), (1, 1, 7)]}
    assert len(draws) == 4


def test_warmup_cosine_rises_linearly_then_falls_to_its_floor():
    warmup, total, floor = 10, 110, 0.05
    assert bookkeeping.warmup_cosine(0, warmup, total, floor) == pytest.approx(0.1)
    assert bookkeeping.warmup_cosine(9, warmup, total, floor) == pytest.approx(1.0)
    assert bookkeeping.warmup_cosine(10, warmup, total, floor) == pytest.approx(1.0)
    # halfway through the decay the cosine is at its middle: floor + (1 - floor) / 2
    assert bookkeeping.warmup_cosine(60, warmup, total, floor) == pytest.approx((1 + floor) / 2)
    assert bookkeeping.warmup_cosine(35, warmup, total, floor) == pytest.approx(
        floor + (1 - floor) * (1 + math.cos(math.pi / 4)) / 2)
    assert bookkeeping.warmup_cosine(110, warmup, total, floor) == pytest.approx(floor)
    assert bookkeeping.warmup_cosine(500, warmup, total, floor) == pytest.approx(floor)  # past the end: the floor


def test_a_checkpoint_over_the_limit_is_refused_and_the_last_one_kept(tmp_path):
    run = Recorder(tmp_path, payload_bytes=4_000, limit=20_000)
    run.save_checkpoint()
    kept = (tmp_path / bookkeeping.CHECKPOINT).read_bytes()
    run.payload, run.step = torch.zeros(10_000), 1  # 40 kB
    with pytest.raises(RuntimeError, match="over the 20000 allowed"):
        run.save_checkpoint()
    assert (tmp_path / bookkeeping.CHECKPOINT).read_bytes() == kept
    assert [p.name for p in tmp_path.iterdir()] == [bookkeeping.CHECKPOINT]  # no temporary file left


def test_tick_logs_and_checkpoints_on_their_own_steps(tmp_path):
    run = Recorder(tmp_path, payload_bytes=16)
    losses: list[Any] = []
    with bookkeeping.progress_bar(run.console) as progress:
        t0 = 0.0
        for step in range(1, 7):
            run.step = step
            losses.append(torch.tensor(float(step)))
            t0 = run._tick("phase", t0, losses, progress, extra_figure=1.5)
    assert [(r["step"], r["loss"], r["extra_figure"]) for r in run.history] == [(2, 1.5, 1.5), (4, 3.5, 1.5),
                                                                                (6, 5.5, 1.5)]
    assert torch.load(tmp_path / bookkeeping.CHECKPOINT)["step"] == 6  # checkpoints at 3 and 6


def test_a_time_budget_sizes_the_phase_from_its_first_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(bookkeeping, "CALIBRATION_START", 2)
    monkeypatch.setattr(bookkeeping, "CALIBRATION_STEPS", 4)
    clock = iter([100.0, 101.0])  # 4 steps take 1 s: 0.25 s a step
    monkeypatch.setattr(bookkeeping.time, "time", lambda: next(clock))
    run = Recorder(tmp_path, payload_bytes=16)
    run.seconds["phase"] = 10.0  # spent so far
    with bookkeeping.progress_bar(run.console) as progress:
        task = progress.add_task("phase", total=100)
        for step in range(8):
            run.step = step
            run.calibrate(1.0, "phase", "steps", progress, task)
    # 50 s left at 0.25 s a step, with the margin, after the 6 steps done
    assert run.cfg.steps == 6 + int(bookkeeping.CALIBRATION_MARGIN * 50 / 0.25)
    run.step = bookkeeping.CALIBRATION_START
    run.check_budget(1.0, "steps")  # not past the first timed step: allowed
    run.step = bookkeeping.CALIBRATION_START + 1
    with pytest.raises(SystemExit, match="sizes a run from its first steps"):
        run.check_budget(1.0, "steps")
    run.check_budget(None, "steps")  # no budget asked: nothing to refuse
