"""Training shapes-flow: the tiny config trains and exports a folder that diffusers' SD3 pipeline loads and samples
from, a stopped run resumes exactly, the training's conditioning is the pipeline's, and the default config fits
its budgets (checkpoint < 25 MB, exported weights < 20 MB)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ddsedit.loading import bundled_models
from shapes_training import bookkeeping, config, sanity, train_flow
from shapes_training.compact import BYTES_PER_PARAMETER
from shapes_training.export import sd3_model_index
from shapes_training.flow_text import build_text_encoders, world_captions
from shapes_training.folded_attention import fold_t5_tokens, unfold
from shapes_training.models import build_transformer

SHAPES = bundled_models()["shapes"]
WEIGHTS = {
    "transformer": "transformer/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}


def run_tiny(out: Path, *extra: str) -> None:
    train_flow.main(["--out", str(out), "--config", "tiny", "--threads", "1", *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("tiny-flow")
    t0 = time.time()
    run_tiny(out)
    return out, time.time() - t0


@pytest.fixture(scope="module")
def flow_pipe(tiny_run) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(
        tiny_run[0] / "final", text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in torch.load(out / train_flow.CHECKPOINT)["history"]]


def test_tiny_config_trains_every_step_and_exports_quickly(tiny_run):
    out, seconds = tiny_run
    assert seconds < 60
    ckpt = torch.load(out / train_flow.CHECKPOINT)
    assert ckpt["phase"] == "done" and ckpt["step"] == config.tiny_flow().transformer_steps
    assert [step for step, _ in losses(out)] == list(range(1, config.tiny_flow().transformer_steps + 1))
    info = json.loads((out / "final" / "train_info.json").read_text())
    assert info["config"] == config.tiny_flow().to_dict() and info["shift_factor"] == ckpt["shift_factor"]


def test_folder_layout_and_metadata(tiny_run):
    final = tiny_run[0] / "final"
    index = json.loads((final / "model_index.json").read_text())
    assert index == {**sd3_model_index(index["_diffusers_version"])}
    assert index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    assert sorted(p.name for p in final.iterdir() if p.is_dir()) == [
        "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae",
    ]  # fmt: skip
    assert json.loads((final / "ddsedit.json").read_text()) == {"size": 64}
    for path in WEIGHTS.values():
        assert all(t.dtype == torch.float16 for t in load_file(final / path).values() if t.is_floating_point())
    vae = AutoencoderKL.from_pretrained(final, subfolder="vae")
    source = AutoencoderKL.from_pretrained(SHAPES, subfolder="vae")
    assert vae.config.scaling_factor == source.config.scaling_factor
    assert vae.config.shift_factor == json.loads((final / "train_info.json").read_text())["shift_factor"] != 0
    for (name, a), (_, b) in zip(vae.state_dict().items(), source.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(final, subfolder="scheduler")
    assert scheduler.config.shift == 1.0 and scheduler.config.num_train_timesteps == 1000
    assert not scheduler.config.use_dynamic_shifting


def test_the_sd3_pipeline_loads_the_folder_offline_and_samples_a_64px_image(flow_pipe):
    assert flow_pipe.text_encoder_3 is None and flow_pipe.tokenizer_3 is None
    gen = torch.Generator().manual_seed(0)
    out = flow_pipe("a red circle on a white background", num_inference_steps=3, generator=gen, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()  # 64 px is the default size


def test_the_training_conditioning_is_the_pipelines(flow_pipe, tmp_path):
    trainer = train_flow.FlowTrainer(config.tiny_flow(), tmp_path)
    captions = ["", "a red circle", "a blue triangle on a black background", "a yellow square on a white background"]
    embeds, _, pooled, _ = flow_pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False)
    assert embeds.shape == (4, 77 + 256, 256)  # CLIP rows, then the pipeline's 256 zero rows for the absent T5
    ours, our_pooled = trainer.captions.lookup(captions, t5_tokens=256)
    torch.testing.assert_close(ours, embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_pooled, pooled, rtol=1e-5, atol=1e-6)
    assert set(trainer.captions.captions) == set(world_captions()) and len(world_captions()) == 37


def test_the_text_encoders_are_the_shapes_encoder_deep_and_shallow():
    source = CLIPTextModel.from_pretrained(SHAPES, subfolder="text_encoder", torch_dtype=torch.float32)
    torch.manual_seed(0)
    deep, shallow = build_text_encoders(source)
    assert (deep.config.num_hidden_layers, shallow.config.num_hidden_layers) == (3, 2)
    ids = torch.tensor([[0, 5, 9, 1, 1]])  # any tokens between BOS (0) and EOS (1)
    with torch.no_grad():
        src = source(ids, output_hidden_states=True)
        d, s = deep(ids, output_hidden_states=True), shallow(ids, output_hidden_states=True)
    # what the pipeline takes: the source's last layer (before its final norm), and its first layer
    torch.testing.assert_close(d.hidden_states[-2], src.hidden_states[-1])
    torch.testing.assert_close(s.hidden_states[-2], src.hidden_states[-2])
    # the identity layer leaves the pooled output (before projection) the source's
    torch.testing.assert_close(d.text_embeds, src.pooler_output @ deep.text_projection.weight.T)
    assert not torch.equal(deep.text_projection.weight, shallow.text_projection.weight)
    for model in (deep, shallow):
        assert all(torch.equal(t, t.half().float()) for t in model.state_dict().values() if t.is_floating_point())


def test_folded_t5_rows_compute_what_the_full_context_does():
    torch.manual_seed(0)
    transformer = build_transformer(config.TransformerConfig(layers=3, heads=2, head_dim=8), 4, 16, 32, 24).double()
    with torch.no_grad():
        for p in transformer.parameters():  # away from adaLN-Zero's identity start, so every path counts
            p.normal_(0, 0.3)
    x, clip, pooled = (torch.randn(shape, dtype=torch.float64) for shape in ((2, 4, 16, 16), (2, 77, 32), (2, 24)))
    t = torch.tensor([200.0, 800.0], dtype=torch.float64)

    def run(t5_rows: int) -> torch.Tensor:
        with torch.no_grad():
            context = torch.cat([clip, torch.zeros(2, t5_rows, 32, dtype=torch.float64)], dim=1)
            return transformer(x, context, pooled, t).sample

    full = run(256)
    fold_t5_tokens(transformer, 256)
    folded = run(1)
    fold_t5_tokens(transformer, 128)
    miscounted = run(1)
    unfold(transformer)
    # in float64 the fold is exact to rounding (in float32 it agrees to about 1e-6 of the outputs' scale)
    torch.testing.assert_close(folded, full, rtol=1e-9, atol=1e-9)
    assert (miscounted - full).abs().max() > 1e-2  # the count matters: a wrong fold would be seen
    torch.testing.assert_close(run(256), full, rtol=0, atol=0)  # diffusers' own processor is back


def test_resume_continues_exactly(tiny_run, tmp_path):
    run_tiny(tmp_path, "--stop-after", "1")  # ends at the first checkpoint step after 1 step: 2
    assert torch.load(tmp_path / train_flow.CHECKPOINT)["step"] == 2 and not (tmp_path / "final").exists()
    with pytest.raises(SystemExit, match="pass --resume"):
        run_tiny(tmp_path)
    with pytest.raises(SystemExit, match="another config"):
        run_tiny(tmp_path, "--resume", "--seed", "1")
    run_tiny(tmp_path, "--resume", "--stop-after", "1")
    assert torch.load(tmp_path / train_flow.CHECKPOINT)["step"] == 4
    run_tiny(tmp_path, "--resume")
    assert losses(tmp_path) == losses(tiny_run[0])  # the same loss at every step, to the bit
    for path in WEIGHTS.values():
        resumed, straight = load_file(tmp_path / "final" / path), load_file(tiny_run[0] / "final" / path)
        assert resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_a_run_does_not_resume_against_other_frozen_parts(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run[0] / train_flow.CHECKPOINT)
    ckpt["fingerprint"] = "0" * 64  # as if the source model's VAE or text encoder had changed since
    torch.save(ckpt, tmp_path / train_flow.CHECKPOINT)
    with pytest.raises(SystemExit, match="VAE or text encoder changed"):
        train_flow.FlowTrainer(config.tiny_flow(), tmp_path).load_checkpoint(tmp_path / train_flow.CHECKPOINT)


def test_the_checkpoint_holds_halves_and_fits(tiny_run):
    path = tiny_run[0] / train_flow.CHECKPOINT
    ckpt = torch.load(path)
    assert {t.dtype for t in ckpt["transformer"].values()} == {torch.float16}
    assert {t.dtype for t in ckpt["ema"]["shadow_params"]} == {torch.float16}
    moments = [v for entry in ckpt["optimizer"]["state"].values() for k, v in entry.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.bfloat16}
    assert path.stat().st_size < train_flow.MAX_CHECKPOINT_BYTES
    assert "vae" not in ckpt and "text_encoder" not in ckpt  # frozen: rebuilt from the source, checked by fingerprint


def test_the_default_configs_checkpoint_is_under_25_mb(tmp_path):
    trainer = train_flow.FlowTrainer(config.default_flow(), tmp_path)
    trainer.shift_factor = 0.0
    gen = torch.Generator().manual_seed(0)
    loss = trainer.flow_loss(torch.randn(2, 4, 16, 16), ["a red circle", ""], gen)
    loss.backward()
    trainer.optimizer.step()  # the optimizer's moments exist from the first step on
    trainer.ema.step(trainer.transformer.parameters())
    trainer.save_checkpoint()
    size = (tmp_path / train_flow.CHECKPOINT).stat().st_size
    params = sum(p.numel() for p in trainer.transformer.parameters())
    assert params * BYTES_PER_PARAMETER < size < train_flow.MAX_CHECKPOINT_BYTES
    assert size < params * BYTES_PER_PARAMETER + 500e3  # nothing else of weight in it (the rest: 0.2 MB of zip)


def exported_bytes(cfg: config.FlowTrainConfig) -> int:
    """fp16 bytes of every tensor the export writes, counted on the meta device (nothing allocated)."""
    source = CLIPTextModel.config_class.from_pretrained(SHAPES / "text_encoder")
    vae_config = AutoencoderKL.load_config(SHAPES / "vae")
    with torch.device("meta"):
        deep_config, shallow_config = source.__class__(**source.to_dict()), source.__class__(**source.to_dict())
        deep_config.num_hidden_layers += 1
        encoders = [CLIPTextModelWithProjection(c) for c in (deep_config, shallow_config)]
        joint = sum(c.hidden_size for c in (deep_config, shallow_config))
        pooled = sum(c.projection_dim for c in (deep_config, shallow_config))
        transformer = build_transformer(cfg.transformer, 4, 16, joint, pooled)
        vae = AutoencoderKL.from_config(vae_config)
    return sum(t.numel() * 2 for m in (*encoders, transformer, vae) for t in m.state_dict().values())


def test_the_default_configs_weights_are_under_20_mb(tiny_run):
    # the count is right: it matches what the tiny run wrote
    tiny = sum(t.numel() * 2 for path in WEIGHTS.values() for t in load_file(tiny_run[0] / "final" / path).values())
    assert exported_bytes(config.tiny_flow()) == tiny
    assert exported_bytes(config.default_flow()) < 20e6 - 100e3  # room for the configs and tokenizers


def test_transformer_minutes_sets_the_step_count_from_measured_speed(tmp_path, monkeypatch):
    monkeypatch.setattr(bookkeeping, "CALIBRATION_START", 1)
    monkeypatch.setattr(bookkeeping, "CALIBRATION_STEPS", 2)
    cfg = config.tiny_flow()
    cfg.transformer_steps, cfg.warmup_steps = 10_000, 4
    trainer = train_flow.FlowTrainer(cfg, tmp_path, transformer_minutes=0.001)  # 0.06 s: spent by calibration
    assert trainer.run() is True
    assert trainer.cfg.transformer_steps == cfg.warmup_steps + 1
    info = json.loads((tmp_path / "final" / "train_info.json").read_text())
    assert info["config"]["transformer_steps"] == cfg.warmup_steps + 1
    # a resumed run keeps the recorded count, and refuses to be sized again past its first steps
    again = config.tiny_flow()
    again.warmup_steps = cfg.warmup_steps
    resumed = train_flow.FlowTrainer(again, tmp_path, transformer_minutes=5)
    resumed.load_checkpoint(tmp_path / train_flow.CHECKPOINT)
    assert resumed.cfg.transformer_steps == cfg.warmup_steps + 1
    with pytest.raises(SystemExit, match="sizes a run from its first steps"):
        resumed.run()


def test_export_now_writes_the_checkpoints_ema_midway(tmp_path):
    run_tiny(tmp_path, "--stop-after", "2")
    before = (tmp_path / train_flow.CHECKPOINT).read_bytes()
    run_tiny(tmp_path, "--export-now")
    assert (tmp_path / train_flow.CHECKPOINT).read_bytes() == before  # the run itself is untouched
    ema = torch.load(tmp_path / train_flow.CHECKPOINT)["ema"]["shadow_params"]
    exported = load_file(tmp_path / "final" / WEIGHTS["transformer"])
    names = [name for name, _ in build_transformer(config.tiny_flow().transformer, 4, 16, 256, 256).named_parameters()]
    assert all(torch.equal(exported[name], average) for name, average in zip(names, ema, strict=True))


def test_extend_transformer_trains_a_finished_run_further(tiny_run, tmp_path):
    for name in (train_flow.CHECKPOINT, bookkeeping.LATENTS):
        (tmp_path / name).write_bytes((tiny_run[0] / name).read_bytes())
    with pytest.raises(SystemExit, match="pass --resume"):
        run_tiny(tmp_path)
    run_tiny(tmp_path, "--extend-transformer", "2")
    steps = config.tiny_flow().transformer_steps
    assert [step for step, _ in losses(tmp_path)] == list(range(1, steps + 3))
    assert losses(tmp_path)[:steps] == losses(tiny_run[0])
    info = json.loads((tmp_path / "final" / "train_info.json").read_text())
    assert info["config"]["transformer_steps"] == steps + 2
    run_tiny(tmp_path, "--stop-after", "0", "--resume")  # the extended count is the run's from now on
    assert torch.load(tmp_path / train_flow.CHECKPOINT)["config"]["transformer_steps"] == steps + 2


def test_sanity_runs_the_sd3_pipeline_and_scores_its_samples(tiny_run):
    pipe = sanity.load_pipeline(tiny_run[0] / "final")
    assert isinstance(pipe, sanity.FlowPipeline)
    report, images, captions = sanity.generation_report(pipe, n=2, steps=2, batch=2)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8 and len(captions) == 2
    assert set(report) >= {"colour_right", "shape_right"} and all(0 <= report[k] <= 1 for k in report if "right" in k)
    # the same VAE round trip as the UNet model's: the shift_factor is taken off and put back
    flow_vae, unet_vae = sanity.vae_report(pipe, n=8), sanity.vae_report(sanity.load_pipeline(SHAPES), n=8)
    assert flow_vae == pytest.approx(unet_vae, rel=1e-4, abs=1e-4)
