"""Loading original-format Stable Diffusion 1.x / 2.x, SDXL, SD3/SD3.5 and Flux.1 single-file checkpoints, offline.

A single-file checkpoint (``v1-5-pruned-emaonly.safetensors``, ``v2-1_768-ema-pruned.safetensors``,
``sd_xl_base_1.0.safetensors``, a fine-tune saved the same way) holds the UNet under
``model.diffusion_model.*`` and the VAE under ``first_stage_model.*``; SD 1.x/2.x keep the text
encoder under ``cond_stage_model.*``, SDXL its two under ``conditioner.embedders.0.transformer.*``
(CLIP ViT-L/14, transformers' layout) and ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG/14,
OpenCLIP's layout, with its text projection). No file holds a configuration. diffusers normally
fetches the matching diffusers configs from the Hugging Face Hub; ddsedit ships them instead, in
``model_configs/``:

* ``sd15``  - stable-diffusion-v1-5/stable-diffusion-v1-5 (CLIP ViT-L/14 text encoder, epsilon, 512);
* ``sd2``   - stabilityai/stable-diffusion-2-1-base (OpenCLIP ViT-H/14, epsilon, 512);
* ``sd2-v`` - stabilityai/stable-diffusion-2-1 (OpenCLIP ViT-H/14, v-prediction, 768);
* ``sdxl``  - stabilityai/stable-diffusion-xl-base-1.0 (CLIP ViT-L/14 + OpenCLIP ViT-bigG/14, epsilon, 1024);
* ``sdxl-v`` - the same with a v-prediction scheduler, for v-prediction SDXL fine-tunes;
* ``sd3-medium``, ``flux-dev`` - only the transformer and scheduler of stabilityai/stable-diffusion-3-medium and
  black-forest-labs/FLUX.1-dev, for ``benchmarks/bench_flow.py`` (no single-file loading reads them);
* ``clip_bpe`` - the byte-level BPE vocabulary and merges that all the tokenizers use (gzipped;
  ``scripts/make_clip_bpe.py`` derives them from OpenAI's published merge list).

Each component is then built with diffusers' own single-file conversion code, pointed at the
bundled config folder, so the weights are mapped exactly as ``from_single_file`` maps them.
SD3/SD3.5 and Flux.1 (``load_single_file`` on such a file): Stability's all-in-one files keep the MMDiT
under ``model.diffusion_model.*``, the VAE under ``first_stage_model.*`` and the text encoders, in
transformers' layout, under ``text_encoders.clip_l.*``, ``text_encoders.clip_g.*`` and (in the ``t5xxl``
variants) ``text_encoders.t5xxl.*``; ComfyUI's Flux.1 all-in-one files name the transformer the same way,
the VAE ``vae.*``; BFL's own Flux.1 files hold the transformer alone, unprefixed (``double_blocks.*``).
The shipped folders are

* ``sd3-medium`` - stabilityai/stable-diffusion-3-medium-diffusers (24 joint blocks 1536 wide);
* ``sd3.5-large`` - stabilityai/stable-diffusion-3.5-large (38 blocks 2432 wide, RMS q/k norms);
* ``flux-dev``, ``flux-schnell`` - black-forest-labs/FLUX.1-dev (guidance embedding) and -schnell (none).

They hold no T5 tokenizer (T5's 32k-piece sentencepiece model is not in this package yet), so a file with
T5 weights is refused in one line pointing to the diffusers repo; SD3 files without T5
(``sd3_medium_incl_clips.safetensors``) load whole. The components are built by diffusers' SD3 and Flux
converters (``from_single_file``, ``create_diffusers_*``), pointed at the shipped folder.

``load_single_file_vae`` loads a standalone VAE file (``sdxl_vae.safetensors``,
``vae-ft-mse-840000-ema-pruned.safetensors``) into a model's VAE architecture the same way.

Which config folder a checkpoint gets (``detect_sd_version``), from its tensor names and shapes:

* SDXL: the ``conditioner.embedders.*`` text encoders (or, without them, a UNet attending to
  2048-wide text features). The SDXL refiner (one text encoder, ``conditioner.embedders.0.model.*``),
  SDXL inpainting (9 UNet input channels) and Playground v2.5 (SDXL's layout with an EDM schedule,
  marked by ``edm_mean``) are refused. SDXL base is epsilon; v-prediction fine-tunes say so in their
  metadata or with a ``v_pred`` tensor (see below), else the caller's ``prediction_type`` must.
* SD 1.x vs 2.x: the text encoder's layout. SD 1.x stores OpenAI CLIP in transformers' layout
  under ``cond_stage_model.transformer.*``; SD 2.x stores OpenCLIP under ``cond_stage_model.model.*``.
  Without text-encoder weights, the UNet's cross-attention width decides (768: 1.x, 1024: 2.x),
  as diffusers' ``infer_diffusers_model_type`` does.
* SD 2.x epsilon (512 "base") vs v-prediction (768): nothing in the weights says which. diffusers
  maps every SD 2.x single file to stabilityai/stable-diffusion-2-1 (v-prediction, 768); its legacy
  scheduler path uses epsilon only when the pickle's ``global_step`` is 875000 (the 512-base run).
  ddsedit decides, in this order: the caller's ``prediction_type`` argument; the
  file's metadata (``modelspec.prediction_type``, ``modelspec.architecture``, kohya's
  ``ss_v_parameterization``) or a ``v_pred`` marker tensor; ``global_step == 875000`` (pickles);
  the file name (``768``, ``vpred`` or ``v-pred``: v-prediction; ``512`` or ``base``: epsilon,
  which covers Stability's ``v2-1_768-*``, ``768-v-ema``, ``v2-1_512-*`` and ``512-base-ema``);
  else diffusers' default, v-prediction.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ddsedit.errors import InputError, ModelError
from ddsedit.formats import PICKLE_SUFFIXES

MODEL_CONFIGS_DIR = Path(__file__).parent / "model_configs"
CLIP_BPE_DIR = MODEL_CONFIGS_DIR / "clip_bpe"
SD_VERSIONS = ("sd15", "sd2", "sd2-v", "sdxl", "sdxl-v")
FLOW_VERSIONS = ("sd3-medium", "sd3.5-large", "flux-dev", "flux-schnell")
# each version's model family, named as in ddsedit.families
VERSION_FAMILIES = {
    "sd15": "sd", "sd2": "sd", "sd2-v": "sd", "sdxl": "sdxl", "sdxl-v": "sdxl",
    "sd3-medium": "sd3", "sd3.5-large": "sd3", "flux-dev": "flux", "flux-schnell": "flux",
}  # fmt: skip
CLIP_VOCAB_SIZE = 49408

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP, transformers' layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP's own layout
SDXL_PREFIX = "conditioner.embedders."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: OpenAI CLIP ViT-L, transformers' layout
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP ViT-bigG, OpenCLIP's layout
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner's only text encoder, OpenCLIP ViT-bigG
SDXL_CONTEXT_WIDTH = 2048  # SDXL's UNet attends to both encoders' features side by side: 768 + 1280
# SD3/SD3.5 all-in-one files (and ComfyUI's Flux ones) keep their text encoders in transformers' layout here
SD3_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
SD3_CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
FLUX_VAE_PREFIX = "vae."  # ComfyUI's Flux checkpoints; SD3's use first_stage_model.
SD3_MARKER = "joint_blocks.0.x_block.attn.qkv.weight"  # MMDiT's first joint block
FLUX_MARKER = "double_blocks.0.img_attn.qkv.weight"
FLUX_GUIDANCE_MARKER = "guidance_in.in_layer.weight"  # dev's guidance embedding; schnell has none
# (joint blocks, hidden width) of the MMDiTs that ddsedit ships configs for
SD3_SIZES = {(24, 1536): "sd3-medium", (38, 2432): "sd3.5-large"}
PLAYGROUND_MARKER = "edm_mean"  # Playground v2.5: SDXL's layout, an EDM schedule and its own latent statistics
SD2_BASE_GLOBAL_STEP = 875000  # diffusers' legacy loader: this step count marks the 512 epsilon model

_PREDICTION_ALIASES = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v_prediction": "v_prediction",
    "v-prediction": "v_prediction",
    "v": "v_prediction",
}
_V_NAME = re.compile(r"768|v[-_]?pred")
_EPSILON_NAME = re.compile(r"512|base")
_SHAPE_MISMATCH = re.compile(
    r"because (\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got torch\.Size\((\[[^\]]*\])\)"
)


def normalize_prediction_type(prediction_type: str | None) -> str | None:
    """``"epsilon"`` or ``"v_prediction"`` (also accepting ``eps``/``v``/``v-prediction``), or None."""
    if prediction_type is None:
        return None
    normalized = _PREDICTION_ALIASES.get(str(prediction_type).strip().lower())
    if normalized is None:
        raise InputError(f"unknown prediction type {prediction_type!r}: use epsilon or v_prediction")
    return normalized


# ---------------------------------------------------------------------------------------------
# The tokenizer


def _read_maybe_gzipped(folder: Path, name: str) -> str | None:
    plain, packed = folder / name, folder / f"{name}.gz"
    if plain.is_file():
        return plain.read_text(encoding="utf-8")
    if packed.is_file():
        return gzip.decompress(packed.read_bytes()).decode("utf-8")
    return None


def load_bpe(folder: Path = CLIP_BPE_DIR) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE ``(vocab, merges)`` from ``vocab.json`` and ``merges.txt`` (each maybe ``.gz``)."""
    vocab_text = _read_maybe_gzipped(folder, "vocab.json")
    merges_text = _read_maybe_gzipped(folder, "merges.txt")
    if vocab_text is None or merges_text is None:
        raise ModelError(f"{folder} holds no vocab.json and merges.txt (plain or .gz)")
    try:
        vocab = json.loads(vocab_text)
    except json.JSONDecodeError as error:
        raise ModelError(f"cannot read the BPE vocabulary in {folder}: {error}") from None
    merges = []
    for line in merges_text.split("\n"):
        if line and not line.startswith("#version"):
            left, _, right = line.partition(" ")
            merges.append((left, right))
    return vocab, merges


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_clip_tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    """A CLIPTokenizer from a diffusers ``tokenizer/`` folder whose BPE files may live elsewhere.

    The folder's ``tokenizer_config.json`` and ``special_tokens_map.json`` give the special tokens
    and the maximum length (the latter file wins, as in transformers: it makes SD 2.x pad with
    ``!``, id 0, and SD 1.x with ``<|endoftext|>``, id 49407). The vocabulary and merges come from
    the folder when it has them, else from the bundled ``clip_bpe``. The tokenizer is built from
    the vocabulary and merge list directly: transformers 5's CLIPTokenizer silently ignores
    ``vocab_file``/``merges_file`` arguments and builds a 3-token vocabulary.
    """
    settings: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = tokenizer_dir / name
        if path.is_file():
            try:
                settings.update(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as error:
                raise ModelError(f"cannot read {path}: {error}") from None
    if not settings:
        raise ModelError(f"{tokenizer_dir} holds no tokenizer_config.json")
    has_own_bpe = _read_maybe_gzipped(tokenizer_dir, "merges.txt") is not None
    vocab, merges = load_bpe(tokenizer_dir if has_own_bpe else CLIP_BPE_DIR)
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = _token_text(settings.get(name))
        if text is not None:
            special[name] = text
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=int(settings.get("model_max_length", 77)), **special
    )
    if len(tokenizer) != len(vocab):
        raise ModelError(
            f"the tokenizer built from {tokenizer_dir} has {len(tokenizer)} tokens, not {len(vocab)}"
        )
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint


class _Checkpoint:
    """Tensor names, shapes and (on demand) values of a checkpoint, without loading it whole."""

    def __init__(self, path: Path, handle: Any = None, state: dict[str, Any] | None = None) -> None:
        self.path = path
        self._handle = handle  # safetensors safe_open handle
        self._state = state  # pickled state dict
        self.global_step: int | None = None
        if handle is not None:
            self.keys = list(handle.keys())
            self.metadata: dict[str, str] = handle.metadata() or {}
        else:
            self.keys = [key for key, value in state.items() if isinstance(value, torch.Tensor)]
            self.metadata = {}

    def shape(self, key: str) -> tuple[int, ...] | None:
        if self._handle is not None:
            if key not in self.keys:
                return None
            return tuple(self._handle.get_slice(key).get_shape())
        value = self._state.get(key)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    def tensor(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(key) if self._handle is not None else self._state[key]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors whose names start with ``prefix``, under their full names."""
        if self._handle is not None:
            return {key: self._handle.get_tensor(key) for key in self.keys if key.startswith(prefix)}
        return {key: self._state[key] for key in self.keys if key.startswith(prefix)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _refuse_pickle(path: Path) -> None:
    raise InputError(
        f"{path} is a pickle checkpoint, which can run code when loaded; "
        "pass --allow-pickle if you trust it, or convert it to .safetensors"
    )


@contextlib.contextmanager
def _open_checkpoint(path: str | Path, allow_pickle: bool) -> Iterator[_Checkpoint]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            _refuse_pickle(path)
        yield _load_pickle(path)
        return
    if suffix != ".safetensors":
        raise InputError(f"{path} is not a checkpoint: expected a .safetensors file")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError for a bad header
        raise ModelError(
            f"cannot read {path.name}: not a valid safetensors file ({_first_line(error)})"
        ) from None
    with handle:
        yield _Checkpoint(path, handle=handle)


def _load_pickle(path: Path) -> _Checkpoint:
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            # The user trusts the file (--allow-pickle); Lightning checkpoints hold objects that the
            # restricted unpickler refuses.
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ModelError(f"cannot read {path.name}: {_first_line(error)}") from None
    global_step = data.get("global_step") if isinstance(data, dict) else None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} does not hold a state dict")
    checkpoint = _Checkpoint(path, state=data)
    if isinstance(global_step, int | torch.Tensor):
        checkpoint.global_step = int(global_step)
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Telling versions apart


def _prediction_from_metadata(checkpoint: _Checkpoint) -> str | None:
    metadata = {key: str(value).strip().lower() for key, value in checkpoint.metadata.items()}
    declared = _PREDICTION_ALIASES.get(metadata.get("modelspec.prediction_type", ""))
    if declared is not None:
        return declared
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.startswith("stable-diffusion-v2"):
        return "v_prediction" if architecture.endswith("-v") else "epsilon"
    if metadata.get("ss_v_parameterization") == "true":
        return "v_prediction"
    if "v_pred" in checkpoint.keys:
        return "v_prediction"
    return None


def _sd2_prediction_type(checkpoint: _Checkpoint) -> str:
    from_metadata = _prediction_from_metadata(checkpoint)
    if from_metadata is not None:
        return from_metadata
    if checkpoint.global_step == SD2_BASE_GLOBAL_STEP:
        return "epsilon"
    name = checkpoint.path.stem.lower()
    if _V_NAME.search(name):
        return "v_prediction"
    if _EPSILON_NAME.search(name):
        return "epsilon"
    return "v_prediction"


def _has_prefix(keys: list[str], prefix: str) -> bool:
    """Whether any tensor name starts with ``prefix`` (a component's weights are present)."""
    return any(key.startswith(prefix) for key in keys)


def _refuse_other_sdxl_models(checkpoint: _Checkpoint) -> None:
    """SDXL-layout models that the SDXL base configs would load wrongly, or not at all."""
    name = checkpoint.path.name
    keys = checkpoint.keys
    if _has_prefix(keys, SDXL_REFINER_PREFIX) and not _has_prefix(keys, SDXL_CLIP_PREFIX):
        raise ModelError(
            f"{name} is the SDXL refiner (one text encoder, image-to-image only); "
            "ddsedit needs an SDXL base model or a fine-tune of it"
        )
    if PLAYGROUND_MARKER in keys:
        # Its weights would load into SDXL's architecture, but its EDM noise schedule and latent statistics
        # are not SDXL's, so every edit would be wrong without an error.
        raise ModelError(
            f"{name} is a Playground v2.5 checkpoint (EDM noise schedule), which ddsedit does not support"
        )


def _unet_context_width(checkpoint: _Checkpoint, unet_keys: list[str]) -> int | None:
    """The width of the text features that the UNet's cross-attention reads."""
    for key in unet_keys:
        if key.endswith(".attn2.to_k.weight"):
            shape = checkpoint.shape(key)
            return shape[-1] if shape else None
    return None


def _sdxl_text_width(checkpoint: _Checkpoint) -> int | None:
    """The two SDXL text encoders' widths added up (the UNet reads their features concatenated)."""
    clip_shape = checkpoint.shape(SDXL_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight")
    if clip_shape is None:  # saved by transformers < 4.2x, without the text_model level
        clip_shape = checkpoint.shape(SDXL_CLIP_PREFIX + "embeddings.token_embedding.weight")
    open_clip_shape = checkpoint.shape(SDXL_OPEN_CLIP_PREFIX + "token_embedding.weight")
    if not clip_shape or not open_clip_shape:
        return None
    return clip_shape[-1] + open_clip_shape[-1]


def _detect_sdxl(checkpoint: _Checkpoint, context_width: int | None, prediction_type: str | None) -> str:
    """``"sdxl"`` or ``"sdxl-v"``; refuses a file that would not load whole into SDXL base's architecture.

    No SD 2.x-style guessing from names or step counts: SDXL base and nearly all its fine-tunes are
    epsilon, so only the caller or the file itself can say v-prediction.
    """
    name = checkpoint.path.name
    has_clip = _has_prefix(checkpoint.keys, SDXL_CLIP_PREFIX)
    has_open_clip = _has_prefix(checkpoint.keys, SDXL_OPEN_CLIP_PREFIX)
    if has_clip != has_open_clip:
        missing = SDXL_OPEN_CLIP_PREFIX if has_clip else SDXL_CLIP_PREFIX
        raise ModelError(f"{name} is an SDXL checkpoint without one of its two text encoders (no {missing}*)")
    text_width = _sdxl_text_width(checkpoint)
    if context_width is not None and text_width is not None and context_width != text_width:
        raise ModelError(
            f"{name}: its text encoders give {text_width}-wide features but its UNet attends to "
            f"{context_width}-wide ones; the file mixes two models"
        )
    chosen = prediction_type or _prediction_from_metadata(checkpoint) or "epsilon"
    return "sdxl-v" if chosen == "v_prediction" else "sdxl"


def _detect(checkpoint: _Checkpoint, prediction_type: str | None) -> str:
    name = checkpoint.path.name
    keys = checkpoint.keys
    _refuse_other_sdxl_models(checkpoint)
    unet_keys = [key for key in keys if key.startswith(UNET_PREFIX)]
    if not unet_keys:
        raise ModelError(
            f"{name} is not a Stable Diffusion 1.x/2.x or SDXL checkpoint: it holds no UNet weights "
            f"({UNET_PREFIX}*); for a diffusers folder, pass the folder instead"
        )
    conv_in = checkpoint.shape(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelError(
            f"{name} has a UNet with {conv_in[1]} input channels (an inpainting, depth, upscaling or "
            "instruct-pix2pix model); ddsedit needs a text-to-image SD 1.x/2.x or SDXL checkpoint"
        )
    context_width = _unet_context_width(checkpoint, unet_keys)
    if _has_prefix(keys, SDXL_PREFIX) or context_width == SDXL_CONTEXT_WIDTH:
        return _detect_sdxl(checkpoint, context_width, prediction_type)
    has_clip = _has_prefix(keys, CLIP_PREFIX)
    has_open_clip = _has_prefix(keys, OPEN_CLIP_PREFIX)
    if has_open_clip and not has_clip:
        version = "sd2"
    elif has_clip and not has_open_clip:
        version = "sd15"
    elif context_width in (768, 1024):
        version = "sd15" if context_width == 768 else "sd2"
    else:
        raise ModelError(
            f"{name}: cannot tell whether this is an SD 1.x or 2.x checkpoint (no text encoder found)"
        )
    if context_width in (768, 1024) and context_width != (768 if version == "sd15" else 1024):
        raise ModelError(
            f"{name}: its text encoder is SD {'1.x' if version == 'sd15' else '2.x'}'s but its UNet "
            f"attends to {context_width}-wide text features; the file mixes two models"
        )
    if version == "sd15":
        return "sd15"
    chosen = prediction_type or _sd2_prediction_type(checkpoint)
    return "sd2-v" if chosen == "v_prediction" else "sd2"


# ---------------------------------------------------------------------------------------------
# SD3/SD3.5 and Flux.1 files

FLOW_LABELS = {"sd3": "Stable Diffusion 3", "flux": "Flux.1"}
_FLOW_HUB_IDS = {
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
}


def _transformer_prefix(checkpoint: _Checkpoint) -> tuple[str, str] | None:
    """``(family, prefix)`` of an MMDiT (SD3) or Flux transformer's tensors: ``model.diffusion_model.`` in
    all-in-one files, none in the transformer-only files that BFL and ComfyUI ship; None for any other file."""
    keys = set(checkpoint.keys)
    for prefix in (UNET_PREFIX, ""):
        if prefix + SD3_MARKER in keys:
            return "sd3", prefix
        if prefix + FLUX_MARKER in keys:
            return "flux", prefix
    return None


def _block_count(keys: list[str], prefix: str) -> int:
    """How many numbered blocks (``joint_blocks.N.``) there are under ``prefix``."""
    return 1 + max(int(key[len(prefix) :].split(".", 1)[0]) for key in keys if key.startswith(prefix))


def _detect_flow(checkpoint: _Checkpoint, has_configs: bool) -> str | None:
    """The shipped config folder (one of FLOW_VERSIONS) of an SD3/SD3.5 or Flux.1 file, ``""`` when the file is
    one but the caller brings its own configs (``has_configs``) and none of the shipped ones fits, None when it is
    no such file.

    SD3 medium and SD3.5 large are told apart by the MMDiT's depth and width (24 blocks 1536 wide, 38 blocks
    2432 wide); SD3.5 medium (an MMDiT-X: second attention in its first blocks) has no shipped config. Flux.1 dev
    has a guidance embedding, schnell none; Fill and Depth (more input channels: the image to fill or the depth
    map) are not text-to-image models.
    """
    found = _transformer_prefix(checkpoint)
    if found is None:
        return None
    family, prefix = found
    name, keys = checkpoint.path.name, checkpoint.keys
    if family == "sd3":
        depth = _block_count(keys, prefix + "joint_blocks.")
        width = (checkpoint.shape(prefix + "x_embedder.proj.weight") or (0,))[0]
        mmdit_x = any(key.startswith(prefix + "joint_blocks.") and ".x_block.attn2." in key for key in keys)
        version = None if mmdit_x else SD3_SIZES.get((depth, width))
        if version is None and not has_configs:
            what = "an SD3.5 medium (MMDiT-X)" if mmdit_x else f"an SD3 transformer of {depth} blocks {width} wide"
            raise ModelError(
                f"{name} holds {what}, for which ddsedit ships no config (SD3 medium, SD3.5 large): "
                "pass the model's diffusers folder or hub id instead"
            )
        return version or ""
    version = "flux-dev" if prefix + FLUX_GUIDANCE_MARKER in keys else "flux-schnell"
    in_features = (checkpoint.shape(prefix + "img_in.weight") or (0, None))[1]
    expected = _shipped_in_channels(version)
    if in_features != expected and not has_configs:
        raise ModelError(
            f"{name} is a Flux.1 model with {in_features} input features, not {expected} (Fill or Depth, which "
            "condition on an image); ddsedit needs the text-to-image Flux.1 dev or schnell"
        )
    return version


def _shipped_in_channels(version: str) -> int | None:
    """The packed latent features that a shipped Flux config's transformer takes (64: 16 channels, 2x2)."""
    try:
        return json.loads((MODEL_CONFIGS_DIR / version / "transformer" / "config.json").read_text())["in_channels"]
    except (OSError, ValueError, KeyError):
        return None



def detect_sd_version(
    path: str | Path, prediction_type: str | None = None, allow_pickle: bool = False
) -> str:
    """The bundled config folder (one of SD_VERSIONS or FLOW_VERSIONS) that a checkpoint's weights belong with.

    ``"sd15"``, ``"sd2"`` (epsilon, 512), ``"sd2-v"`` (v-prediction, 768), ``"sdxl"`` (epsilon,
    1024) or ``"sdxl-v"`` (v-prediction). Reads only tensor names, shapes and metadata from a
    ``.safetensors`` file (a pickle is loaded whole, and only with ``allow_pickle``).
    ``prediction_type`` (``epsilon``/``v_prediction``) overrides the guess between ``sd2`` and
    ``sd2-v`` or ``sdxl`` and ``sdxl-v``; see the module docstring for the rules. An SD3/SD3.5 or
    Flux.1 file is ``"sd3-medium"``, ``"sd3.5-large"``, ``"flux-dev"`` or ``"flux-schnell"``. Raises
    InputError (missing file, refused pickle) or ModelError (not an SD 1.x/2.x or SDXL base checkpoint,
    or an SD3/Flux.1 model that no shipped config fits).
    """
    normalized = normalize_prediction_type(prediction_type)
    with _open_checkpoint(path, allow_pickle) as checkpoint:
        return _detect_flow(checkpoint, has_configs=False) or _detect(checkpoint, normalized)


# ---------------------------------------------------------------------------------------------
# Loading


def _component_error(name: str, component: str, error: BaseException) -> ModelError:
    mismatch = _SHAPE_MISMATCH.search(str(error))
    if mismatch:
        tensor, expected, got = mismatch.groups()
        return ModelError(
            f"cannot load the {component} from {name}: {tensor} has shape {got}, the architecture expects "
            f"{expected} (not a standard SD 1.x/2.x or SDXL checkpoint?)"
        )
    if isinstance(error, KeyError) and error.args:
        # diffusers' conversion looks up the tensors it needs by name (SDXL's label_emb.*, for one).
        return ModelError(
            f"cannot load the {component} from {name}: some of its weights are missing from the file "
            f"(first {error.args[0]})"
        )
    if "meta tensor" in str(error):
        # diffusers leaves the weights that the file lacks on the meta device, then fails to cast them.
        return ModelError(
            f"cannot load the {component} from {name}: some of its weights are missing from the file"
        )
    return ModelError(f"cannot load the {component} from {name}: {_first_line(error)}")


class _DropMessages(logging.Filter):
    """Drops log records that start with one of the given texts."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@contextlib.contextmanager
def _without_cast_warning() -> Iterator[None]:
    """Silence diffusers' warning on every ``model.to(dtype)``, which fires even with nothing kept in fp32."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    drop = _DropMessages("There are modules in ")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _check_complete(model: torch.nn.Module, name: str, component: str) -> None:
    """diffusers leaves weights that the file lacks on the meta device, silently; refuse that."""
    missing = [key for key, value in [*model.named_parameters(), *model.named_buffers()] if value.is_meta]
    if missing:
        raise ModelError(
            f"cannot load the {component} from {name}: some of its weights are missing from the file "
            f"({len(missing)}, first {missing[0]})"
        )


def _clip_tensors(checkpoint: _Checkpoint, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP's tensors (transformers' layout) under ``prefix``, as diffusers' conversion expects them."""
    tensors = checkpoint.tensors(prefix)
    # Checkpoints saved with transformers < 4.2x lack the ``text_model.`` level; diffusers needs it.
    nested = prefix + "text_model."
    if not any(key.startswith(nested) for key in tensors):
        tensors = {nested + key[len(prefix) :]: value for key, value in tensors.items()}
    return {key: value for key, value in tensors.items() if not key.endswith("position_ids")}


def _component_classes(family: str) -> dict[str, type]:
    """The model class of each weighted component, by its key in the result (also its config subfolder)."""
    classes: dict[str, type] = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    if family == "sdxl":
        classes["text_encoder_2"] = CLIPTextModelWithProjection
    return classes


def _component_tensors(checkpoint: _Checkpoint, component: str, version: str) -> dict[str, torch.Tensor]:
    """One component's tensors, under their names in the file.

    Each SDXL text encoder gets only its own tensors: diffusers' conversion picks the mapping from
    which encoders' keys are present and compares widths, and two encoders of one width (a small
    test model) would otherwise both be read as CLIP ViT-L.
    """
    if component == "unet":
        return checkpoint.tensors(UNET_PREFIX)
    if component == "vae":
        return checkpoint.tensors(VAE_PREFIX)
    if component == "text_encoder_2":
        return checkpoint.tensors(SDXL_OPEN_CLIP_PREFIX)
    if VERSION_FAMILIES[version] == "sdxl":
        return _clip_tensors(checkpoint, SDXL_CLIP_PREFIX)
    if version == "sd15":
        return _clip_tensors(checkpoint, CLIP_PREFIX)
    return checkpoint.tensors(OPEN_CLIP_PREFIX)


def _load_component(
    model_class: type, tensors: dict[str, torch.Tensor], folder: Path, subfolder: str, torch_dtype: torch.dtype
) -> Any:
    """Build one component with diffusers' own single-file conversion and the folder's config for it."""
    if model_class in (UNet2DConditionModel, AutoencoderKL):
        return model_class.from_single_file(
            tensors, config=str(folder), subfolder=subfolder, local_files_only=True, torch_dtype=torch_dtype
        )
    return single_file_utils.create_diffusers_clip_model_from_ldm(
        model_class,
        tensors,
        subfolder=subfolder,
        config=str(folder),
        torch_dtype=torch_dtype,
        local_files_only=True,
    )


def _is_component_entry(value: Any) -> bool:
    """model_index.json names each component as ``[library, class]`` (``[null, null]`` when left out)."""
    return isinstance(value, list) and len(value) == 2 and all(item is None or isinstance(item, str) for item in value)


def read_pipeline_config(folder: Path) -> dict[str, Any]:
    """The pipeline's own settings in ``folder/model_index.json``, without its component entries.

    For SDXL, ``force_zeros_for_empty_prompt`` (an empty prompt is conditioned on zeros, not on its
    encoding); ``{}`` when the folder has no model_index.json.
    """
    path = folder / "model_index.json"
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"cannot read {path}: {_first_line(error)}") from None
    if not isinstance(index, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return {
        key: value for key, value in index.items() if not key.startswith("_") and not _is_component_entry(value)
    }


def _check_config_folder(folder: Path, needed: list[str], family: str) -> None:
    """Name the missing config subfolders at once, before gigabytes of weights are read for nothing."""
    missing = [name for name in needed if not (folder / name).is_dir()]
    if len(missing) == len(needed):
        raise ModelError(f"no model configs in {folder}")
    if missing:
        raise ModelError(f"{folder} holds no {', '.join(missing)} config, which an {family} checkpoint needs")


def _load_weighted_components(
    checkpoint: _Checkpoint, version: str, folder: Path, torch_dtype: torch.dtype
) -> dict[str, Any]:
    """The UNet, VAE and text encoder(s), one at a time (a component's tensors are freed once it is built).

    Every failure is one line naming the file and the component: a missing tensor, a shape that
    does not fit the config, a tensor the file cannot give.
    """
    name = checkpoint.path.name
    parts: dict[str, Any] = {}
    for component, model_class in _component_classes(VERSION_FAMILIES[version]).items():
        label = component.replace("_", " ")
        try:
            tensors = _component_tensors(checkpoint, component, version)
        except Exception as error:  # a truncated or damaged file fails here, not when opened
            raise ModelError(f"cannot read the {label} weights in {name}: {_first_line(error)}") from None
        if not tensors:
            raise ModelError(f"cannot load the {label} from {name}: the file holds no {label} weights")
        try:
            with _without_cast_warning():
                model = _load_component(model_class, tensors, folder, component, torch_dtype)
        except (ValueError, KeyError, RuntimeError, OSError, TypeError, AttributeError) as error:
            raise _component_error(name, label, error) from None
        except single_file_utils.SingleFileComponentError as error:
            raise _component_error(name, label, error) from None
        del tensors
        _check_complete(model, name, label)
        parts[component] = model.eval()
    return parts


def _load_scheduler(folder: Path, prediction_type: str | None) -> DDPMScheduler:
    """A DDPMScheduler with the folder's training noise schedule (SDXL's Euler config holds the same betas)."""
    try:
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read the scheduler config in {folder}: {_first_line(error)}") from None
    if prediction_type is not None and scheduler.config.get("prediction_type") != prediction_type:
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)
    return scheduler


_NOT_TRANSFORMER = (VAE_PREFIX, FLUX_VAE_PREFIX, "text_encoders.")  # a bare transformer's file: all keys but these


def _flow_component_prefixes(checkpoint: _Checkpoint, family: str, prefix: str) -> dict[str, str]:
    """Where each component that an SD3 or Flux.1 file holds keeps its tensors (by component name; an absent one
    is left out). Names only: the tensors are read one component at a time, as SD files' are."""
    vae_prefix = VAE_PREFIX if _has_prefix(checkpoint.keys, VAE_PREFIX) else FLUX_VAE_PREFIX
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    prefixes = {"transformer": prefix, "vae": vae_prefix, "text_encoder": SD3_CLIP_L_PREFIX, t5: T5_PREFIX}
    if family == "sd3":
        prefixes["text_encoder_2"] = SD3_CLIP_G_PREFIX
    return {
        component: component_prefix for component, component_prefix in prefixes.items()
        if component == "transformer" or _has_prefix(checkpoint.keys, component_prefix)
    }  # fmt: skip


def _flow_tensors(checkpoint: _Checkpoint, component: str, prefix: str) -> dict[str, torch.Tensor]:
    """One component's tensors under their names in the file, as diffusers' converters read them; a bare
    transformer (no prefix, as BFL ship Flux) is every tensor that belongs to no other component."""
    if component == "transformer" and not prefix:
        return {key: checkpoint.tensor(key) for key in checkpoint.keys if not key.startswith(_NOT_TRANSFORMER)}
    return checkpoint.tensors(prefix)


_FLOW_COMPONENT_NAMES = {  # as messages name each family's components
    "sd3": {"transformer": "transformer", "vae": "VAE", "text_encoder": "CLIP-L (text_encoders.clip_l.*)",
            "text_encoder_2": "CLIP-G (text_encoders.clip_g.*)", "text_encoder_3": "T5 (text_encoders.t5xxl.*)"},
    "flux": {"transformer": "transformer", "vae": "VAE", "text_encoder": "CLIP-L (text_encoders.clip_l.*)",
             "text_encoder_2": "T5 (text_encoders.t5xxl.*)"},
}  # fmt: skip


def _flow_classes(family: str) -> dict[str, type]:
    """Each weighted component of an SD3 or Flux.1 file by its config subfolder, in load order."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import T5EncoderModel

    if family == "sd3":
        return {
            "transformer": SD3Transformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModelWithProjection,
            "text_encoder_2": CLIPTextModelWithProjection, "text_encoder_3": T5EncoderModel,
        }  # fmt: skip
    return {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
            "text_encoder_2": T5EncoderModel}  # fmt: skip


def _load_flow_component(
    model_class: type, tensors: dict[str, torch.Tensor], folder: Path, subfolder: str, torch_dtype: torch.dtype
) -> Any:
    """Build one SD3/Flux component with diffusers' own single-file conversion and the folder's config for it."""
    from transformers import T5EncoderModel

    if model_class is T5EncoderModel:
        return single_file_utils.create_diffusers_t5_model_from_checkpoint(
            model_class, tensors, subfolder=subfolder, config=str(folder), torch_dtype=torch_dtype,
            local_files_only=True,
        )  # fmt: skip
    if model_class is CLIPTextModel:
        # Flux's CLIP-L is used without projection; diffusers' SD3 CLIP-L conversion adds an identity one.
        with init_empty_weights():
            model = CLIPTextModel(CLIPTextModel.config_class.from_pretrained(folder / subfolder))
        # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); files have it, or not (older ones)
        level = "text_model." if hasattr(model, "text_model") else ""
        state = {
            level + key[len(SD3_CLIP_L_PREFIX) :].removeprefix("text_model."): value
            for key, value in tensors.items() if not key.endswith("position_ids")
        }  # fmt: skip
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(torch_dtype)
    if hasattr(model_class, "from_single_file"):  # the transformer and the VAE
        return model_class.from_single_file(
            tensors, config=str(folder), subfolder=subfolder, local_files_only=True, torch_dtype=torch_dtype
        )
    return _load_component(model_class, tensors, folder, subfolder, torch_dtype)


def _load_flow_file(
    checkpoint: _Checkpoint, version: str, config_dir: Path | None, torch_dtype: torch.dtype
) -> dict[str, Any]:
    """The components of an all-in-one SD3/SD3.5 or Flux.1 file (see :func:`load_single_file`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import T5TokenizerFast

    name = checkpoint.path.name
    family, prefix = _transformer_prefix(checkpoint) or ("", "")
    label = FLOW_LABELS[family]
    folder = Path(config_dir) if config_dir is not None else MODEL_CONFIGS_DIR / version
    instead = f"pass the model's diffusers folder or hub id instead ({_FLOW_HUB_IDS.get(version, 'org/name')})"
    prefixes = _flow_component_prefixes(checkpoint, family, prefix)
    classes = _flow_classes(family)
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    needed = [component for component in classes if component != t5 or family == "flux"]
    labels = _FLOW_COMPONENT_NAMES[family]
    missing = [labels[component] for component in needed if component not in prefixes]
    if missing:
        raise ModelError(
            f"{name} is a {label} file without its {', '.join(missing)}: {instead}"
        )
    t5_tokenizer = "tokenizer_3" if family == "sd3" else "tokenizer_2"
    if t5 in prefixes and not (folder / t5_tokenizer / "tokenizer_config.json").is_file():
        raise ModelError(
            f"{name} holds T5 weights, but {folder} has no T5 tokenizer ({t5_tokenizer}/): {instead}"
        )
    clip_tokenizers = ["tokenizer", "tokenizer_2"] if family == "sd3" else ["tokenizer"]
    _check_config_folder(folder, [*(c for c in classes if c in prefixes), *clip_tokenizers, "scheduler"], label)
    parts: dict[str, Any] = {t5: None, t5_tokenizer: None}
    for component, model_class in classes.items():
        if component not in prefixes:
            continue
        try:
            component_tensors = _flow_tensors(checkpoint, component, prefixes[component])
        except Exception as error:  # a truncated or damaged file fails here, not when opened
            raise ModelError(f"cannot read the {labels[component]} weights in {name}: {_first_line(error)}") from None
        try:
            with _without_cast_warning():
                model = _load_flow_component(model_class, component_tensors, folder, component, torch_dtype)
        except (ValueError, KeyError, RuntimeError, OSError, TypeError, AttributeError) as error:
            raise _component_error(name, labels[component], error) from None
        except single_file_utils.SingleFileComponentError as error:
            raise _component_error(name, labels[component], error) from None
        del component_tensors
        _check_complete(model, name, labels[component])
        parts[component] = model.eval()
    for tokenizer in clip_tokenizers:
        parts[tokenizer] = load_clip_tokenizer(folder / tokenizer)
    if parts[t5] is not None:
        parts[t5_tokenizer] = T5TokenizerFast.from_pretrained(folder / t5_tokenizer)
    try:
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read the scheduler config in {folder}: {_first_line(error)}") from None
    parts["unet"] = parts.pop("transformer")  # the denoiser's name in ModelComponents
    parts["family"] = family
    parts["pipeline_config"] = read_pipeline_config(folder)
    return parts



def load_single_file(
    path: str | Path,
    torch_dtype: torch.dtype,
    allow_pickle: bool = False,
    config_dir: Path | None = None,
    prediction_type: str | None = None,
) -> dict[str, Any]:
    """Load an original-format SD 1.x/2.x, SDXL, SD3/SD3.5 or Flux.1 checkpoint into diffusers/transformers
    objects, offline.

    Returns ``{"unet", "vae", "text_encoder", "tokenizer", "scheduler", "family", "pipeline_config"}``,
    plus ``"text_encoder_2"`` (CLIPTextModelWithProjection) and ``"tokenizer_2"`` for SDXL.
    ``family`` is ``"sd"`` (SD 1.x/2.x) or ``"sdxl"``; ``pipeline_config`` holds the config folder's
    model_index.json settings that are not components (SDXL: ``force_zeros_for_empty_prompt``).
    The scheduler is a DDPMScheduler carrying the model's training noise schedule and prediction
    type. The config folder is the bundled one for the detected version (``detect_sd_version``), or
    ``config_dir`` (a diffusers-layout folder with a config subfolder per component, tokenizer and
    scheduler). ``prediction_type`` overrides the scheduler's (and picks ``sd2`` vs ``sd2-v``,
    ``sdxl`` vs ``sdxl-v``). Only the UNet's ``model.diffusion_model.*`` weights are used, never
    ``model_ema.*`` copies, as diffusers does by default.

    An SD3/SD3.5 or Flux.1 file gives ``family`` ``"sd3"`` or ``"flux"``, its transformer as ``"unet"``
    (the denoiser's name in ModelComponents), ``text_encoder_2``/``tokenizer_2`` (SD3's CLIP-G, Flux's
    T5), for SD3 ``text_encoder_3``/``tokenizer_3`` (T5, None when the file has none), and a
    FlowMatchEulerDiscreteScheduler; ``prediction_type`` does not apply to them (InputError). Such a
    file must hold every component but SD3's T5 (a transformer-only Flux file, an SD3 file without its
    CLIPs are refused in one line that names the diffusers repo to use instead), and T5 weights need a
    T5 tokenizer in the config folder, which the shipped ones lack (see the module docstring).

    Raises InputError for a pickle (``.ckpt``/``.pt``/``.pth``/``.bin``) unless ``allow_pickle``, and
    ModelError, with one line, for an unreadable file or one that is not an SD 1.x/2.x or SDXL base
    checkpoint.
    """
    normalized = normalize_prediction_type(prediction_type)
    with _open_checkpoint(path, allow_pickle) as checkpoint:
        flow_version = _detect_flow(checkpoint, has_configs=config_dir is not None)
        if flow_version is not None:
            if normalized is not None:
                family = FLOW_LABELS[VERSION_FAMILIES.get(flow_version) or _transformer_prefix(checkpoint)[0]]
                raise InputError(f"{family} models predict a flow velocity: --prediction-type does not apply")
            return _load_flow_file(checkpoint, flow_version, config_dir, torch_dtype)
        version = _detect(checkpoint, normalized)
        family = VERSION_FAMILIES[version]
        folder = Path(config_dir) if config_dir is not None else MODEL_CONFIGS_DIR / version
        tokenizers = ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"]
        _check_config_folder(folder, [*_component_classes(family), *tokenizers, "scheduler"], family)
        pipeline_config = read_pipeline_config(folder)
        parts = _load_weighted_components(checkpoint, version, folder, torch_dtype)
    for tokenizer in tokenizers:
        parts[tokenizer] = load_clip_tokenizer(folder / tokenizer)
    parts["scheduler"] = _load_scheduler(folder, normalized)
    parts["family"] = family
    parts["pipeline_config"] = pipeline_config
    return parts


# ---------------------------------------------------------------------------------------------
# A standalone VAE file

_DIFFUSERS_VAE_MARKERS = ("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.", "decoder.mid_block.")
# diffusers < 0.14 named the VAE's attention projections differently; files saved then still circulate.
_OLD_DIFFUSERS_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _vae_tensors(checkpoint: _Checkpoint) -> dict[str, torch.Tensor]:
    """The VAE's tensors without a ``first_stage_model.``/``vae.`` prefix (a full checkpoint has one)."""
    for prefix in single_file_utils.LDM_VAE_KEYS:
        if _has_prefix(checkpoint.keys, prefix):
            return {key[len(prefix) :]: value for key, value in checkpoint.tensors(prefix).items()}
    return checkpoint.tensors("")


def _vae_state_dict(tensors: dict[str, torch.Tensor], vae_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors in diffusers' AutoencoderKL layout, converted by diffusers when in the original one."""
    if not any(key.startswith(_DIFFUSERS_VAE_MARKERS) for key in tensors):
        return single_file_utils.convert_ldm_vae_checkpoint(tensors, dict(vae_config))
    state = {}
    for key, value in tensors.items():
        if ".attentions." in key:
            for old, new in _OLD_DIFFUSERS_ATTENTION.items():
                key = key.replace(old, new)
        state[key] = value
    return state


def _vae_misfit(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` from loading strictly into ``model``, in a few words; None if it fits."""
    expected = model.state_dict()
    if not state:
        return "it holds no VAE weights (encoder.*, decoder.*)"
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            return f"{key} has shape {list(value.shape)}, the model expects {list(expected[key].shape)}"
    missing = [key for key in expected if key not in state]
    if missing:
        return f"it lacks {len(missing)} of the model's {len(expected)} VAE weights (first {missing[0]})"
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        return f"it holds {len(unexpected)} weights that the model's VAE does not have (first {unexpected[0]})"
    return None


def load_single_file_vae(
    path: str | Path, vae_config: Mapping[str, Any], torch_dtype: torch.dtype, allow_pickle: bool = False
) -> AutoencoderKL:
    """Load a standalone VAE file into the model's VAE architecture (``vae_config``), offline.

    For swapping in a fixed or fine-tuned VAE: ``sdxl_vae.safetensors``, the fp16-fix
    ``sdxl.vae.safetensors``, ``vae-ft-mse-840000-ema-pruned.safetensors``. The file may be in the
    original layout (with or without the ``first_stage_model.`` prefix, so a full checkpoint's VAE
    also loads) or already in diffusers' layout; the original one is converted with diffusers'
    ``convert_ldm_vae_checkpoint``. The load is strict: the file's weights must be exactly the
    architecture's, else a one-line ModelError says what does not fit. The weights alone cannot tell
    an SD VAE from an SDXL one (same architecture), so that is the caller's to get right.
    """
    with _open_checkpoint(path, allow_pickle) as checkpoint:
        name = checkpoint.path.name
        try:
            tensors = _vae_tensors(checkpoint)
        except Exception as error:  # a truncated or damaged file fails here, not when opened
            raise ModelError(f"cannot read the VAE weights in {name}: {_first_line(error)}") from None
    try:
        state = _vae_state_dict(tensors, vae_config)
    except (KeyError, IndexError, ValueError) as error:
        raise ModelError(f"{name} is not a VAE for this model: {_first_line(error)}") from None
    with init_empty_weights():
        model = AutoencoderKL.from_config(dict(vae_config))
    misfit = _vae_misfit(model, state)
    if misfit is not None:
        raise ModelError(f"{name} is not a VAE for this model: {misfit}")
    model.load_state_dict(state, strict=True, assign=True)
    _check_complete(model, name, "VAE")
    with _without_cast_warning():
        return model.to(torch_dtype).eval()
