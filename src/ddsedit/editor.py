"""The Python API: load a model once, then edit images with any registered method (SDS, DDS, masked DDS, CDS, PDS,
IDS on SD and SDXL; SDS, DDS as DVRF, masked DDS and FlowEdit on SD3 and Flux).

    from ddsedit import Editor
    editor = Editor.from_pretrained("shapes")
    edited = editor.dds("cat.png", ref="a photo of a cat", query="a photo of a dog")
    edited.save("dog.png")

An edit reads like a diffusers pipeline: :meth:`Editor.encode_prompt`, :meth:`Editor.prepare_latents`,
:meth:`Editor.prepare_mask`, :meth:`Editor.distill` (the loop of :mod:`ddsedit.optimize`), :meth:`Editor.decode`.
Requests are checked and loaded by :mod:`ddsedit.requests`; what the output records is :mod:`ddsedit.metadata`'s.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ddsedit import __version__, automask, imageio, metadata
from ddsedit.automask import AutoMaskSettings
from ddsedit.checks import check_prompts
from ddsedit.conditioning import Conditioning
from ddsedit.errors import InputError
from ddsedit.families import VELOCITY, Family
from ddsedit.flowgradients import FlowSchedule, flow_schedule
from ddsedit.gradients import GradientInputs, PromptEmbeddings
from ddsedit.loading import ModelComponents, load_model, resolve_device
from ddsedit.metadata import edit_parameters, webui_parameters
from ddsedit.methods import Method, get_method
from ddsedit.optimize import LoopSettings
from ddsedit.optimize import distill as distill_loop
from ddsedit.requests import EditRequest, ImageLike, PreparedRequest, load_rgb, prepare_request
from ddsedit.settings import EditConfig, apply_settings, declared, resolve_config

__all__ = ["EditConfig", "EditRequest", "EditResult", "Editor", "edit_parameters", "save_result", "webui_parameters"]

MaskLike = ImageLike | AutoMaskSettings  # a mask image or path, "auto", or how to draw it
ProgressCallback = Callable[[int, int], None]
FrameCallback = Callable[[int, list[Image.Image]], None]  # (step, each image's decoded frame), as frames are kept


@dataclass
class EditResult:
    """An edited image with everything needed to reproduce it."""

    image: Image.Image
    parameters: dict[str, Any]
    frames: list[tuple[int, Image.Image]] = field(default_factory=list)  # (step, decoded image)
    nonfinite_steps: int = 0  # steps whose gradient had NaN or inf elements (treated as 0)
    mask: Image.Image | None = None  # the binary mask the edit used (white = editable), at the source's size

    def metadata(self) -> dict[str, str]:
        """Text for the output file (see :func:`ddsedit.metadata.file_text`)."""
        return metadata.file_text(self.parameters, self.image.size)


class Editor:
    """A loaded model that edits images. Create it with :meth:`from_pretrained`."""

    def __init__(self, components: ModelComponents, device: torch.device, dtype: torch.dtype,
                 keep_text_encoder: bool = True, cuda_graph: bool = False) -> None:  # fmt: skip
        self.components = components
        self.device = device
        self.dtype = dtype
        self.keep_text_encoder = keep_text_encoder
        self.cuda_graph = cuda_graph
        self._prompt_cache: dict[str, Conditioning] = {}

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        device: str = "auto",
        dtype: str = "auto",
        allow_pickle: bool = False,
        prediction_type: str | None = None,
        keep_text_encoder: bool = True,
        cpu_offload: bool = False,
        compile_unet: bool = False,
        cuda_graph: bool = False,
        vae: str | os.PathLike | None = None,
    ) -> Editor:
        """Load ``model`` (bundled name, diffusers folder, .safetensors file or hub id).

        ``device``: auto|cpu|cuda|cuda:N|mps; ``dtype``: auto|fp16|bf16|fp32 (auto: fp16 on
        an accelerator, fp32 on CPU). With ``keep_text_encoder=False`` the text encoder is
        freed after the first prompts are encoded, saving memory for a one-shot edit.
        ``cpu_offload`` keeps the weights in CPU memory and moves each module to the device
        only while it runs (accelerate), for small GPUs; ``compile_unet`` wraps the UNet in
        ``torch.compile`` (the first steps then pay the compile time); ``cuda_graph`` records
        one optimisation step as a CUDA graph and replays it (CUDA only; not with
        ``cpu_offload`` or ``compile_unet``; only methods declared graphable). ``vae`` (a folder, a
        single file or a hub id) replaces the model's VAE, e.g. SDXL's fp16-fix VAE.
        """
        if cuda_graph:
            if cpu_offload or compile_unet:
                raise InputError("--cuda-graph cannot be combined with --cpu-offload or --compile")
            if resolve_device(device).type != "cuda":
                raise InputError("--cuda-graph needs a CUDA device")
        components, torch_device, torch_dtype = load_model(
            model, device=device, dtype=dtype, allow_pickle=allow_pickle, prediction_type=prediction_type,
            cpu_offload=cpu_offload, vae=vae,
        )  # fmt: skip
        if compile_unet:
            components.unet = torch.compile(components.unet)
        return cls(components, torch_device, torch_dtype, keep_text_encoder=keep_text_encoder, cuda_graph=cuda_graph)

    @property
    def family(self) -> Family:
        return self.components.family

    @property
    def latent_stride(self) -> int:
        """Pixels per latent cell times the cells the denoiser's patches take: what working sizes are multiples of."""
        return self.components.vae_scale_factor * self.family.latent_multiple

    # ------------------------------------------------------------------ settings

    def config(self, method: str = "dds", **overrides: Any) -> EditConfig:
        """Settings for ``method`` on this model: the paper's defaults, the method's, the model's
        ``ddsedit.json`` (see :func:`ddsedit.settings.resolve_config`), then ``overrides``."""
        return resolve_config(get_method(method), self.components.defaults, overrides,
                              self.components.defaults_source, self.family)  # fmt: skip

    def _config_for(self, method: Method, config: EditConfig | None) -> EditConfig:
        """``config`` for ``method``: the model's defaults for the method's options when ``config`` holds another's."""
        if config is None:
            return self.config(method.name)
        if type(config.options) is not method.options:
            resolved = self.config(method.name)
            shared = {item.name for item in declared(EditConfig)}
            return apply_settings(resolved, {k: v for k, v in config.settings().items() if k in shared})
        return config

    # ------------------------------------------------------------------ the pipeline's parts

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """The family's conditioning of each prompt, one row each (cached: the text encoder may be freed)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            encoded = self.family.function("encode_prompts")(self.components, missing, self.device)
            for index, prompt in enumerate(missing):
                self._prompt_cache[prompt] = encoded.rows(index, index + 1)
        if not self.keep_text_encoder and self.components.text_encoders_loaded:
            self.components.free_text_encoders()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return Conditioning.cat([self._prompt_cache[p] for p in prompts]).to(self.dtype)

    def image_conditioning(self, sizes: list[tuple[tuple[int, int], tuple[int, int]]]) -> dict[str, torch.Tensor]:
        """What the family conditions on besides the prompt, one row per image of ``(source size, working size)``
        (SDXL: the size ids); {} for families with none."""
        if self.family.image_conditioning is None:
            return {}
        build = self.family.function("image_conditioning")
        rows = [build(self.components, source, working, self.dtype) for source, working in sizes]
        return {key: torch.cat([row[key] for row in rows]).to(self.device) for key in rows[0]}

    def cached_prompt_count(self) -> int:
        """How many prompts' conditionings are cached."""
        return len(self._prompt_cache)

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt conditionings (a long batch would grow the cache without bound).

        Only possible while the text encoder is kept: otherwise the prompts could not be encoded again.
        """
        if self.components.text_encoders_loaded:
            self._prompt_cache.clear()

    def _run_vae(self, function: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """Run a VAE function; if half precision overflows (SD 2.x/SDXL VAEs), rerun it in fp32."""
        vae = self.components.vae
        with torch.no_grad():
            outputs = function(inputs.to(vae.dtype)).float()
            if not torch.isfinite(outputs).all() and vae.dtype != torch.float32:
                vae.to(torch.float32)
                outputs = function(inputs.float()).float()
        return outputs

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [K, 3, h, w] in [-1, 1] -> scaled latents (the posterior's mean, not a sample)."""
        vae = self.components.vae
        scale, shift = self.family.function("latent_scaling")(vae.config)
        latents = self._run_vae(lambda x: vae.encode(x).latent_dist.mean, pixels.to(self.device))
        return (latents - shift) * scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels [K, 3, h, w] in [-1, 1] (fp32, on the CPU)."""
        vae = self.components.vae
        scale, shift = self.family.function("latent_scaling")(vae.config)
        return self._run_vae(lambda z: vae.decode(z, return_dict=False)[0], latents / scale + shift).clamp(-1, 1).cpu()

    def prepare_latents(self, prepared: list[PreparedRequest]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sources' latents, and the starts' where some request starts elsewhere (else None)."""
        working = prepared[0].working_size
        source_latents = self.encode_image(
            torch.cat([imageio.image_to_tensor(item.source, working) for item in prepared])
        )
        if all(item.start is None for item in prepared):
            return source_latents, None
        starts = [item.source if item.start is None else item.start for item in prepared]
        return source_latents, self.encode_image(torch.cat([imageio.image_to_tensor(s, working) for s in starts]))

    def prepare_mask(self, prepared: list[PreparedRequest], negative: str,
                     latent_size: tuple[int, int]) -> torch.Tensor | None:  # fmt: skip
        """Draw the automatic masks, then the latent mask [K, 1, h, w] (ones for requests without a mask), or None."""
        for item in prepared:
            if item.auto_mask is not None and item.mask is None:
                item.mask = self._draw_auto_mask(item.source, item.ref, item.query, item.auto_mask,
                                                 item.working_size, negative)  # fmt: skip
        if all(item.mask is None for item in prepared):
            return None
        width, height = latent_size
        return torch.cat([
            torch.ones(1, 1, height, width) if item.mask is None else imageio.mask_to_latent(item.mask, latent_size)
            for item in prepared
        ]).to(self.device)  # fmt: skip

    @property
    def is_flow(self) -> bool:
        """Whether the model is a rectified-flow one (SD3, Flux), whose methods walk its sigma schedule."""
        return self.family.prediction == VELOCITY

    def flow_schedule(self, config: EditConfig, latent_size: tuple[int, int]) -> FlowSchedule:
        """A rectified-flow model's schedule for an edit: the pipeline's sigmas for ``config.steps`` steps at latents
        of ``latent_size`` (w, h; the shift may depend on it), with DVRF's step sizes times ``config.lr``."""
        width, height = latent_size
        sigmas = self.family.function("flow_sigmas")(self.components.scheduler_config, config.steps,
                                                     (height // 2) * (width // 2))  # fmt: skip
        return flow_schedule(sigmas, config.lr)

    def distill(
        self, method: Method, config: EditConfig, source_latents: torch.Tensor, embeddings: PromptEmbeddings,
        seeds: list[int], mask: torch.Tensor | None = None, initial_latents: torch.Tensor | None = None,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, int]:  # fmt: skip
        """The optimisation (:func:`ddsedit.optimize.distill`), or on a rectified-flow model the method's sampler
        when it declares one (FlowEdit): the final latents and the steps that had non-finite gradient elements."""
        nonfinite: list[int] = []
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        settings = LoopSettings(method.name, config.steps, config.guidance, config.lr, config.t_min, config.t_max,
                                config.options)  # fmt: skip
        call = self.family.function("call_denoiser")
        schedule = None
        if self.is_flow:
            schedule = self.flow_schedule(config, (source_latents.shape[-1], source_latents.shape[-2]))
            sampler = method.sampler_function()
            if sampler is not None:
                if initial_latents is not None:
                    raise InputError(f"{method.name} starts from the source: --start does not apply")
                if mask is not None and getattr(config.options, "n_min", 0):
                    raise InputError("--n-min samples the last steps from the query alone, which would change the "
                                     "image outside --mask: use --n-min 0 with a mask")  # fmt: skip
                inputs = GradientInputs(
                    self.components.unet, source_latents.float(), embeddings, None, self.components.prediction_type,
                    config.guidance, config.options, generators, call, true_cfg=self.family.true_cfg,
                )  # fmt: skip
                with torch.no_grad():
                    return sampler(inputs, schedule, generators, mask, on_step), 0
        latents = distill_loop(
            self.components.unet, source_latents, embeddings, self.components.alphas_cumprod,
            self.components.prediction_type, settings, generators, mask=mask, on_step=on_step,
            cuda_graph=self.cuda_graph, initial_latents=initial_latents, on_nonfinite=nonfinite.append,
            scheduler_config=self.components.scheduler_config, call=call, betas=self.components.betas,
            flow_schedule=schedule, true_cfg=self.family.true_cfg,
        )  # fmt: skip
        return latents, sum(nonfinite)

    # ------------------------------------------------------------------ editing

    def edit(
        self,
        image: ImageLike,
        method: str,
        query: str,
        ref: str | None = None,
        mask: ImageLike | AutoMaskSettings | None = None,
        config: EditConfig | None = None,
        on_progress: ProgressCallback | None = None,
        start: ImageLike | None = None,
        on_frame: FrameCallback | None = None,
    ) -> EditResult:
        """Edit one image and return the result with its parameters (and frames if asked).

        ``method`` is a registered method (``sds``, ``dds``, ``masked-dds``, ``cds``, ``pds``, ``ids``); ``ref``
        describes the source image (needed by all but sds), ``query`` the wanted result; ``mask``
        (white = editable) is needed by ``masked-dds`` and optional for cds, pds and ids: an image,
        a path, or ``"auto"`` (or an :class:`~ddsedit.automask.AutoMaskSettings`) to draw it from the
        prompts with the edit's seed. ``on_progress(step, steps)`` is called after each step.
        ``start`` (same size as ``image``) starts the optimisation from another image, e.g. an
        earlier result to continue, while ``image`` stays the source DDS compares against. ``on_frame(step,
        frames)`` is called with each frame as it is decoded (``config.save_every``), e.g. to show the edit forming.
        """
        request = EditRequest(image=image, query=query, ref=ref, mask=mask, start=start)
        return self.edit_batch([request], method, config=config, on_progress=on_progress, on_frame=on_frame)[0]

    def edit_batch(
        self,
        requests: list[EditRequest],
        method: str,
        config: EditConfig | None = None,
        on_progress: ProgressCallback | None = None,
        on_frame: FrameCallback | None = None,
    ) -> list[EditResult]:
        """Edit K images at once, sharing each step's denoiser call (a batch of 4K for DDS).

        The images must have the same working size. Each image draws its timesteps and
        noise from its own generator (its request's seed, else ``config.seed``), so an image
        edited in a batch gets the same result as when edited alone, up to float rounding.
        """
        declaration = get_method(method)
        if self.family.name not in declaration.families:
            raise InputError(f"{method} does not support {self.family.label} models")
        if self.cuda_graph and (not declaration.graphable or self.is_flow):
            raise InputError(f"--cuda-graph: a CUDA graph cannot record {method}'s step on {self.family.label} models")
        if not requests:
            return []
        config = self._config_for(declaration, config)
        config.validate(self.components.num_train_timesteps)
        problem = declaration.problem(config, self.components.num_train_timesteps)
        if problem:
            raise InputError(problem)
        stride = self.latent_stride
        prepared = [prepare_request(request, declaration, config, stride) for request in requests]
        working = prepared[0].working_size
        if any(item.working_size != working for item in prepared):
            sizes = sorted({f"{w}x{h}" for w, h in (item.working_size for item in prepared)})
            raise InputError(f"images in one batch need the same working size, got {', '.join(sizes)}")

        count = len(prepared)
        prompts = self.encode_prompt(
            [config.negative] + [item.ref for item in prepared] + [item.query for item in prepared]
        )
        per_image = self.image_conditioning([(item.source.size, item.working_size) for item in prepared])
        embeddings = PromptEmbeddings(
            unconditional=prompts.rows(0, 1).expand(count).with_extra(per_image),
            source=prompts.rows(1, 1 + count).with_extra(per_image),
            target=prompts.rows(1 + count, 1 + 2 * count).with_extra(per_image),
        )  # fmt: skip
        source_latents, initial_latents = self.prepare_latents(prepared)
        latent_mask = self.prepare_mask(prepared, config.negative, (source_latents.shape[-1], source_latents.shape[-2]))

        frames: list[list[tuple[int, Image.Image]]] = [[] for _ in prepared]
        if config.save_every:
            for item, item_frames in zip(prepared, frames, strict=True):
                item_frames.append((0, item.source.resize(working, Image.Resampling.LANCZOS)))

        total = self.steps_run(declaration, config)

        def on_step(step: int, latents: torch.Tensor) -> None:
            if config.save_every and (step % config.save_every == 0 or step == total):
                decoded = self.decode(latents)
                for index, item_frames in enumerate(frames):
                    item_frames.append((step, imageio.tensor_to_image(decoded[index])))
                if on_frame is not None:
                    on_frame(step, [item_frames[-1][1] for item_frames in frames])
            if on_progress is not None:
                on_progress(step, total)

        latents, nonfinite_steps = self.distill(
            declaration, config, source_latents, embeddings, [item.seed for item in prepared], mask=latent_mask,
            initial_latents=initial_latents, on_step=on_step,
        )  # fmt: skip
        if nonfinite_steps:
            warnings.warn(
                f"the model returned NaN or infinite values in {nonfinite_steps} of {config.steps} steps; "
                "those gradient elements were treated as 0",
                RuntimeWarning,
                stacklevel=2,
            )
        decoded = self.decode(latents)
        results = [
            self._finish(item, imageio.tensor_to_image(decoded[index]), method, config, frames[index])
            for index, item in enumerate(prepared)
        ]
        for result in results:
            result.nonfinite_steps = nonfinite_steps
        return results

    def steps_run(self, method: Method, config: EditConfig) -> int:
        """The steps an edit with ``config`` runs: ``config.steps``, or fewer for a sampler that skips some
        (FlowEdit runs the last ``n_max``)."""
        active = getattr(config.options, "active_steps", None)
        return active() if active is not None and self.is_flow and method.sampler is not None else config.steps

    def _finish(
        self, item: PreparedRequest, edited: Image.Image, method: str, config: EditConfig,
        frames: list[tuple[int, Image.Image]],
    ) -> EditResult:  # fmt: skip
        """Resize back (unless the working size is kept), paste the source outside the mask, record the parameters."""
        if not config.keep_working_size and edited.size != item.source.size:
            edited = edited.resize(item.source.size, Image.Resampling.LANCZOS)
        if item.mask is not None and config.paste_back:
            # At the output's size: the working size when it is kept, else the source's.
            source = item.source
            if source.size != edited.size:
                source = source.resize(edited.size, Image.Resampling.LANCZOS)
            edited = imageio.paste_back(edited, source, item.mask, config.feather)
        parameters = {
            **edit_parameters(method, item.ref, item.query, item.seed, config, masked=item.mask is not None,
                              auto_mask=item.auto_mask, prediction=self.family.prediction),
            "working_size": f"{item.working_size[0]}x{item.working_size[1]}",
            "model": self.components.identity or self.components.source,
            "model_family": self.family.name,
            "prediction_type": self.components.prediction_type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "ddsedit_version": __version__,
        }
        if self.components.vae_identity is not None:
            parameters["vae"] = self.components.vae_identity
        if item.start_label is not None:
            parameters["start"] = item.start_label
        if item.source_sha256 is not None:
            parameters["source_sha256"] = item.source_sha256
        if item.mask_sha256 is not None:
            parameters["mask_sha256"] = item.mask_sha256
        edited.info.update({key: str(value) for key, value in parameters.items()})
        return EditResult(image=edited, parameters=parameters, frames=frames, mask=item.mask)

    # ------------------------------------------------------------------ automatic masks

    def auto_mask(
        self, image: ImageLike, ref: str, query: str, settings: AutoMaskSettings | None = None,
        size: int | None = None, **overrides: Any,
    ) -> Image.Image:  # fmt: skip
        """A mask drawn from the prompts alone (DiffEdit): where the noise predictions under ``ref`` and
        ``query`` differ. Returns a mode "L" image at the source's size, 255 = editable, whose ``info``
        records the settings and the seed.

        ``settings`` (or ``overrides``: strength, noises, threshold, grow, seed, chunk_size) are
        :class:`~ddsedit.automask.AutoMaskSettings`; without a seed a random one is drawn. ``size`` is
        the longest side of the working image (default: the model's working size, as edits use).

        Raises:
            InputError: empty prompts, prompts that say the same thing (no mask can be drawn), or a
                mask that would be empty or cover the whole image.
        """
        settings = (settings or AutoMaskSettings()).replace(**overrides)
        if settings.seed is None:
            settings = settings.replace(seed=random.SystemRandom().randrange(2**31))
        settings.validate()
        source = load_rgb(image)
        longest_side = size or self.config().size
        working = imageio.working_size(source.width, source.height, longest_side, self.latent_stride)
        mask = self._draw_auto_mask(source, ref, query, settings, working)
        mask.info.update({key: str(value) for key, value in settings.recorded().items()})
        return mask

    def _draw_auto_mask(
        self, source: Image.Image, ref: str, query: str, settings: AutoMaskSettings, working: tuple[int, int],
        negative: str = "",
    ) -> Image.Image:  # fmt: skip
        """The automatic mask of ``source`` at its size, its noise predictions made at the ``working`` size.

        ``negative`` plays no part in the mask (the unconditional prediction cancels), but the edit that
        follows needs it: it is encoded with the prompts, so that a text encoder freed after this first
        encoding (``keep_text_encoder=False``) has served the whole edit.
        """
        check_prompts("masked-dds", query, ref)
        settings.validate()
        if ref.strip() == query.strip():
            raise InputError(automask.SAME_PROMPTS_MESSAGE)
        assert settings.seed is not None  # callers resolve it, so that it can be recorded
        latents = self.encode_image(imageio.image_to_tensor(source, working))
        sizes = self.image_conditioning([(source.size, working)])
        prompts = self.encode_prompt([ref, query, negative]).with_extra(sizes)
        generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        if self.is_flow:
            tokens = (latents.shape[-1] // 2) * (latents.shape[-2] // 2)
            # The model's own 50-step schedule, as DiffEdit's strength counts steps of a 50-step grid.
            sigmas = self.family.function("flow_sigmas")(self.components.scheduler_config, automask.DDIM_GRID_STEPS,
                                                         tokens)  # fmt: skip
            ref_velocity, query_velocity = automask.velocity_predictions(
                self.components.unet, latents, prompts.rows(0, 1), prompts.rows(1, 2),
                automask.strength_sigma(settings.strength, sigmas), settings.noises, generator, settings.chunk_size,
                call=self.family.function("call_denoiser"),
            )  # fmt: skip
            return automask.mask_from_predictions(ref_velocity, query_velocity, settings, source.size)
        ref_epsilon, query_epsilon = automask.noise_predictions(
            self.components.unet, latents, prompts.rows(0, 1), prompts.rows(1, 2),
            automask.strength_timestep(settings.strength, self.components.num_train_timesteps),
            self.components.alphas_cumprod, self.components.prediction_type, settings.noises, generator,
            settings.chunk_size, call=self.family.function("call_denoiser"),
        )  # fmt: skip
        return automask.mask_from_predictions(ref_epsilon, query_epsilon, settings, source.size)

    def sds(self, image: ImageLike, query: str, **settings: Any) -> Image.Image:
        """SDS edit: pull the image toward ``query``. ``settings`` are :class:`EditConfig` fields."""
        return self.edit(image, "sds", query=query, config=self.config("sds", **settings)).image

    def dds(self, image: ImageLike, ref: str, query: str, **settings: Any) -> Image.Image:
        """DDS edit: change what ``ref`` says into what ``query`` says, keeping the rest."""
        return self.edit(image, "dds", query=query, ref=ref, config=self.config(**settings)).image

    def masked_dds(
        self, image: ImageLike, mask: ImageLike | AutoMaskSettings, ref: str, query: str, **settings: Any
    ) -> Image.Image:
        """DDS confined to ``mask`` (white = editable; ``"auto"``: drawn from the prompts); outside it the source
        is kept."""
        return self.edit(
            image, "masked-dds", query=query, ref=ref, mask=mask, config=self.config("masked-dds", **settings)
        ).image

    def cds(self, image: ImageLike, ref: str, query: str, mask: MaskLike | None = None, **settings: Any):
        """CDS edit: DDS plus a contrastive term that keeps the source's structure patch by patch."""
        return self._edit_image("cds", image, ref, query, mask, settings)

    def pds(self, image: ImageLike, ref: str, query: str, mask: MaskLike | None = None, **settings: Any):
        """PDS edit: match the target's posterior samples to the source's."""
        return self._edit_image("pds", image, ref, query, mask, settings)

    def ids(self, image: ImageLike, ref: str, query: str, mask: MaskLike | None = None, **settings: Any):
        """IDS edit: DDS with the source branch's noise corrected so that it predicts the source again."""
        return self._edit_image("ids", image, ref, query, mask, settings)

    def flowedit(self, image: ImageLike, ref: str, query: str, mask: MaskLike | None = None, **settings: Any):
        """FlowEdit (SD3, Flux): an ODE from the source along the difference of the query's and the ref's
        velocities."""
        return self._edit_image("flowedit", image, ref, query, mask, settings)

    def _edit_image(
        self, method: str, image: ImageLike, ref: str, query: str, mask: MaskLike | None, settings: dict[str, Any]
    ) -> Image.Image:
        config = self.config(method, **settings)
        return self.edit(image, method, query=query, ref=ref, mask=mask, config=config).image




def save_result(result: EditResult, path: str | Path, overwrite: bool = False) -> Path:
    """Write an edit's image atomically in the format its extension names (PNG, JPEG, WebP), with its parameters."""
    return imageio.save_image(result.image, path, result.metadata(), overwrite=overwrite)
