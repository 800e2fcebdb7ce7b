"""Finding and loading a Stable Diffusion-format model, and choosing device and dtype.

A model is named by one of:
- a bundled model's name (``shapes``), shipped inside the package;
- a diffusers folder (``model_index.json`` or ``unet/config.json`` inside);
- a single-file checkpoint (``.safetensors``; pickles only with ``allow_pickle``);
- a Hugging Face hub id (``org/name``), taken from the local cache first.
Each component is loaded on its own, so no safety checker or image processor is
imported, and nothing is downloaded unless the user named a hub id that is not cached.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddsedit.errors import InputError, ModelError
from ddsedit.families import DEFAULT_FAMILY, FAMILIES, VELOCITY, Family, family_of_pipeline
from ddsedit.formats import PICKLE_SUFFIXES
from ddsedit.names import DEFAULT_PREDICTION_TYPE, PREDICTION_TYPES

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MODEL_ENVIRONMENT_VARIABLE = "DDSEDIT_MODEL"
BUNDLED_MODELS_DIR = Path(__file__).parent / "bundled"
DEFAULTS_FILE = "ddsedit.json"  # edit defaults stored beside a model's weights
# The weighted components a family's folder loader may read, and the stem of their weight files (diffusers' and
# transformers' own names). Hub repos of SD3 and Flux.1 also carry the whole model as one big file at the root
# (``sd3.5_large.safetensors``, ``flux1-dev.safetensors``) and a ``text_encoders/`` folder of single files: no
# pattern below matches those, so a download fetches each weight once, in the layout the loaders read.
WEIGHTED_COMPONENTS = {
    "unet": "diffusion_pytorch_model",
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
    "text_encoder_3": "model",
}
MODEL_FILES = (
    "model_index.json",
    *(f"{component}/config.json" for component in WEIGHTED_COMPONENTS),
    "tokenizer/*",
    "tokenizer_2/*",  # SDXL's and SD3's second CLIP tokenizer, Flux's T5 tokenizer (spiece.model, tokenizer.json)
    "tokenizer_3/*",  # SD3's T5 tokenizer
    "scheduler/scheduler_config.json",
    DEFAULTS_FILE,
)  # the small files of a diffusers folder, whatever its family
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors")  # a hub VAE (e.g. madebyollin/sdxl-vae-fp16-fix)
DTYPES = ("auto", "fp16", "bf16", "fp32")
_FP16_WEIGHTS = re.compile(r"\.fp16(-\d+-of-\d+)?\.safetensors$")  # a single file or a shard


def weights_patterns(component: str, variant: str | None = None) -> tuple[str, ...]:
    """The hub file patterns of one component's weights: a single file, or shards and their index (big
    transformers and T5 are sharded), plain or of a variant (``fp16``: ``model.fp16.safetensors``,
    ``model.fp16-00001-of-00002.safetensors``, ``model.safetensors.index.fp16.json``, as diffusers and transformers
    name them)."""
    stem = f"{component}/{WEIGHTED_COMPONENTS[component]}"
    if variant is None:
        return f"{stem}.safetensors", f"{stem}-*-of-*.safetensors", f"{stem}.safetensors.index.json"
    return (
        f"{stem}.{variant}.safetensors",
        f"{stem}.{variant}-*-of-*.safetensors",
        f"{stem}.safetensors.index.{variant}.json",
    )


def model_file_patterns(variants: dict[str, str | None] | None = None) -> tuple[str, ...]:
    """The hub file patterns of everything a folder loader reads, each component's weights plain or of the
    variant in ``variants`` (by component name). Components a repo does not have match nothing."""
    variants = variants or {}
    weights = [weights_patterns(component, variants.get(component)) for component in WEIGHTED_COMPONENTS]
    return (*MODEL_FILES, *(pattern for patterns in weights for pattern in patterns))


COMPONENT_FILES = model_file_patterns()  # what a download fetches: the plain weights of every component
SDXL_REFINER_MESSAGE = (
    "{name} is the SDXL refiner (one text encoder, image-to-image only); ddsedit needs an SDXL base model "
    "or a fine-tune of it"
)


@dataclass
class ModelComponents:
    """The parts of a pipeline that editing needs, plus where they came from."""

    unet: Any  # the denoiser: a UNet, or a flow family's transformer
    vae: Any
    text_encoder: Any
    tokenizer: Any
    alphas_cumprod: Any  # torch.Tensor [num_train_timesteps], fp32; None for flow-matching families
    prediction_type: str
    source: str  # how the user named the model
    identity: str = ""  # the resolved model (see model_identity): what outputs record and batch resume compares
    defaults: dict[str, Any] = field(default_factory=dict)
    defaults_source: str = DEFAULTS_FILE  # where ``defaults`` came from, as errors name it
    scheduler_config: dict[str, Any] = field(default_factory=dict)  # the scheduler's config (PDS's grid)
    betas: Any = None  # torch.Tensor [num_train_timesteps], the one-step betas (PDS's posterior)
    family: Family = field(default_factory=lambda: FAMILIES[DEFAULT_FAMILY])
    text_encoder_2: Any = None  # SDXL's and SD3's second text encoder (with projection), Flux's T5; tokenizer
    tokenizer_2: Any = None
    text_encoder_3: Any = None  # SD3's T5 and its tokenizer
    tokenizer_3: Any = None
    # The family's text encoders this model has none of (SD3 loaded without T5), as against freed ones.
    absent_text_encoders: tuple[str, ...] = ()
    pipeline_config: dict[str, Any] = field(default_factory=dict)  # model_index.json's settings (not components)
    vae_identity: str | None = None  # the VAE given in place of the model's own (see model_identity), if any

    def free_text_encoders(self) -> None:
        """Drop the family's text encoders (prompts encoded so far stay cached by the editor)."""
        for name in self.family.text_encoders:
            setattr(self, name, None)

    @property
    def text_encoders_loaded(self) -> bool:
        return all(
            getattr(self, name) is not None for name in self.family.text_encoders
            if name not in self.absent_text_encoders
        )  # fmt: skip

    @property
    def vae_scale_factor(self) -> int:
        """The latent stride, from the VAE's config (8 for SD, other values for small models)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def num_train_timesteps(self) -> int:
        if self.alphas_cumprod is None:  # a flow scheduler
            return int(self.scheduler_config.get("num_train_timesteps", 1000))
        return int(self.alphas_cumprod.shape[0])


def bundled_models() -> dict[str, Path]:
    """Names and folders of the models shipped inside the package."""
    if not BUNDLED_MODELS_DIR.is_dir():
        return {}
    return {
        folder.name: folder
        for folder in sorted(BUNDLED_MODELS_DIR.iterdir())
        if (folder / "model_index.json").is_file()
    }


def default_model() -> str:
    """The model used when none is named: ``$DDSEDIT_MODEL`` or SD 1.5."""
    return os.environ.get(MODEL_ENVIRONMENT_VARIABLE) or DEFAULT_MODEL


def resolve_device(device: str = "auto"):
    """``auto`` picks cuda, then mps, then cpu; an absent accelerator is an InputError."""
    import torch

    device = device.strip().lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}: use auto, cuda, cuda:N, mps or cpu") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for, but CUDA is not available on this machine")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif chosen.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise InputError("--device mps was asked for, but MPS is not available on this machine")
    elif chosen.type != "cpu":
        raise InputError(f"unknown device {device!r}: use auto, cuda, cuda:N, mps or cpu")
    return chosen


def resolve_dtype(dtype: str, device):
    """``auto`` is fp16 on an accelerator and fp32 on the CPU."""
    import torch

    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    dtype = dtype.strip().lower()
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if dtype not in names:
        raise InputError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return names[dtype]


def _is_diffusers_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / "unet" / "config.json").is_file()


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def locate_model(model: str | os.PathLike | None, allow_pickle: bool = False) -> tuple[str, Path]:
    """Turn the user's model name into ``(kind, path)``: kind is ``folder`` or ``file``.

    Hub ids are looked up in the local Hugging Face cache (and downloaded, visibly, only
    when not cached and not offline). Raises InputError/ModelError with one clear line.
    """
    name = str(model) if model is not None else default_model()
    if not name.strip():
        raise InputError("--model is empty")
    bundled = bundled_models()
    if name in bundled:
        return "folder", bundled[name]
    path = Path(name).expanduser()
    if path.is_dir():
        if not _is_diffusers_folder(path):
            raise ModelError(f"{path} is not a diffusers model folder (no model_index.json or unet/config.json inside)")
        return "folder", path
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            raise InputError(
                f"{path} is a pickle checkpoint, which can run code when loaded; "
                "pass --allow-pickle if you trust it, or convert it to .safetensors"
            )
        if path.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES):
            raise ModelError(f"{path} is not a model: expected a .safetensors file or a diffusers folder")
        return "file", path
    if _looks_like_hub_id(name) and not path.suffix:
        if path.parent.is_dir():
            # `runs/typo` next to a real `runs/` folder is far more likely a mistyped path than a hub id:
            # use the cache if it holds that id, but never start a download for it.
            cached = _cached_snapshot(name)
            if cached is None:
                raise ModelError(
                    f"no model folder {path} (the folder {path.parent} exists here, but not {path.name} in it); "
                    f"nor is {name!r} a hub id in the local cache"
                )
            return "folder", cached
        return "folder", _hub_snapshot(name)
    known = ", ".join(bundled) or "none installed"
    raise ModelError(f"unknown model {name!r}: not a file, a folder, a bundled model ({known}) or a hub id (org/name)")


def model_identity(model: str | os.PathLike | None, kind: str, path: Path) -> str:
    """The model an edit ran on, independent of how it was typed: what outputs record as ``model``.

    A bundled model is ``bundled:<name>`` (its folder moves with every install); a hub model is
    ``<org/name>@<revision>`` (the snapshot folder is named for the commit); anything else is the
    absolute, symlink-resolved path of the folder or file. ``kind`` and ``path`` come from
    :func:`locate_model`.
    """
    name = str(model) if model is not None else default_model()
    bundled = bundled_models()
    if name in bundled and bundled[name] == path:
        return f"bundled:{name}"
    resolved = path.resolve()
    if kind == "folder" and resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        repo_id = resolved.parent.parent.name.removeprefix("models--").replace("--", "/")
        return f"{repo_id}@{resolved.name}"
    return str(resolved)


def _cached_snapshot(repo_id: str, patterns: tuple[str, ...] = COMPONENT_FILES) -> Path | None:
    """The local folder of a hub model if the Hugging Face cache holds it, else None.

    huggingface_hub refuses a snapshot that lacks a file its cached listing of the repo matches (an interrupted
    download, say), so the patterns name only what the loader reads. For a model (the default patterns), a cache
    filled by diffusers with ``variant="fp16"`` holds some components' weights only as fp16 files: those
    components are then looked for in that variant, which is also the one :func:`weights_variant` loads.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return _local_snapshot(repo_id, patterns)
    except LocalEntryNotFoundError as error:
        incomplete = getattr(error, "snapshot_path", None)  # IncompleteSnapshotError (huggingface_hub >= 1.x)
    except (FileNotFoundError, OSError, ValueError):
        return None
    if incomplete is None or patterns != COMPONENT_FILES:
        return None
    variants = {component: weights_variant(Path(incomplete) / component) for component in WEIGHTED_COMPONENTS}
    if not any(variants.values()):
        return None
    try:
        return _local_snapshot(repo_id, model_file_patterns(variants))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def _local_snapshot(repo_id: str, patterns: tuple[str, ...]) -> Path:
    """The cached snapshot folder of ``repo_id``, never the network; raises huggingface_hub's errors."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=list(patterns), local_files_only=True))


def _hub_snapshot(repo_id: str, patterns: tuple[str, ...] = COMPONENT_FILES) -> Path:
    """The local folder of a hub model, from the cache; downloads only when online and asked."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    cached = _cached_snapshot(repo_id, patterns)
    if cached is not None:
        return cached
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    how = (
        f"download it where there is network access with `hf download {repo_id}` "
        "(the cache is shared through HF_HOME), or pass --model with a local folder or .safetensors file"
    )
    if offline:
        raise ModelError(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {how}")
    print(f"ddsedit: downloading {repo_id} from the Hugging Face Hub (first use only)", file=sys.stderr)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except (HfHubHTTPError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(
            f"model {repo_id!r} is not cached here and could not be downloaded ({reason}): {how}"
        ) from None


def read_defaults(folder: Path) -> dict[str, Any]:
    """The edit defaults stored with a model (``ddsedit.json``), or an empty dict."""
    defaults_path = folder / DEFAULTS_FILE
    if not defaults_path.is_file():
        return {}
    try:
        defaults = json.loads(defaults_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"cannot read {defaults_path}: {error}") from None
    if not isinstance(defaults, dict):
        raise ModelError(f"{defaults_path} must hold a JSON object")
    return defaults


def read_model_index(folder: Path) -> dict[str, Any]:
    """A diffusers folder's model_index.json, or {} when it has none."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        return {}
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read {index_path}: {error}") from None
    if not isinstance(index, dict):
        raise ModelError(f"{index_path} must hold a JSON object")
    return index


def pipeline_settings(index: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's own settings in a model_index.json (``force_zeros_for_empty_prompt``...), not its
    components (``[library, class]`` pairs) or the ``_``-prefixed bookkeeping."""
    return {
        key: value for key, value in index.items()
        if not key.startswith("_") and not (isinstance(value, list) and len(value) == 2)
    }  # fmt: skip


def folder_family(folder: Path) -> Family:
    """The family of a diffusers folder, from its model_index.json's pipeline class (none: SD 1.x/2.x).

    Raises:
        ModelError: the folder holds a pipeline of a family ddsedit does not support (yet), the SDXL refiner,
            or an unreadable index.
    """
    index = read_model_index(folder)
    class_name = index.get("_class_name")
    family = family_of_pipeline(class_name if isinstance(class_name, str) else None)
    one_text_encoder = "text_encoder" in index and index["text_encoder"] in (None, [None, None])
    if family.name == "sdxl" and (index.get("requires_aesthetics_score") or one_text_encoder):
        raise ModelError(SDXL_REFINER_MESSAGE.format(name=folder))
    return family


def model_family(kind: str, path: Path) -> Family:
    """The family of a located model (:func:`locate_model`), read without loading weights: a folder's
    model_index.json, a ``.safetensors`` file's header; a pickle or an unreadable file is taken as SD 1.x/2.x
    (its load then tells the truth, or reports the problem).

    Raises:
        ModelError: the model is of a family ddsedit does not support (yet).
    """
    if kind == "folder":
        return folder_family(path)
    if path.suffix.lower() != ".safetensors":
        return FAMILIES[DEFAULT_FAMILY]
    from ddsedit.checkpoints import VERSION_FAMILIES, detect_sd_version
    from ddsedit.errors import DDSEditError

    try:
        name = VERSION_FAMILIES[detect_sd_version(path)]
    except DDSEditError:
        return FAMILIES[DEFAULT_FAMILY]
    return family_named(name)


def family_named(name: str) -> Family:
    """The family called ``name`` (as single-file loading names them)."""
    if name not in FAMILIES:
        known = ", ".join(family.label for family in FAMILIES.values())
        raise ModelError(f"{name} models are not supported (supported: {known})")
    return FAMILIES[name]


def _load_components(folder: Path, label: str, loaders: dict[str, Any]) -> dict[str, Any]:
    """Each ``name: loader(folder, name)`` of a diffusers folder, after checking every subfolder is there."""
    missing = [name for name in loaders if not (folder / name).is_dir()]
    if missing:
        raise ModelError(f"{folder} is not a complete {label} model: missing {', '.join(missing)}/")
    try:
        return {name: load(name) for name, load in loaders.items()}
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"cannot load the model in {folder}: {reason}") from None


def weights_variant(folder: Path) -> str | None:
    """``"fp16"`` when a component folder holds only fp16-variant weights (``*.fp16.safetensors``, or shards
    ``*.fp16-00001-of-00002.safetensors``, as hub downloads with ``variant="fp16"`` leave them), else None: the
    plain weights."""
    names = [path.name for path in folder.glob("*.safetensors")] if folder.is_dir() else []
    if names and all(_FP16_WEIGHTS.search(name) for name in names):
        return "fp16"
    return None


def _pretrained(model_class: Any, folder: Path, name: str, torch_dtype) -> Any:
    """A component's weights from its subfolder, in ``torch_dtype``, from the fp16 variant if that is all there is."""
    return model_class.from_pretrained(folder, subfolder=name, torch_dtype=torch_dtype,
                                       variant=weights_variant(folder / name))  # fmt: skip


def load_sd_folder(folder: Path, torch_dtype) -> dict[str, Any]:
    """An SD 1.x/2.x diffusers folder's UNet, VAE, text encoder, tokenizer and noise schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return _load_components(folder, "Stable Diffusion", {
        "unet": lambda name: _pretrained(UNet2DConditionModel, folder, name, torch_dtype),
        "vae": lambda name: _pretrained(AutoencoderKL, folder, name, torch_dtype),
        "text_encoder": lambda name: _pretrained(CLIPTextModel, folder, name, torch_dtype),
        "tokenizer": lambda name: CLIPTokenizer.from_pretrained(folder, subfolder=name),
        # The noise schedule only: DDPMScheduler reads any of these schedulers' configs (PNDM, DDIM, Euler...).
        "scheduler": lambda name: DDPMScheduler.from_pretrained(folder, subfolder=name),
    })  # fmt: skip


def load_sdxl_folder(folder: Path, torch_dtype) -> dict[str, Any]:
    """An SDXL diffusers folder: SD's components plus the second text encoder (with projection) and tokenizer."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    parts = load_sd_folder(folder, torch_dtype)
    parts.update(_load_components(folder, "Stable Diffusion XL", {
        "text_encoder_2": lambda name: _pretrained(CLIPTextModelWithProjection, folder, name, torch_dtype),
        "tokenizer_2": lambda name: CLIPTokenizer.from_pretrained(folder, subfolder=name),
    }))  # fmt: skip
    return parts


def load_sd3_folder(folder: Path, torch_dtype) -> dict[str, Any]:
    """An SD3/SD3.5 diffusers folder: the transformer (as ``unet``, the denoiser's name in ModelComponents), VAE,
    CLIP-L and CLIP-G (both with projections), T5 and the three tokenizers, and the flow-matching scheduler.

    T5 is optional, as in the pipeline: a folder without ``text_encoder_3/`` (left out of a download to save
    memory, or saved from a pipeline loaded without it) gives ``text_encoder_3`` and ``tokenizer_3`` None.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    loaders = {
        "transformer": lambda name: _pretrained(SD3Transformer2DModel, folder, name, torch_dtype),
        "vae": lambda name: _pretrained(AutoencoderKL, folder, name, torch_dtype),
        "text_encoder": lambda name: _pretrained(CLIPTextModelWithProjection, folder, name, torch_dtype),
        "text_encoder_2": lambda name: _pretrained(CLIPTextModelWithProjection, folder, name, torch_dtype),
        "tokenizer": lambda name: CLIPTokenizer.from_pretrained(folder, subfolder=name),
        "tokenizer_2": lambda name: CLIPTokenizer.from_pretrained(folder, subfolder=name),
        "scheduler": lambda name: FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder=name),
    }
    if (folder / "text_encoder_3").is_dir():
        loaders["text_encoder_3"] = lambda name: _pretrained(T5EncoderModel, folder, name, torch_dtype)
        loaders["tokenizer_3"] = lambda name: T5TokenizerFast.from_pretrained(folder, subfolder=name)
    parts = {"text_encoder_3": None, "tokenizer_3": None, **_load_components(folder, "Stable Diffusion 3", loaders)}
    parts["unet"] = parts.pop("transformer")
    return parts


def load_flux_folder(folder: Path, torch_dtype) -> dict[str, Any]:
    """A Flux.1 diffusers folder: the transformer (as ``unet``), VAE, CLIP-L (its pooled output only) and T5 with
    their tokenizers, and the flow-matching scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    parts = _load_components(folder, "Flux.1", {
        "transformer": lambda name: _pretrained(FluxTransformer2DModel, folder, name, torch_dtype),
        "vae": lambda name: _pretrained(AutoencoderKL, folder, name, torch_dtype),
        "text_encoder": lambda name: _pretrained(CLIPTextModel, folder, name, torch_dtype),
        "text_encoder_2": lambda name: _pretrained(T5EncoderModel, folder, name, torch_dtype),
        "tokenizer": lambda name: CLIPTokenizer.from_pretrained(folder, subfolder=name),
        "tokenizer_2": lambda name: T5TokenizerFast.from_pretrained(folder, subfolder=name),
        "scheduler": lambda name: FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder=name),
    })  # fmt: skip
    parts["unet"] = parts.pop("transformer")
    return parts


def load_vae(vae: str | os.PathLike, vae_config: dict[str, Any], torch_dtype, allow_pickle: bool = False) -> Any:
    """A VAE to use in place of the model's own: a diffusers VAE folder (``config.json`` inside, or a model
    folder with ``vae/``), a single file (original or diffusers layout, read with the model's VAE config), or
    a hub id (from the cache, as models are).

    Raises:
        InputError / ModelError: one line, for a missing, unreadable or ill-fitting VAE.
    """
    from diffusers import AutoencoderKL

    name = str(vae)
    if not name.strip():
        raise InputError("--vae is empty")
    path = Path(name).expanduser()
    if path.is_file():
        from ddsedit.checkpoints import load_single_file_vae

        return load_single_file_vae(path, vae_config, torch_dtype, allow_pickle=allow_pickle)
    if not path.is_dir():
        if not (_looks_like_hub_id(name) and not path.suffix and not path.parent.is_dir()):
            raise InputError(f"--vae {name}: no such file or folder, nor a hub id (org/name)")
        path = _hub_snapshot(name, VAE_FILES)
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    if subfolder is None and not (path / "config.json").is_file():
        raise ModelError(f"--vae {name}: not a VAE folder (no config.json or vae/config.json inside)")
    try:
        loaded = AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"cannot load the VAE in {path}: {reason}") from None
    expected, got = vae_config.get("latent_channels"), loaded.config.latent_channels
    if expected is not None and expected != got:
        raise ModelError(f"--vae {name} makes {got}-channel latents; this model's UNet takes {expected}")
    return loaded


def load_model(
    model: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    cpu_offload: bool = False,
    vae: str | os.PathLike | None = None,
) -> tuple[ModelComponents, Any, Any]:
    """Load a model's components on ``device`` in ``dtype``.

    Returns ``(components, torch_device, torch_dtype)``. The denoiser, VAE and text encoders
    are put in eval mode with gradients off: the loop never differentiates through them.
    On CUDA the UNet uses the channels-last memory format, which its convolutions run
    faster in. With ``cpu_offload`` the weights stay in CPU memory and accelerate moves
    each module to the device only for its forward pass. ``vae`` (a folder, file or hub id)
    replaces the model's own VAE, e.g. SDXL's fp16-fix VAE. A family whose pipeline honours
    the VAE config's ``force_upcast`` (SDXL) gets its VAE in fp32 when the model is in fp16.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    kind, path = locate_model(model, allow_pickle=allow_pickle)
    defaults_source = DEFAULTS_FILE
    if kind == "folder":
        family = folder_family(path)  # before any weights load: an unsupported family is one line at once
        parts = family.function("load_folder")(path, torch_dtype)
        parts["pipeline_config"] = pipeline_settings(read_model_index(path))
        defaults = read_defaults(path)
        defaults_source = str(path / DEFAULTS_FILE)
    else:
        from ddsedit.checkpoints import load_single_file

        model_family(kind, path)  # before any weights load: a family not supported yet is one line at once
        parts = load_single_file(path, torch_dtype, allow_pickle=allow_pickle, prediction_type=prediction_type)
        family = family_named(parts.get("family", DEFAULT_FAMILY))
        defaults = {}
    vae_identity = None
    if vae is not None:
        parts["vae"] = load_vae(vae, dict(parts["vae"].config), torch_dtype, allow_pickle=allow_pickle)
        vae_identity = vae_identity_of(vae)
    if family.name == "sdxl":
        from ddsedit.conditioning import check_sdxl_unet

        check_sdxl_unet(parts["unet"], parts["text_encoder_2"])
    scheduler_config = parts["scheduler"].config
    if family.prediction == VELOCITY:  # flow matching: the scheduler has no prediction type, nor alphas
        if prediction_type is not None:
            raise InputError(f"{family.label} models predict a flow velocity: --prediction-type does not apply")
        chosen_prediction_type = VELOCITY
    else:
        chosen_prediction_type = prediction_type or scheduler_config.get("prediction_type", DEFAULT_PREDICTION_TYPE)
        if chosen_prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"unsupported prediction type {chosen_prediction_type!r} in the model's scheduler")
    import torch

    if family.vae_force_upcast and parts["vae"].config.get("force_upcast") and torch_dtype == torch.float16:
        parts["vae"].to(torch.float32)
    absent = tuple(name for name in family.text_encoders if parts.get(name) is None)  # SD3 without T5
    for module_name in ("unet", "vae", *(name for name in family.text_encoders if name not in absent)):
        module = parts[module_name]
        module.requires_grad_(False)
        module.eval()
        if cpu_offload:
            from accelerate import cpu_offload as offload_to_cpu

            offload_to_cpu(module, execution_device=torch_device)
        else:
            module.to(torch_device)
    if torch_device.type == "cuda" and not cpu_offload:
        parts["unet"].to(memory_format=torch.channels_last)
    components = ModelComponents(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        alphas_cumprod=_schedule_tensor(parts["scheduler"], "alphas_cumprod"),
        prediction_type=chosen_prediction_type,
        source=str(model if model is not None else default_model()),
        identity=model_identity(model, kind, path),
        defaults=defaults,
        defaults_source=defaults_source,
        scheduler_config=dict(scheduler_config),
        betas=_schedule_tensor(parts["scheduler"], "betas"),
        family=family,
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"),
        text_encoder_3=parts.get("text_encoder_3"),
        tokenizer_3=parts.get("tokenizer_3"),
        absent_text_encoders=absent,
        pipeline_config=dict(parts.get("pipeline_config") or {}),
        vae_identity=vae_identity,
    )
    return components, torch_device, torch_dtype


def _schedule_tensor(scheduler: Any, name: str) -> Any:
    """A DDPM-style scheduler's ``alphas_cumprod`` or ``betas`` in fp32; None for a flow scheduler, which has none."""
    values = getattr(scheduler, name, None)
    return None if values is None else values.float()


def vae_identity_of(vae: str | os.PathLike) -> str:
    """The VAE an edit ran with, as outputs record it: a hub id with its revision, else the absolute path."""
    path = Path(vae).expanduser()
    if path.exists():
        return str(path.resolve())
    cached = _cached_snapshot(str(vae), VAE_FILES)
    return model_identity(str(vae), "folder", cached) if cached is not None else str(vae)


def quiet_third_party_output(verbose: bool = False) -> None:
    """Hide the libraries' warnings and loading bars unless ``verbose``.

    Called by the CLI before anything heavy is imported, so the environment variables
    take effect; the library API leaves logging to the calling program.
    """
    if verbose:
        return
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore")
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
