"""Training the shapes pipeline: the tiny config runs every phase, writes a loadable folder, and resumes."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from ddsedit.shapes.world import WORDS
from ddsedit.wordtokenizer import build_tokenizer, check_tokenizer
from shapes_training import bookkeeping, config, train
from shapes_training.models import build_text_encoder, build_unet, build_vae

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def run_tiny(out: Path, *extra: str) -> None:
    train.main(["--out", str(out), "--config", "tiny", "--threads", "1", *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("tiny")
    t0 = time.time()
    run_tiny(out)
    return out, time.time() - t0


def test_tiny_config_runs_all_phases_quickly(tiny_run):
    out, seconds = tiny_run
    assert seconds < 60
    info = json.loads((out / "final" / "train_info.json").read_text())
    assert info["history"][-1]["phase"] == "unet" and info["history"][0]["phase"] == "vae"
    assert torch.load(out / train.CHECKPOINT, weights_only=False)["phase"] == "done"


def test_folder_layout_and_metadata(tiny_run):
    final = tiny_run[0] / "final"
    for name in COMPONENTS:
        assert (final / name).is_dir()
    index = json.loads((final / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert json.loads((final / "ddsedit.json").read_text()) == {"size": 64}
    for weights in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors"):
        assert all(t.dtype == torch.float16 for t in load_file(final / weights).values() if t.is_floating_point())


def test_components_load_with_from_pretrained(tiny_run):
    final = tiny_run[0] / "final"
    vae = AutoencoderKL.from_pretrained(final, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(final, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(final, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(final, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(final, subfolder="scheduler")
    assert vae.config.scaling_factor != pytest.approx(0.18215) and vae.config.scaling_factor > 0
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_start == 0.00085 and scheduler.config.beta_end == 0.012
    assert scheduler.config.prediction_type == "epsilon"
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    ids = tokenizer(["a red circle on a white background"], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        context = text_encoder.float()(ids)[0]
        latents = vae.float().encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        eps = unet.float()(latents, 500, context).sample
    assert latents.shape == (1, 4, 16, 16) and eps.shape == latents.shape


def test_tokenizer_words_are_single_tokens_and_round_trip(tiny_run, tmp_path):
    for tok in (build_tokenizer(WORDS), CLIPTokenizer.from_pretrained(tiny_run[0] / "final" / "tokenizer")):
        check_tokenizer(tok, WORDS)
        assert tok.model_max_length == 77 and tok.pad_token == "<|endoftext|>"
        for word in WORDS:
            assert len(tok(word, add_special_tokens=False).input_ids) == 1
        padded = tok("a green triangle", padding="max_length", max_length=77).input_ids
        assert len(padded) == 77 and padded[5:] == [tok.eos_token_id] * 72
    tok = build_tokenizer(WORDS)
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a yellow square on a black background"
    assert again(text).input_ids == tok(text).input_ids and len(again) == len(tok)


def test_resume_continues_exactly(tiny_run, tmp_path):
    run_tiny(tmp_path, "--stop-after", "2")  # stops inside phase (a)
    ckpt = torch.load(tmp_path / train.CHECKPOINT, weights_only=False)
    assert (ckpt["phase"], ckpt["step"]) == ("vae", 2)
    assert not (tmp_path / "final").exists()
    with pytest.raises(SystemExit):
        run_tiny(tmp_path)  # a checkpoint exists: refuses to start over without --resume
    run_tiny(tmp_path, "--resume", "--stop-after", "3")  # stops inside phase (c)
    assert torch.load(tmp_path / train.CHECKPOINT, weights_only=False)["phase"] == "unet"
    run_tiny(tmp_path, "--resume")
    resumed = load_file(tmp_path / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    straight = load_file(tiny_run[0] / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=2e-3, rtol=0)


def test_default_config_fits_the_size_budget():
    cfg = config.default()
    tok = build_tokenizer(WORDS)
    vae = build_vae(cfg.vae)
    text = build_text_encoder(cfg.text, tok)
    unet = build_unet(cfg.unet, cfg.vae.latent_channels, cfg.text.hidden, 16)
    params = sum(p.numel() for m in (vae, text, unet) for p in m.parameters())
    assert params * 2 < 24e6, "fp16 weights of the default pipeline must stay under 25 MB"


def test_gpu_config_keeps_the_default_architecture():
    # the bundled model's VAE is reused by the GPU run (--init-vae), and the size budget holds
    assert (config.gpu().vae, config.gpu().text, config.gpu().unet) == (
        config.default().vae, config.default().text, config.default().unet,
    )  # fmt: skip


def test_init_vae_skips_phase_a_and_keeps_the_autoencoder(tiny_run, tmp_path):
    source = tiny_run[0] / "final"
    run_tiny(tmp_path, "--init-vae", str(source))
    info = json.loads((tmp_path / "final" / "train_info.json").read_text())
    assert info["config"]["init_vae"] == str(source) and info["config"]["vae_steps"] == 0
    assert {record["phase"] for record in info["history"]} == {"unet"}
    original = AutoencoderKL.from_pretrained(source, subfolder="vae")
    taken = AutoencoderKL.from_pretrained(tmp_path / "final", subfolder="vae")
    assert taken.config.scaling_factor == pytest.approx(original.config.scaling_factor)
    for (name, a), (_, b) in zip(original.state_dict().items(), taken.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_init_model_fine_tunes_the_text_encoder_and_unet_of_a_finished_model(tiny_run, tmp_path):
    source = tiny_run[0] / "final"
    # no step yet: the run starts from the source model's weights, trained copy and EMA alike
    run_tiny(tmp_path, "--init-model", str(source), "--stop-after", "0")
    state = torch.load(tmp_path / train.CHECKPOINT, weights_only=False)
    assert (state["phase"], state["step"]) == ("unet", 0) and state["config"]["init_model"] == str(source)
    source_unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32)
    source_text = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=torch.float32)
    unet = source_unet.state_dict()
    for trained, ema, original in (("unet", "unet_ema", source_unet), ("text_encoder", "text_ema", source_text)):
        for name, value in original.state_dict().items():
            torch.testing.assert_close(state[trained][name], value, msg=name)
        averaged = state[ema]["shadow_params"]  # diffusers' EMAModel: in the order of the model's parameters
        for (name, value), average in zip(original.named_parameters(), averaged, strict=True):
            torch.testing.assert_close(average, value, msg=name)
    # then it trains and exports: the UNet moved, the VAE is the source's
    run_tiny(tmp_path, "--init-model", str(source), "--resume")
    tuned = UNet2DConditionModel.from_pretrained(tmp_path / "final", subfolder="unet", torch_dtype=torch.float32)
    assert any(not torch.equal(value, unet[name]) for name, value in tuned.state_dict().items())
    original_vae = AutoencoderKL.from_pretrained(source, subfolder="vae").state_dict()
    for name, value in AutoencoderKL.from_pretrained(tmp_path / "final", subfolder="vae").state_dict().items():
        torch.testing.assert_close(value, original_vae[name], msg=name)


def test_init_model_or_vae_that_is_no_model_folder_is_a_one_line_error(tiny_run, tmp_path):
    for flag in ("--init-model", "--init-vae"):
        with pytest.raises(SystemExit, match=f"{flag}: .* is not a shapes model folder"):
            run_tiny(tmp_path / "out", flag, str(tmp_path / "missing"))
    assert not (tmp_path / "out").exists()
    # --init-vae takes only the autoencoder: a folder with vae/ alone is enough for it, not for --init-model
    vae_only = tmp_path / "vae-only"
    shutil.copytree(tiny_run[0] / "final" / "vae", vae_only / "vae")
    with pytest.raises(SystemExit, match=r"--init-model: .* \(with vae/, text_encoder/, unet/\)"):
        run_tiny(tmp_path / "out", "--init-model", str(vae_only))
    run_tiny(tmp_path / "out", "--init-vae", str(vae_only), "--stop-after", "0")
    assert torch.load(tmp_path / "out" / train.CHECKPOINT, weights_only=False)["config"]["init_vae"] == str(vae_only)


def test_a_checkpoint_written_before_emamodel_resumes(tiny_run, tmp_path):
    # Such a checkpoint held each EMA as the averaged module's state dict; a finished run's `step` is 0.
    state = torch.load(tiny_run[0] / train.CHECKPOINT, weights_only=False)
    trainer = train.Trainer(config.tiny(), tmp_path)
    for name, model in (("unet_ema", trainer.unet), ("text_ema", trainer.text_encoder)):
        names = [key for key, _ in model.named_parameters()]
        state[name] = dict(zip(names, state[name]["shadow_params"], strict=True))
    torch.save(state, tmp_path / train.CHECKPOINT)
    trainer.load_checkpoint(tmp_path / train.CHECKPOINT, extend_unet=2)
    again = torch.load(tiny_run[0] / train.CHECKPOINT, weights_only=False)
    for name in ("unet_ema", "text_ema"):
        ema = getattr(trainer, name)
        assert ema.optimization_step == again[name]["optimization_step"] == config.tiny().unet_steps
        for loaded, saved in zip(ema.shadow_params, again[name]["shadow_params"], strict=True):
            torch.testing.assert_close(loaded, saved)
    assert trainer.run() is True


def test_finetune_config_keeps_the_default_architecture():
    assert (config.finetune().vae, config.finetune().text, config.finetune().unet) == (
        config.default().vae, config.default().text, config.default().unet,
    )  # fmt: skip
    assert config.finetune().empty_caption_prob > config.default().empty_caption_prob


def test_unet_minutes_sets_the_step_count_from_measured_speed(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(bookkeeping, "CALIBRATION_START", 3)
    monkeypatch.setattr(bookkeeping, "CALIBRATION_STEPS", 10)
    cfg = config.tiny()
    cfg.unet_steps, cfg.warmup_steps = 10_000, 20
    trainer = train.Trainer(cfg, tmp_path, unet_minutes=0.01)  # 0.6 s: far fewer than 10,000 steps
    trainer.init_vae_from(tiny_run[0] / "final")
    assert trainer.run() is True
    # the budget is spent by calibration: the phase ends right after the warm-up, and says so in its config
    assert trainer.cfg.unet_steps == cfg.warmup_steps + 1
    info = json.loads((tmp_path / "final" / "train_info.json").read_text())
    assert info["config"]["unet_steps"] == trainer.cfg.unet_steps
    assert info["history"][-1]["step"] == trainer.cfg.unet_steps - 1  # logged every 2 steps


def test_latent_pool_is_the_same_whatever_the_number_of_workers(tiny_run):
    from shapes_training.latents import LatentPool

    vae = AutoencoderKL.from_pretrained(tiny_run[0] / "final", subfolder="vae", torch_dtype=torch.float32)
    one = LatentPool.encode(vae, 10, seed=5, batch=4, workers=1)
    two = LatentPool.encode(vae, 10, seed=5, batch=4, workers=2)
    other_seed = LatentPool.encode(vae, 10, seed=6, batch=4, workers=1)
    assert len(one) == 10 and one.labels.shape == (10, 3)
    torch.testing.assert_close(one.mean, two.mean)
    assert (one.labels == two.labels).all()
    assert not torch.equal(one.mean, other_seed.mean)


def test_a_run_started_from_another_vae_resumes(tiny_run, tmp_path):
    source = tiny_run[0] / "final"
    run_tiny(tmp_path, "--init-vae", str(source), "--stop-after", "2")
    assert torch.load(tmp_path / train.CHECKPOINT, weights_only=False)["phase"] == "unet"
    run_tiny(tmp_path, "--resume")  # no --init-vae: the run's recorded config and weights are taken
    info = json.loads((tmp_path / "final" / "train_info.json").read_text())
    assert info["config"]["init_vae"] == str(source) and info["config"]["vae_steps"] == 0
