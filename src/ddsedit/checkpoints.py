"""Loading original-format Stable Diffusion 1.x / 2.x single-file checkpoints, fully offline.

A single-file checkpoint (``v1-5-pruned-emaonly.safetensors``, ``v2-1_768-ema-pruned.safetensors``,
a fine-tune saved the same way) holds the UNet under ``model.diffusion_model.*``, the VAE under
``first_stage_model.*`` and the text encoder under ``cond_stage_model.*``, but no configuration.
diffusers normally fetches the matching diffusers configs from the Hugging Face Hub; ddsedit ships
them instead, in ``model_configs/``:

* ``sd15``  - stable-diffusion-v1-5/stable-diffusion-v1-5 (CLIP ViT-L/14 text encoder, epsilon, 512);
* ``sd2``   - stabilityai/stable-diffusion-2-1-base (OpenCLIP ViT-H/14, epsilon, 512);
* ``sd2-v`` - stabilityai/stable-diffusion-2-1 (OpenCLIP ViT-H/14, v-prediction, 768);
* ``clip_bpe`` - the byte-level BPE vocabulary and merges that both tokenizers use (gzipped;
  ``scripts/make_clip_bpe.py`` derives them from OpenAI's published merge list).

Each component is then built with diffusers' own single-file conversion code, pointed at the
bundled config folder, so the weights are mapped exactly as ``from_single_file`` maps them.

Which config folder a checkpoint gets (``detect_sd_version``), from its tensor names and shapes:

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTokenizer

from ddsedit.errors import InputError, ModelError
from ddsedit.formats import PICKLE_SUFFIXES

MODEL_CONFIGS_DIR = Path(__file__).parent / "model_configs"
CLIP_BPE_DIR = MODEL_CONFIGS_DIR / "clip_bpe"
SD_VERSIONS = ("sd15", "sd2", "sd2-v")
CLIP_VOCAB_SIZE = 49408

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP, transformers' layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP's own layout
SDXL_PREFIX = "conditioner.embedders."
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


def _detect(checkpoint: _Checkpoint, prediction_type: str | None) -> str:
    name = checkpoint.path.name
    keys = checkpoint.keys
    if any(key.startswith(SDXL_PREFIX) for key in keys):
        raise ModelError(f"{name} is an SDXL checkpoint; ddsedit loads Stable Diffusion 1.x and 2.x files")
    unet_keys = [key for key in keys if key.startswith(UNET_PREFIX)]
    if not unet_keys:
        raise ModelError(
            f"{name} is not a Stable Diffusion 1.x/2.x checkpoint: it holds no UNet weights "
            f"({UNET_PREFIX}*); for a diffusers folder, pass the folder instead"
        )
    conv_in = checkpoint.shape(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelError(
            f"{name} has a UNet with {conv_in[1]} input channels (an inpainting, depth, upscaling or "
            "instruct-pix2pix model); ddsedit needs a text-to-image SD 1.x/2.x checkpoint"
        )
    context_width = None
    for key in unet_keys:
        if key.endswith(".attn2.to_k.weight"):
            shape = checkpoint.shape(key)
            context_width = shape[-1] if shape else None
            break
    has_clip = any(key.startswith(CLIP_PREFIX) for key in keys)
    has_open_clip = any(key.startswith(OPEN_CLIP_PREFIX) for key in keys)
    if has_open_clip and not has_clip:
        family = "sd2"
    elif has_clip and not has_open_clip:
        family = "sd15"
    elif context_width in (768, 1024):
        family = "sd15" if context_width == 768 else "sd2"
    else:
        raise ModelError(
            f"{name}: cannot tell whether this is an SD 1.x or 2.x checkpoint (no text encoder found)"
        )
    if context_width in (768, 1024) and context_width != (768 if family == "sd15" else 1024):
        raise ModelError(
            f"{name}: its text encoder is SD {'1.x' if family == 'sd15' else '2.x'}'s but its UNet "
            f"attends to {context_width}-wide text features; the file mixes two models"
        )
    if family == "sd15":
        return "sd15"
    chosen = prediction_type or _sd2_prediction_type(checkpoint)
    return "sd2-v" if chosen == "v_prediction" else "sd2"


def detect_sd_version(
    path: str | Path, prediction_type: str | None = None, allow_pickle: bool = False
) -> str:
    """``"sd15"``, ``"sd2"`` (epsilon, 512) or ``"sd2-v"`` (v-prediction, 768) for a checkpoint.

    Reads only tensor names, shapes and metadata from a ``.safetensors`` file (a pickle is loaded
    whole, and only with ``allow_pickle``). ``prediction_type`` (``epsilon``/``v_prediction``)
    overrides the guess between ``sd2`` and ``sd2-v``; see the module docstring for the rules.
    Raises InputError (missing file, refused pickle) or ModelError (not an SD 1.x/2.x checkpoint).
    """
    normalized = normalize_prediction_type(prediction_type)
    with _open_checkpoint(path, allow_pickle) as checkpoint:
        return _detect(checkpoint, normalized)


# ---------------------------------------------------------------------------------------------
# Loading


def _component_error(name: str, component: str, error: BaseException) -> ModelError:
    mismatch = _SHAPE_MISMATCH.search(str(error))
    if mismatch:
        tensor, expected, got = mismatch.groups()
        return ModelError(
            f"cannot load the {component} from {name}: {tensor} has shape {got}, the architecture expects "
            f"{expected} (not a standard SD 1.x/2.x checkpoint?)"
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


def _text_encoder_tensors(checkpoint: _Checkpoint, family: str) -> dict[str, torch.Tensor]:
    if family != "sd15":
        return checkpoint.tensors(OPEN_CLIP_PREFIX)
    tensors = checkpoint.tensors(CLIP_PREFIX)
    # Checkpoints saved with transformers < 4.2x lack the ``text_model.`` level; diffusers needs it.
    nested = CLIP_PREFIX + "text_model."
    if not any(key.startswith(nested) for key in tensors):
        tensors = {nested + key[len(CLIP_PREFIX) :]: value for key, value in tensors.items()}
    return {key: value for key, value in tensors.items() if not key.endswith("position_ids")}


def _load_unet(tensors: dict[str, torch.Tensor], folder: Path, torch_dtype: torch.dtype) -> Any:
    return UNet2DConditionModel.from_single_file(
        tensors, config=str(folder), subfolder="unet", local_files_only=True, torch_dtype=torch_dtype
    )


def _load_vae(tensors: dict[str, torch.Tensor], folder: Path, torch_dtype: torch.dtype) -> Any:
    return AutoencoderKL.from_single_file(
        tensors, config=str(folder), subfolder="vae", local_files_only=True, torch_dtype=torch_dtype
    )


def _load_text_encoder(tensors: dict[str, torch.Tensor], folder: Path, torch_dtype: torch.dtype) -> Any:
    return single_file_utils.create_diffusers_clip_model_from_ldm(
        CLIPTextModel,
        tensors,
        subfolder="text_encoder",
        config=str(folder),
        torch_dtype=torch_dtype,
        local_files_only=True,
    )


def load_single_file(
    path: str | Path,
    torch_dtype: torch.dtype,
    allow_pickle: bool = False,
    config_dir: Path | None = None,
    prediction_type: str | None = None,
) -> dict[str, Any]:
    """Load an original-format SD 1.x/2.x checkpoint into diffusers/transformers objects, offline.

    Returns ``{"unet", "vae", "text_encoder", "tokenizer", "scheduler"}``; the scheduler is a
    DDPMScheduler carrying the model's training noise schedule and prediction type. The config
    folder is the bundled one for the detected version (``detect_sd_version``), or ``config_dir``
    (a diffusers-layout folder with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
    ``scheduler/`` configs). ``prediction_type`` overrides the scheduler's (and picks ``sd2`` vs
    ``sd2-v``). Only the UNet's ``model.diffusion_model.*`` weights are used, never ``model_ema.*``
    copies, as diffusers does by default.

    Raises InputError for a pickle (``.ckpt``/``.pt``/``.pth``/``.bin``) unless ``allow_pickle``, and
    ModelError, with one line, for an unreadable file or one that is not an SD 1.x/2.x checkpoint.
    """
    normalized = normalize_prediction_type(prediction_type)
    with _open_checkpoint(path, allow_pickle) as checkpoint:
        version = _detect(checkpoint, normalized)
        folder = Path(config_dir) if config_dir is not None else MODEL_CONFIGS_DIR / version
        if not (folder / "unet").is_dir():
            raise ModelError(f"no model configs in {folder}")
        name = checkpoint.path.name
        family = "sd15" if version == "sd15" else "sd2"
        parts: dict[str, Any] = {}
        for component, prefix, load in (
            ("unet", UNET_PREFIX, _load_unet),
            ("vae", VAE_PREFIX, _load_vae),
            ("text_encoder", None, _load_text_encoder),
        ):
            label = component.replace("_", " ")
            try:
                if prefix is None:
                    tensors = _text_encoder_tensors(checkpoint, family)
                else:
                    tensors = checkpoint.tensors(prefix)
            except Exception as error:  # a truncated or damaged file fails here, not when opened
                raise ModelError(f"cannot read the {label} weights in {name}: {_first_line(error)}") from None
            if not tensors:
                raise ModelError(f"cannot load the {label} from {name}: the file holds no {label} weights")
            try:
                with _without_cast_warning():
                    model = load(tensors, folder, torch_dtype)
            except (ValueError, KeyError, RuntimeError, OSError, TypeError, AttributeError) as error:
                raise _component_error(name, label, error) from None
            except single_file_utils.SingleFileComponentError as error:
                raise _component_error(name, label, error) from None
            del tensors
            _check_complete(model, name, label)
            parts[component] = model.eval()
    parts["tokenizer"] = load_clip_tokenizer(folder / "tokenizer")
    try:
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read the scheduler config in {folder}: {_first_line(error)}") from None
    if normalized is not None and scheduler.config.get("prediction_type") != normalized:
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=normalized)
    parts["scheduler"] = scheduler
    return {key: parts[key] for key in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
