"""SD3 and Flux.1 on the family seam: ddsedit encodes prompts, calls the transformer and spaces the sigmas exactly
as diffusers' StableDiffusion3Pipeline and FluxPipeline do (tiny random models built in code, CPU, fp32, compared
bit for bit), and loads their folders. The families are declared but not yet supported: their folders are still
refused by load_model, so these tests load them with the family given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

from ddsedit.conditioning import (
    Conditioning,
    call_flux_transformer,
    call_sd3_transformer,
    encode_flux_prompts,
    encode_sd3_prompts,
    flux_image_ids,
    flux_sigmas,
    pack_latents,
    sd3_sigmas,
    unpack_latents,
    vae_scaling,
)
from ddsedit.errors import DDSEditError, InputError
from ddsedit.families import FAMILIES, FLOW_FAMILIES, VELOCITY, family_of_pipeline
from ddsedit.loading import ModelComponents, load_flux_folder, load_model, load_sd3_folder

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PROMPT, NEGATIVE = "a red circle", "a green square"
CPU = torch.device("cpu")
GUIDANCE = 3.5


def _load(folder: Path, **options: Any) -> ModelComponents:
    components, _, _ = load_model(folder, device="cpu", dtype="fp32", **options)
    return components


def _sd3_pipeline(folder: Path) -> StableDiffusion3Pipeline:
    if (folder / "text_encoder_3").is_dir():
        return StableDiffusion3Pipeline.from_pretrained(folder)
    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)


@pytest.fixture(scope="module", params=["with-t5", "without-t5"])
def sd3(request, tiny_sd3_dir: Path, tiny_sd3_no_t5_dir: Path) -> tuple[StableDiffusion3Pipeline, ModelComponents]:
    folder = tiny_sd3_dir if request.param == "with-t5" else tiny_sd3_no_t5_dir
    return _sd3_pipeline(folder), _load(folder)


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flux(request, tiny_flux_dir: Path, tiny_flux_schnell_dir: Path) -> tuple[FluxPipeline, ModelComponents]:
    folder = tiny_flux_dir if request.param == "dev" else tiny_flux_schnell_dir
    return FluxPipeline.from_pretrained(folder), _load(folder)


class _Calls:
    """Records a module's keyword inputs and first output, as a forward pre-hook and hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handles = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after, with_kwargs=True),
        ]

    def _before(self, module, args, kwargs):
        self.calls.append({"kwargs": dict(kwargs)})

    def _after(self, module, args, kwargs, output):
        self.calls[-1]["output"] = output[0] if isinstance(output, tuple) else output.sample

    def __enter__(self) -> _Calls:
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self.handles:
            handle.remove()


def _equal(mine: torch.Tensor | None, theirs: torch.Tensor | None) -> bool:
    if mine is None or theirs is None:
        return mine is None and theirs is None
    return mine.dtype == theirs.dtype and mine.shape == theirs.shape and torch.equal(mine, theirs)


# ------------------------------------------------------------------ declarations


def test_the_flow_families_are_declared_and_read_from_their_folders(tiny_flux_dir: Path, tiny_sd3_dir: Path) -> None:
    for name in FLOW_FAMILIES:
        family = FAMILIES[name]
        assert family.prediction == VELOCITY and family.default_size == 1024 and family.latent_multiple == 2
        for role in ("encode_prompts", "call_denoiser", "load_folder", "latent_scaling", "flow_sigmas"):
            assert callable(family.function(role)), role
        assert family_of_pipeline(family.pipelines[0]) is family
    assert FAMILIES["sd3"].text_encoders == ("text_encoder", "text_encoder_2", "text_encoder_3")
    assert FAMILIES["sd3"].true_cfg and not FAMILIES["flux"].true_cfg
    assert _load(tiny_flux_dir).family.name == "flux" and _load(tiny_sd3_dir).family.name == "sd3"


# ------------------------------------------------------------------ SD3 conditioning, against the pipeline


@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_sd3_prompt_conditioning_equals_the_pipelines(sd3, negative: str | None) -> None:
    """CLIP-L and CLIP-G penultimate states padded to T5's width, then T5's (zeros without T5), and both pooled
    projections; a missing negative prompt is "" encoded, not zeros."""
    pipeline, components = sd3
    with torch.no_grad():  # as in the pipeline's __call__ (T5 with autograd on differs in the last bits)
        embeds, negative_embeds, pooled, negative_pooled = pipeline.encode_prompt(
            PROMPT, None, None, device=CPU, do_classifier_free_guidance=True, negative_prompt=negative
        )
    ours = encode_sd3_prompts(components, [negative or "", PROMPT], CPU)
    assert ours.hidden_states.shape == (2, 77 + 256, 64) and ours.extra["pooled_projections"].shape == (2, 64)
    assert _equal(ours.hidden_states[1:], embeds) and _equal(ours.extra["pooled_projections"][1:], pooled)
    assert _equal(ours.hidden_states[:1], negative_embeds)
    assert _equal(ours.extra["pooled_projections"][:1], negative_pooled)
    assert negative_embeds.abs().sum() > 0 and negative_pooled.abs().sum() > 0
    t5_part = ours.hidden_states[:, 77:]
    assert (components.text_encoder_3 is None) == (not t5_part.any())
    assert not ours.hidden_states[:, :77, 64:].any()  # the CLIPs' padding (64 features fill T5's 64: none here)


def test_sd3_transformer_calls_and_sigmas_equal_the_pipelines(sd3) -> None:
    """Both steps of a guided pipeline run (negative and prompt batched): ddsedit, given the same latents and the
    flow time its own schedule gives, calls the transformer with equal tensors and gets the same velocity."""
    pipeline, components = sd3
    with _Calls(pipeline.transformer) as recorded:
        pipeline(
            PROMPT, negative_prompt=NEGATIVE, height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
            output_type="latent", generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    sigmas = sd3_sigmas(components.scheduler_config, 2)
    assert _equal(sigmas, pipeline.scheduler.sigmas) and sigmas[-1] == 0
    conditioning = encode_sd3_prompts(components, [NEGATIVE, PROMPT], CPU)
    assert len(recorded.calls) == 2
    for step, call in enumerate(recorded.calls):
        theirs = call["kwargs"]
        latents = theirs["hidden_states"]
        with _Calls(components.unet) as ours:
            velocity = call_sd3_transformer(components.unet, latents, sigmas[step].repeat(2), conditioning)
        (mine,) = [c["kwargs"] for c in ours.calls]
        for key in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"):
            assert _equal(mine[key], theirs[key]), (step, key)
        assert _equal(velocity, call["output"])


# ------------------------------------------------------------------ Flux conditioning, against the pipeline


def test_flux_prompt_conditioning_equals_the_pipelines(flux) -> None:
    """T5's last hidden states and CLIP-L's pooled output, for a prompt, a negative and the empty prompt."""
    pipeline, components = flux
    prompts = [PROMPT, NEGATIVE, ""]
    ours = encode_flux_prompts(components, prompts, CPU)
    assert ours.hidden_states.shape == (3, 512, 32) and ours.extra["pooled_projections"].shape == (3, 32)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():  # as in the pipeline's __call__
            embeds, pooled, text_ids = pipeline.encode_prompt(prompt, device=CPU)
        assert _equal(ours.hidden_states[row : row + 1], embeds), prompt
        assert _equal(ours.extra["pooled_projections"][row : row + 1], pooled), prompt
        assert _equal(text_ids, torch.zeros(512, 3))


def test_flux_transformer_calls_and_sigmas_equal_the_pipelines(flux) -> None:
    """Both steps of a true-CFG pipeline run (prompt, then negative, one call each): ddsedit, given the unpacked
    latents and the flow time of its own schedule, calls the transformer with equal packed latents, timestep,
    guidance (dev) or none (schnell), text, pooled projection and ids, and unpacks the same velocity."""
    pipeline, components = flux
    with _Calls(pipeline.transformer) as recorded:
        pipeline(
            PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=2.0, height=32, width=32, num_inference_steps=2,
            guidance_scale=GUIDANCE, output_type="latent", generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    image_seq_len = (16 // 2) * (16 // 2)  # 32 px, VAE stride 2: 16x16 latents, 8x8 packed tokens
    sigmas = flux_sigmas(components.scheduler_config, 2, image_seq_len)
    assert _equal(sigmas, pipeline.scheduler.sigmas) and sigmas[-1] == 0
    conditioning = encode_flux_prompts(components, [PROMPT, NEGATIVE], CPU).with_extra(
        {"guidance": torch.tensor([GUIDANCE])}
    )
    stride = pipeline.vae_scale_factor
    assert len(recorded.calls) == 4
    for index, call in enumerate(recorded.calls):
        step, row = divmod(index, 2)
        theirs = call["kwargs"]
        latents = FluxPipeline._unpack_latents(theirs["hidden_states"], 32, 32, stride)
        assert latents.shape == (1, 4, 16, 16)
        with _Calls(components.unet) as ours:
            velocity = call_flux_transformer(components.unet, latents, sigmas[step : step + 1],
                                             conditioning.rows(row, row + 1))  # fmt: skip
        (mine,) = [c["kwargs"] for c in ours.calls]
        for key in ("hidden_states", "timestep", "guidance", "pooled_projections", "encoder_hidden_states",
                    "txt_ids", "img_ids"):  # fmt: skip
            assert _equal(mine[key], theirs[key]), (index, key)
        assert (theirs["guidance"] is None) == (not components.unet.config.guidance_embeds)
        assert _equal(velocity, FluxPipeline._unpack_latents(call["output"], 32, 32, stride))


class _Stub:
    """Stands in for a transformer's forward: records its inputs and returns zeros, so that a long schedule runs in
    no time (what is compared is only what the transformer is given)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        transformer.forward = self.forward

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
        self.calls.append({"hidden_states": hidden_states, **kwargs})
        return (torch.zeros_like(hidden_states),)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_timesteps_equal_the_pipelines_over_a_long_schedule(family: str, dtype: torch.dtype, tiny_sd3_no_t5_dir: Path,
                                                            tiny_flux_dir: Path) -> None:  # fmt: skip
    """28 steps at 64 px, in fp32 and bf16: each flow time of ddsedit's schedule becomes the pipeline's timestep
    (SD3: t * 1000 in fp32; Flux: t * 1000 cast to the model's dtype, / 1000, which is not always t), and Flux dev
    gets the pipeline's fp32 guidance."""
    if family == "sd3":
        pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_no_t5_dir, text_encoder_3=None, tokenizer_3=None,
                                                            torch_dtype=dtype)  # fmt: skip
        sigmas, call = sd3_sigmas(dict(pipeline.scheduler.config), 28), call_sd3_transformer
    else:
        pipeline = FluxPipeline.from_pretrained(tiny_flux_dir, torch_dtype=dtype)
        sigmas, call = flux_sigmas(dict(pipeline.scheduler.config), 28, 16 * 16), call_flux_transformer
    stub = _Stub(pipeline.transformer)
    pipeline(PROMPT, height=64, width=64, num_inference_steps=28, guidance_scale=GUIDANCE, output_type="latent")
    assert len(stub.calls) == 28
    theirs = stub.calls[:]
    for step, recorded in enumerate(theirs):
        latents = recorded["hidden_states"]
        if family == "flux":
            latents = unpack_latents(latents, 32, 32)
        conditioning = Conditioning(recorded["encoder_hidden_states"],
                                    {"pooled_projections": recorded["pooled_projections"]})  # fmt: skip
        conditioning = conditioning.with_extra({"guidance": torch.tensor([GUIDANCE])})
        call(pipeline.transformer, latents, sigmas[step : step + 1], conditioning)
        mine = stub.calls[-1]
        assert _equal(mine["timestep"], recorded["timestep"]), step
        assert _equal(mine.get("guidance"), recorded.get("guidance")), step
    timesteps = torch.cat([recorded["timestep"][:1].float() for recorded in theirs])
    expected_scale = 1000 if family == "sd3" else 1
    assert torch.allclose(timesteps, sigmas[:-1] * expected_scale, rtol=1e-2)
    if family == "flux" and dtype == torch.bfloat16:
        assert not torch.equal(timesteps, sigmas[:-1].to(dtype).float())  # the cast after * 1000 matters


def test_flux_dev_needs_a_guidance_value(tiny_flux_dir: Path) -> None:
    components = _load(tiny_flux_dir)
    conditioning = encode_flux_prompts(components, [PROMPT], CPU)
    with pytest.raises(DDSEditError, match="takes a guidance value"):
        call_flux_transformer(components.unet, torch.zeros(1, 4, 16, 16), torch.tensor([0.5]), conditioning)


def test_packing_is_the_pipelines_and_unpacking_inverts_it() -> None:
    latents = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert packed.shape == (2, 15, 16)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    for stride in (2, 8):
        assert torch.equal(unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 6 * stride,
                                                                                         10 * stride, stride))
    assert torch.equal(pack_latents(latents.transpose(2, 3).contiguous().transpose(2, 3)), packed)  # any strides
    assert torch.equal(flux_image_ids(6, 10, CPU, torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 5, CPU, torch.float32))  # fmt: skip
    with pytest.raises(DDSEditError, match="not even"):
        pack_latents(torch.zeros(1, 4, 5, 10))


# ------------------------------------------------------------------ sigma schedules, against the pipelines


class _Stop(Exception):
    pass


def _stop(module, args, kwargs):
    raise _Stop


def _pipeline_sigmas(pipeline, steps: int, size: int) -> torch.Tensor:
    """The sigmas the pipeline's scheduler was set to for ``steps`` steps at ``size`` px (stopped at the
    transformer's first call, before any step)."""
    handle = pipeline.transformer.register_forward_pre_hook(_stop, with_kwargs=True)
    try:
        with pytest.raises(_Stop):
            pipeline(PROMPT, height=size, width=size, num_inference_steps=steps, output_type="latent")
    finally:
        handle.remove()
    return pipeline.scheduler.sigmas


SD3_SCHEDULERS = {
    "sd3": {"shift": 3.0},
    "resolution-shifted": {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.16},
    "karras": {"shift": 3.0, "use_karras_sigmas": True},
}
FLUX_SCHEDULERS = {
    "dev": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "schnell": {"shift": 1.0},
    "terminal": {"use_dynamic_shifting": True, "shift_terminal": 0.02},
}  # fmt: skip


@pytest.mark.parametrize("scheduler", sorted(SD3_SCHEDULERS))
def test_sd3_sigmas_equal_the_pipelines_for_many_steps_and_sizes(tiny_sd3_no_t5_dir: Path, scheduler: str) -> None:
    pipeline = _sd3_pipeline(tiny_sd3_no_t5_dir)
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULERS[scheduler])
    config = dict(pipeline.scheduler.config)
    for steps in (1, 4, 28, 50):
        for size in (32, 64):
            ours = sd3_sigmas(config, steps, (size // 2 // 2) ** 2)
            assert _equal(ours, _pipeline_sigmas(pipeline, steps, size)), (steps, size)
            assert ours.shape == (steps + 1,) and bool((ours[:-1] > ours[1:]).all())


@pytest.mark.parametrize("scheduler", sorted(FLUX_SCHEDULERS))
def test_flux_sigmas_equal_the_pipelines_for_many_steps_and_sizes(tiny_flux_schnell_dir: Path, scheduler: str) -> None:
    pipeline = FluxPipeline.from_pretrained(tiny_flux_schnell_dir)
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[scheduler])
    config = dict(pipeline.scheduler.config)
    # One step stretched to a terminal sigma is 0/0 in diffusers (nan): left out.
    for steps in (4, 28, 50) if config["shift_terminal"] else (1, 4, 28, 50):
        for size in (32, 64):
            ours = flux_sigmas(config, steps, (size // 2 // 2) ** 2)
            assert _equal(ours, _pipeline_sigmas(pipeline, steps, size)), (steps, size)
            assert ours.shape == (steps + 1,) and bool((ours[:-1] > ours[1:]).all())


def test_the_two_pipelines_space_the_same_scheduler_differently() -> None:
    """Why each family names its own schedule: SD3 lets the scheduler space timesteps from its shifted bounds,
    Flux hands it evenly spaced sigmas."""
    config = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert not torch.equal(sd3_sigmas(config, 28), flux_sigmas(config, 28))
    with pytest.raises(DDSEditError, match="image_seq_len"):
        flux_sigmas(FLUX_SCHEDULERS["dev"], 4)


# ------------------------------------------------------------------ loading


def test_the_sd3_loader_loads_the_tiny_folders(tiny_sd3_dir: Path, tiny_sd3_no_t5_dir: Path) -> None:
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    parts = load_sd3_folder(tiny_sd3_dir, torch.float32)
    assert isinstance(parts["unet"], SD3Transformer2DModel) and "transformer" not in parts
    assert isinstance(parts["text_encoder_2"], CLIPTextModelWithProjection)
    assert isinstance(parts["text_encoder_3"], T5EncoderModel) and parts["tokenizer_3"].pad_token == "<pad>"
    assert isinstance(parts["scheduler"], FlowMatchEulerDiscreteScheduler) and parts["scheduler"].config.shift == 3.0
    without = load_sd3_folder(tiny_sd3_no_t5_dir, torch.float32)
    assert without["text_encoder_3"] is None and without["tokenizer_3"] is None


def test_the_flux_loader_loads_the_tiny_folders(tiny_flux_dir: Path, tiny_flux_schnell_dir: Path) -> None:
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    parts = load_flux_folder(tiny_flux_dir, torch.float32)
    assert isinstance(parts["unet"], FluxTransformer2DModel) and parts["unet"].config.guidance_embeds
    assert type(parts["text_encoder"]) is CLIPTextModel and isinstance(parts["text_encoder_2"], T5EncoderModel)
    assert parts["scheduler"].config.use_dynamic_shifting
    assert not load_flux_folder(tiny_flux_schnell_dir, torch.float32)["unet"].config.guidance_embeds


def test_load_model_loads_flow_folders_with_their_family(tiny_sd3_dir: Path, tiny_sd3_no_t5_dir: Path,
                                                          tiny_flux_dir: Path) -> None:  # fmt: skip
    """No DDPM schedule (alphas None), velocity prediction, SD3's absent T5 told from a freed one, the VAEs'
    shift and scale read as the pipelines decode with them (latents / scale + shift)."""
    sd3 = _load(tiny_sd3_dir)
    assert sd3.family.name == "sd3" and sd3.prediction_type == VELOCITY
    assert sd3.alphas_cumprod is None and sd3.betas is None and sd3.num_train_timesteps == 1000
    assert sd3.absent_text_encoders == () and sd3.text_encoders_loaded
    assert vae_scaling(sd3.vae.config) == (1.5305, 0.0609)
    sd3.free_text_encoders()
    assert sd3.text_encoder_3 is None and not sd3.text_encoders_loaded
    with pytest.raises(DDSEditError, match="freed"):
        encode_sd3_prompts(sd3, [PROMPT], CPU)

    without = _load(tiny_sd3_no_t5_dir)
    assert without.absent_text_encoders == ("text_encoder_3",) and without.text_encoders_loaded
    assert len(encode_sd3_prompts(without, [PROMPT], CPU)) == 1
    without.free_text_encoders()
    assert not without.text_encoders_loaded

    flux = _load(tiny_flux_dir)
    assert flux.family.name == "flux" and flux.unet.dtype == torch.float32 and not flux.unet.training
    assert vae_scaling(flux.vae.config) == (0.3611, 0.1159)
    assert isinstance(encode_flux_prompts(flux, [PROMPT], CPU), Conditioning)
    with pytest.raises(InputError, match="--prediction-type does not apply"):
        _load(tiny_flux_dir, prediction_type="epsilon")
