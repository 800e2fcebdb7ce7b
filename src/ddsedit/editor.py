"""The Python API: load a model once, then edit images with SDS, DDS, masked DDS, CDS, PDS or IDS.

    from ddsedit import Editor
    editor = Editor.from_pretrained("shapes")
    edited = editor.dds("cat.png", ref="a photo of a cat", query="a photo of a dog")
    edited.save("dog.png")

The pipeline is image -> VAE latents -> :func:`ddsedit.optimize.distill` -> decode -> image.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ddsedit import __version__, automask, imageio
from ddsedit.automask import AutoMaskSettings
from ddsedit.checks import check_prompts
from ddsedit.errors import DDSEditError, InputError
from ddsedit.loading import ModelComponents, load_model, resolve_device
from ddsedit.names import MASK_OPTIONAL_METHODS, MASKED_METHOD, METHODS_WITH_REF
from ddsedit.optimize import GRAPHABLE_METHODS, METHODS, LoopSettings, MethodOptions, PromptEmbeddings, distill
from ddsedit.settings import METHOD_FIELDS, EditConfig, resolve_config

__all__ = ["EditConfig", "EditRequest", "EditResult", "Editor", "edit_parameters", "save_result", "webui_parameters"]

ImageLike = str | os.PathLike | Image.Image
MaskLike = ImageLike | AutoMaskSettings  # a mask image or path, "auto", or how to draw it
ProgressCallback = Callable[[int, int], None]


@dataclass
class EditResult:
    """An edited image with everything needed to reproduce it."""

    image: Image.Image
    parameters: dict[str, Any]
    frames: list[tuple[int, Image.Image]] = field(default_factory=list)  # (step, decoded image)
    nonfinite_steps: int = 0  # steps whose gradient had NaN or inf elements (treated as 0)
    mask: Image.Image | None = None  # the binary mask the edit used (white = editable), at the source's size

    def metadata(self) -> dict[str, str]:
        """Text for the output file: each parameter, all of them as JSON under ``ddsedit``, and
        ``parameters`` in the form Stable Diffusion web UIs write (which image browsers show)."""
        text = {key: str(value) for key, value in self.parameters.items()}
        text["ddsedit"] = json.dumps(self.parameters, sort_keys=True)
        text["parameters"] = webui_parameters(self.parameters, self.image.size)
        return text


def _webui_value(value: Any) -> str:
    """A value as web UIs write it in ``Key: value, ...``: quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def webui_parameters(parameters: dict[str, Any], size: tuple[int, int]) -> str:
    """The ``parameters`` text of Stable Diffusion web UIs: the prompt (here the query), ``Negative prompt:``,
    then ``Steps: ..., CFG scale: ..., Seed: ..., Size: WxH, Model: ...`` and ddsedit's own fields."""
    fields: dict[str, Any] = {
        "Steps": parameters["steps"],
        "CFG scale": parameters["guidance"],
        "Seed": parameters["seed"],
        "Size": f"{size[0]}x{size[1]}",
        "Model": parameters.get("model", ""),
        "Method": parameters["method"],
    }
    if parameters.get("ref"):
        fields["Ref prompt"] = parameters["ref"]
    fields.update({"Learning rate": parameters["lr"], "Timesteps": f"{parameters['t_min']}-{parameters['t_max'] - 1}"})
    method_fields = METHOD_FIELDS.get(parameters["method"], ())
    fields.update(
        {name.replace("_", " ").capitalize(): parameters[name] for name in method_fields if name in parameters}
    )
    if "feather" in parameters:
        fields.update({"Paste back": parameters["paste_back"], "Feather": parameters["feather"]})
    if parameters.get("mask") == automask.AUTO_MASK:
        fields.update({
            "Mask": "auto", "Mask strength": parameters["mask_strength"], "Mask noises": parameters["mask_noises"],
            "Mask threshold": parameters["mask_threshold"], "Mask grow": parameters["mask_grow"],
            "Mask seed": parameters["mask_seed"],
        })  # fmt: skip
    fields["Version"] = f"ddsedit {parameters.get('ddsedit_version', __version__)}"
    lines = [str(parameters["query"])]
    if parameters.get("negative"):
        lines.append(f"Negative prompt: {parameters['negative']}")
    lines.append(", ".join(f"{key}: {_webui_value(value)}" for key, value in fields.items()))
    return "\n".join(lines)



def edit_parameters(
    method: str, ref: str, query: str, seed: int, config: EditConfig, masked: bool = False,
    auto_mask: AutoMaskSettings | None = None,
) -> dict[str, Any]:
    """What decides an edit's result, as its output's metadata records it (batch resume compares these).

    ``masked``: a mask was given (masked-dds always has one; cds, pds and ids may). ``auto_mask`` (its
    seed set): the settings of an automatic mask, recorded as ``mask: auto`` and ``mask_*``.
    """
    parameters: dict[str, Any] = {
        "method": method,
        "ref": ref,
        "query": query,
        "negative": config.negative,
        "seed": seed,
        "steps": config.steps,
        "guidance": config.guidance,
        "lr": config.lr,
        "t_min": config.t_min,
        "t_max": config.t_max,
        "size": config.size,
    }
    parameters.update(config.method_fields(method))
    if method == MASKED_METHOD or masked:
        parameters.update(paste_back=config.paste_back, feather=config.feather)
    if auto_mask is not None:
        parameters.update(auto_mask.recorded())
    return parameters


@dataclass
class EditRequest:
    """One image to edit in a batch: its prompts, its mask (masked-dds; optional for cds, pds, ids), its own seed.

    ``start`` (optional) is the image the optimisation starts from instead of ``image``, e.g. an
    earlier result to continue; ``image`` stays the source that DDS compares against.
    """

    image: ImageLike
    query: str
    ref: str | None = None
    mask: ImageLike | AutoMaskSettings | None = None  # "auto" or AutoMaskSettings: drawn from the prompts
    seed: int | None = None  # None: the config's seed (or a random one)
    start: ImageLike | None = None
    # SHA-256 of the source and mask files, recorded in the output (computed here when they are paths;
    # callers that pass loaded images, like batch, pass the hashes of the files they loaded).
    source_sha256: str | None = None
    mask_sha256: str | None = None


@dataclass
class _Prepared:
    """A request after checking: the loaded source, binary mask, chosen seed and working size."""

    source: Image.Image
    query: str
    ref: str
    mask: Image.Image | None
    seed: int
    working_size: tuple[int, int]
    start: Image.Image | None = None
    start_label: str | None = None  # what the metadata records as the start: a path, or "image"
    source_sha256: str | None = None
    mask_sha256: str | None = None
    auto_mask: AutoMaskSettings | None = None  # how the mask was drawn, when automatic (its seed set)


def _load_rgb(image: ImageLike) -> Image.Image:
    return (image if isinstance(image, Image.Image) else imageio.load_image(image)).convert("RGB")


class Editor:
    """A loaded model that edits images. Create it with :meth:`from_pretrained`."""

    def __init__(self, components: ModelComponents, device: torch.device, dtype: torch.dtype,
                 keep_text_encoder: bool = True, cuda_graph: bool = False) -> None:  # fmt: skip
        self.components = components
        self.device = device
        self.dtype = dtype
        self.keep_text_encoder = keep_text_encoder
        self.cuda_graph = cuda_graph
        self._embedding_cache: dict[str, torch.Tensor] = {}

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
    ) -> Editor:
        """Load ``model`` (bundled name, diffusers folder, .safetensors file or hub id).

        ``device``: auto|cpu|cuda|cuda:N|mps; ``dtype``: auto|fp16|bf16|fp32 (auto: fp16 on
        an accelerator, fp32 on CPU). With ``keep_text_encoder=False`` the text encoder is
        freed after the first prompts are encoded, saving memory for a one-shot edit.
        ``cpu_offload`` keeps the weights in CPU memory and moves each module to the device
        only while it runs (accelerate), for small GPUs; ``compile_unet`` wraps the UNet in
        ``torch.compile`` (the first steps then pay the compile time); ``cuda_graph`` records
        one optimisation step as a CUDA graph and replays it (CUDA only; not with
        ``cpu_offload`` or ``compile_unet``).
        """
        if cuda_graph:
            if cpu_offload or compile_unet:
                raise InputError("--cuda-graph cannot be combined with --cpu-offload or --compile")
            if resolve_device(device).type != "cuda":
                raise InputError("--cuda-graph needs a CUDA device")
        components, torch_device, torch_dtype = load_model(
            model, device=device, dtype=dtype, allow_pickle=allow_pickle, prediction_type=prediction_type,
            cpu_offload=cpu_offload,
        )  # fmt: skip
        if compile_unet:
            components.unet = torch.compile(components.unet)
        return cls(components, torch_device, torch_dtype, keep_text_encoder=keep_text_encoder, cuda_graph=cuda_graph)

    # ------------------------------------------------------------------ settings

    def config(self, method: str = "dds", **overrides: Any) -> EditConfig:
        """Settings for ``method`` on this model: the paper's defaults, the method's, the model's
        ``ddsedit.json`` (see :func:`ddsedit.settings.resolve_config`), then ``overrides``."""
        return resolve_config(method, self.components.defaults, overrides)

    # ------------------------------------------------------------------ text

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP embeddings [len(prompts), tokens, dim] (cached: the text encoder may be freed)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embedding_cache]
        if missing:
            text_encoder = self.components.text_encoder
            if text_encoder is None:
                raise DDSEditError("the text encoder was freed; load the model again to encode new prompts")
            tokenizer = self.components.tokenizer
            tokens = tokenizer(
                missing, padding="max_length", max_length=tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids.to(self.device)  # fmt: skip
            with torch.no_grad():
                hidden = text_encoder(tokens, return_dict=False)[0]
            for prompt, embedding in zip(missing, hidden, strict=True):
                self._embedding_cache[prompt] = embedding
        if not self.keep_text_encoder and self.components.text_encoder is not None:
            self.components.text_encoder = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return torch.stack([self._embedding_cache[p] for p in prompts]).to(self.dtype)

    def cached_prompt_count(self) -> int:
        """How many prompts' embeddings are cached."""
        return len(self._embedding_cache)

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt embeddings (a long batch would grow the cache without bound).

        Only possible while the text encoder is kept: otherwise the prompts could not be encoded again.
        """
        if self.components.text_encoder is not None:
            self._embedding_cache.clear()

    # ------------------------------------------------------------------ VAE

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
        config = vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        latents = self._run_vae(lambda x: vae.encode(x).latent_dist.mean, pixels.to(self.device))
        return (latents - shift) * config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels [K, 3, h, w] in [-1, 1] (fp32, on the CPU)."""
        vae = self.components.vae
        config = vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        unscaled = latents / config.scaling_factor + shift
        return self._run_vae(lambda z: vae.decode(z, return_dict=False)[0], unscaled).clamp(-1, 1).cpu()

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
    ) -> EditResult:
        """Edit one image and return the result with its parameters (and frames if asked).

        ``method`` is one of ``sds``, ``dds``, ``masked-dds``, ``cds``, ``pds``, ``ids``; ``ref``
        describes the source image (needed by all but sds), ``query`` the wanted result; ``mask``
        (white = editable) is needed by ``masked-dds`` and optional for cds, pds and ids: an image,
        a path, or ``"auto"`` (or an :class:`~ddsedit.automask.AutoMaskSettings`) to draw it from the
        prompts with the edit's seed. ``on_progress(step, steps)`` is called after each step.
        ``start`` (same size as ``image``) starts the optimisation from another image, e.g. an
        earlier result to continue, while ``image`` stays the source DDS compares against.
        """
        request = EditRequest(image=image, query=query, ref=ref, mask=mask, start=start)
        return self.edit_batch([request], method, config=config, on_progress=on_progress)[0]

    def edit_batch(
        self,
        requests: list[EditRequest],
        method: str,
        config: EditConfig | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> list[EditResult]:
        """Edit K images at once, sharing each step's UNet call (a batch of 4K for DDS).

        The images must have the same working size. Each image draws its timesteps and
        noise from its own generator (its request's seed, else ``config.seed``), so an image
        edited in a batch gets the same result as when edited alone, up to float rounding.
        """
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        if self.cuda_graph and method not in GRAPHABLE_METHODS:
            raise InputError(f"--cuda-graph records {', '.join(GRAPHABLE_METHODS)} steps, not {method}")
        if not requests:
            return []
        config = config or self.config(method)
        config.validate_for(method, self.components.num_train_timesteps)
        prepared = [self._prepare(request, method, config) for request in requests]
        working = prepared[0].working_size
        if any(item.working_size != working for item in prepared):
            sizes = sorted({f"{w}x{h}" for w, h in (item.working_size for item in prepared)})
            raise InputError(f"images in one batch need the same working size, got {', '.join(sizes)}")

        embeddings = self.encode_prompts(
            [config.negative] + [item.ref for item in prepared] + [item.query for item in prepared]
        )
        count = len(prepared)
        prompt_embeddings = PromptEmbeddings(
            unconditional=embeddings[0:1].expand(count, -1, -1),
            source=embeddings[1 : 1 + count],
            target=embeddings[1 + count :],
        )
        pixels = torch.cat([imageio.image_to_tensor(item.source, working) for item in prepared])
        source_latents = self.encode_image(pixels)
        initial_latents = None
        if any(item.start is not None for item in prepared):
            starts = [item.source if item.start is None else item.start for item in prepared]
            start_pixels = torch.cat([imageio.image_to_tensor(start, working) for start in starts])
            initial_latents = self.encode_image(start_pixels)
        latent_mask = None
        if any(item.mask is not None for item in prepared):
            latent_size = (source_latents.shape[-1], source_latents.shape[-2])
            latent_mask = torch.cat([
                torch.ones(1, 1, latent_size[1], latent_size[0]) if item.mask is None
                else imageio.mask_to_latent(item.mask, latent_size)
                for item in prepared
            ]).to(self.device)  # fmt: skip

        frames: list[list[tuple[int, Image.Image]]] = [[] for _ in prepared]
        if config.save_every:
            for item, item_frames in zip(prepared, frames, strict=True):
                item_frames.append((0, item.source.resize(working, Image.Resampling.LANCZOS)))

        def on_step(step: int, latents: torch.Tensor) -> None:
            if config.save_every and (step % config.save_every == 0 or step == config.steps):
                decoded = self.decode_latents(latents)
                for index, item_frames in enumerate(frames):
                    item_frames.append((step, imageio.tensor_to_image(decoded[index])))
            if on_progress is not None:
                on_progress(step, config.steps)

        def on_nonfinite(count: int) -> None:
            nonfinite_steps_seen.append(count)

        nonfinite_steps_seen: list[int] = []
        generators = [torch.Generator(device=self.device).manual_seed(item.seed) for item in prepared]
        settings = LoopSettings(
            method, config.steps, config.guidance, config.lr, config.t_min, config.t_max, method_options(config)
        )
        latents = distill(
            self.components.unet, source_latents, prompt_embeddings, self.components.alphas_cumprod,
            self.components.prediction_type, settings, generators, mask=latent_mask, on_step=on_step,
            cuda_graph=self.cuda_graph, initial_latents=initial_latents, on_nonfinite=on_nonfinite,
        )  # fmt: skip
        nonfinite_steps = sum(nonfinite_steps_seen)
        if nonfinite_steps:
            warnings.warn(
                f"the model returned NaN or infinite values in {nonfinite_steps} of {config.steps} steps; "
                "those gradient elements were treated as 0",
                RuntimeWarning,
                stacklevel=2,
            )
        decoded = self.decode_latents(latents)
        results = [
            self._finish(item, imageio.tensor_to_image(decoded[index]), method, config, frames[index])
            for index, item in enumerate(prepared)
        ]
        for result in results:
            result.nonfinite_steps = nonfinite_steps
        return results

    def _prepare(self, request: EditRequest, method: str, config: EditConfig) -> _Prepared:
        """Check one request and load its image and mask."""
        check_prompts(method, request.query, request.ref or "")
        query = request.query
        ref = (request.ref or "") if method in METHODS_WITH_REF else ""
        source = _load_rgb(request.image)
        binary_mask = None
        auto_mask = None  # an automatic mask is drawn below, once the seed and the working size are known
        if method == MASKED_METHOD and request.mask is None:
            raise InputError("masked-dds needs a --mask (white = editable)")
        if request.mask is not None and method not in (MASKED_METHOD, *MASK_OPTIONAL_METHODS):
            raise InputError(f"{method} takes no mask: use masked-dds, or one of {', '.join(MASK_OPTIONAL_METHODS)}")
        if request.mask is not None:
            auto_mask = automask.requested_settings(request.mask)
            mask = request.mask
            if auto_mask is None and not isinstance(mask, Image.Image):
                mask = imageio.load_image(mask, what="mask", background=imageio.BLACK)
            if auto_mask is None:
                binary_mask = imageio.binarize_mask(mask, source.size)
        seed = request.seed if request.seed is not None else config.seed
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        start, start_label = None, None
        if isinstance(request.start, Image.Image):
            start, start_label = request.start.convert("RGB"), "image"
        elif request.start is not None:
            start, start_label = imageio.load_image(request.start, "start image"), str(request.start)
        if start is not None:
            imageio.check_start_size(start, source)
        stride = self.components.vae_scale_factor
        working = imageio.working_size(source.width, source.height, config.size, stride)
        if auto_mask is not None:
            auto_mask = auto_mask.replace(seed=seed) if auto_mask.seed is None else auto_mask  # the edit's seed
            binary_mask = self._draw_auto_mask(source, ref, query, auto_mask, working, config.negative)
        source_sha256 = request.source_sha256
        if source_sha256 is None and not isinstance(request.image, Image.Image):
            source_sha256 = imageio.file_sha256(request.image)
        mask_sha256 = None
        if binary_mask is not None and auto_mask is None:
            mask_sha256 = request.mask_sha256
            if mask_sha256 is None and not isinstance(request.mask, Image.Image):
                mask_sha256 = imageio.file_sha256(request.mask)
        return _Prepared(source, query, ref, binary_mask, seed, working, start, start_label, source_sha256,
                         mask_sha256, auto_mask)  # fmt: skip

    def _finish(
        self, item: _Prepared, edited: Image.Image, method: str, config: EditConfig,
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
                              auto_mask=item.auto_mask),
            "working_size": f"{item.working_size[0]}x{item.working_size[1]}",
            "model": self.components.identity or self.components.source,
            "prediction_type": self.components.prediction_type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "ddsedit_version": __version__,
        }
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
        source = _load_rgb(image)
        longest_side = size or self.config().size
        working = imageio.working_size(source.width, source.height, longest_side, self.components.vae_scale_factor)
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
        embeddings = self.encode_prompts([ref, query, negative])
        generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        ref_epsilon, query_epsilon = automask.noise_predictions(
            self.components.unet, latents, embeddings[0:1], embeddings[1:2],
            automask.strength_timestep(settings.strength, self.components.num_train_timesteps),
            self.components.alphas_cumprod, self.components.prediction_type, settings.noises, generator,
            settings.chunk_size,
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

    def _edit_image(
        self, method: str, image: ImageLike, ref: str, query: str, mask: MaskLike | None, settings: dict[str, Any]
    ) -> Image.Image:
        config = self.config(method, **settings)
        return self.edit(image, method, query=query, ref=ref, mask=mask, config=config).image


def method_options(config: EditConfig) -> MethodOptions:
    """The loop's view of the settings beyond DDS."""
    return MethodOptions(
        dds_weight=config.dds_weight, cut_weight=config.cut_weight, cut_patches=config.cut_patches,
        cut_patch_sizes=tuple(config.cut_patch_sizes), cut_temperature=config.cut_temperature,
        pds_grid=config.pds_grid, identity_steps=config.identity_steps, identity_weight=config.identity_weight,
    )  # fmt: skip


def save_result(result: EditResult, path: str | Path, overwrite: bool = False) -> Path:
    """Write an edit's image atomically in the format its extension names (PNG, JPEG, WebP), with its parameters."""
    return imageio.save_image(result.image, path, result.metadata(), overwrite=overwrite)
