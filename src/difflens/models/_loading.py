"""Turning a user's model options (`difflens.cli_options.add_model_options`) into a loaded adapter.

Models are "toy", a local diffusers pipeline folder, or a hub id. The family is read from
`model_index.json` (`_class_name`), never guessed from the name. Every way this can go wrong
ends in a DifflensError that says what to do instead.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflens.errors import DifflensError
from difflens.models.base import ADAPTERS
from difflens.utils import read_json

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

# Modules of models/ that hold no adapter family (the toy family is loaded by name, not by `_class_name`;
# `tiny` builds tiny random pipelines of the other families).
NOT_FAMILIES = ("base", "cli", "tiny", "toy")


def registered_adapters() -> dict[str, type]:
    """model_index.json `_class_name` -> adapter class. Every public module of models/ is a family
    and is imported here (importing one registers its class in `models.base.ADAPTERS` under the
    `pipeline_classes` it declares), so a new family is one new module; none imports diffusers at
    module level."""
    import pkgutil

    import difflens.models as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if not m.name.startswith("_") and m.name not in NOT_FAMILIES:
            importlib.import_module(f"{pkg.__name__}.{m.name}")
    return ADAPTERS

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DifflensError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DifflensError(f"device {device!r} asked for, but this torch sees no CUDA GPU: use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DifflensError(f"device {device!r} asked for, but MPS is not available: use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DifflensError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    return dev


def parse_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = DTYPES.get(str(dtype).lower())
        if resolved is None:
            raise DifflensError(f"unknown dtype {dtype!r}: use fp32 or bf16 (fp16 on GPUs only)")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise DifflensError(f"dtype {resolved} is not supported: use fp32 or bf16 (fp16 on GPUs only)")
    if resolved == torch.float16 and device.type == "cpu":
        raise DifflensError(
            "fp16 is not supported on CPU (slow and numerically unsafe there): use --model-dtype bf16 or fp32"
        )
    return resolved


def quantization_config(quantize: str | None, dtype: torch.dtype, device: torch.device):
    """diffusers' BitsAndBytesConfig for a 4-bit NF4 transformer, or None."""
    if quantize is None:
        return None
    if str(quantize).lower() != "nf4":
        raise DifflensError(f"unknown quantization {quantize!r}: the only choice is nf4 (or leave it off)")
    missing = []
    try:
        importlib.import_module("bitsandbytes")
    except ImportError:
        missing.append("the bitsandbytes package (pip install 'difflens[quant]')")
    try:
        importlib.import_module("accelerate")
    except ImportError:
        missing.append("the accelerate package (pip install 'difflens[quant]')")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (this torch sees none)")
    elif device.type != "cuda":
        missing.append(f"--device cuda (you asked for {device})")
    if missing:
        raise DifflensError(
            "--quantize nf4 loads the transformer in 4 bits with bitsandbytes and needs "
            + " and ".join(missing)
            + "; drop --quantize to load it unquantized"
        )
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ModelSource:
    """Where a diffusers pipeline lives and which family it is."""

    location: str  # what from_pretrained gets: a folder path or a hub repo id
    model_id: str  # what manifests record
    pipeline_class: str
    is_local: bool

    def read_json(self, relpath: str) -> Any:
        if self.is_local:
            path = Path(self.location) / relpath
            if not path.is_file():
                raise DifflensError(f"{self.location} has no {relpath}: is it a complete diffusers pipeline folder?")
            return read_json(path)
        return read_json(_hub_file(self.location, relpath))


def _hub_file(repo_id: str, relpath: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, relpath, local_files_only=_offline())
    except Exception as e:  # network boundary: many error types, one answer for the user
        where = "offline mode (HF_HUB_OFFLINE=1) and it is not in the local cache" if _offline() else str(e).splitlines()[0]
        raise DifflensError(
            f"cannot get {relpath} of hub model {repo_id!r}: {where}. Download it first "
            f"(`huggingface-cli download {repo_id}` with network access) or pass a local pipeline folder"
        ) from None


def resolve_source(model: str) -> ModelSource:
    """Find a pipeline folder or hub id and read its pipeline class from model_index.json."""
    text = str(model).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file() and _is_toy_folder(path):
            return ModelSource(str(path), str(path.resolve()), "toy", True)
        if not index.is_file():
            raise DifflensError(
                f"{text} has no model_index.json, so it is not a diffusers pipeline folder: "
                "point --model at the folder that holds model_index.json (e.g. a save_pretrained output)"
            )
        location, model_id, is_local = str(path), str(path.resolve()), True
        class_name = read_json(index).get("_class_name", "")
    elif _REPO_ID.match(text) and not text.startswith((".", "~")):
        location, model_id, is_local = text, text, False
        class_name = read_json(_hub_file(text, "model_index.json")).get("_class_name", "")
    elif path.exists():
        raise DifflensError(f"{text} is a file, not a model: pass 'toy', a pipeline folder or a hub id")
    else:
        raise DifflensError(
            f"model {text!r} not found: pass 'toy', an existing diffusers pipeline folder, "
            "or a hub id like black-forest-labs/FLUX.1-schnell"
        )
    if class_name not in registered_adapters():
        raise DifflensError(
            f"{text} is a {class_name or 'pipeline without _class_name'}, which difflens has no adapter for; "
            f"supported: {', '.join(sorted(registered_adapters()))} (see docs/adapters.md to add one)"
        )
    return ModelSource(location, model_id, class_name, is_local)


def adapter_class(pipeline_class: str):
    return registered_adapters()[pipeline_class]


def _is_toy_folder(path: Path) -> bool:
    """A folder written by ToyT2I.save (config.json + model.safetensors, the toy's config keys)."""
    cfg = path / "config.json"
    if not (cfg.is_file() and (path / "model.safetensors").is_file()):
        return False
    try:
        return {"num_single_layers", "text_dim", "max_text_length"} <= set(read_json(cfg))
    except (OSError, ValueError):
        return False


def ground_truth_for(model: str):
    """The ground truth of the model a store names (`GroundTruth` or None), from its family's
    `world_class`, without loading weights: how a store's token labels are read."""
    is_toy = str(model).strip().lower() == "toy"
    source = None if is_toy else resolve_source(model)
    if is_toy or source.pipeline_class == "toy":
        from difflens.models.toy import world_class  # the toy adapter's world, without importing diffusers

        return world_class()()
    cls = adapter_class(source.pipeline_class)
    return cls.world_class() if cls.world_class is not None else None


def _toy_adapter_class():
    try:
        from difflens.models.toy.adapter import ToyAdapter
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("difflens.models.toy"):
            raise DifflensError("the toy model is not part of this install (difflens.models.toy is missing)") from None
        raise
    return ToyAdapter


def check_offload(offload: str | None, device: torch.device) -> str:
    """'none' | 'model' | 'sequential'; offloading needs a GPU to offload from and accelerate."""
    mode = "none" if offload in (None, "") else str(offload).lower()
    if mode not in ("none", "model", "sequential"):
        raise DifflensError(f"unknown --offload {offload!r}: use none, model or sequential")
    if mode == "none":
        return mode
    if device.type != "cuda":
        raise DifflensError(
            f"--offload {mode} keeps parts of the pipeline on the CPU and moves them to the GPU when needed: it needs "
            f"--device cuda (you asked for {device}); on the CPU drop --offload"
        )
    try:
        importlib.import_module("accelerate")
    except ImportError:
        raise DifflensError(f"--offload {mode} needs the accelerate package: pip install 'difflens[quant]'") from None
    return mode


def load_adapter(
    model: str,
    *,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    offload: str | None = "none",
    max_text_length: int | None = None,
):
    """Load "toy", a local pipeline folder or a hub id behind the `Adapter` interface.

    Every option is checked before any weight is read; a pipeline whose components do not all load
    in `dtype` is refused with the component's name (see `_pipeline.enforce_dtype`)."""
    dev = parse_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    offload_mode = check_offload(offload, dev)
    if max_text_length is not None and int(max_text_length) < 1:
        raise DifflensError(f"--max-text-length must be >= 1, got {max_text_length}")
    is_toy = str(model).strip().lower() == "toy"
    source = None if is_toy else resolve_source(model)
    if is_toy or source.pipeline_class == "toy":
        if quantize is not None:
            raise DifflensError("the toy model is tiny and is never quantized: drop --quantize")
        if offload_mode != "none":
            raise DifflensError("the toy model is tiny and is never offloaded: drop --offload")
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        adapter = _toy_adapter_class().load(dtype=names[torch_dtype], device=str(dev),
                                            **({} if is_toy else {"folder": source.location}))
        fixed = adapter.model.cfg.max_text_length
        if max_text_length is not None and int(max_text_length) != int(fixed):
            raise DifflensError(f"the toy model's text length is fixed at {fixed} tokens: drop --max-text-length")
        return adapter
    qconfig = quantization_config(quantize, torch_dtype, dev)
    cls = adapter_class(source.pipeline_class)
    return cls.from_pretrained(
        source.location,
        source.pipeline_class,
        model_id=source.model_id,
        dtype=torch_dtype,
        device=dev,
        quantization_config=qconfig,
        local_files_only=source.is_local or _offline(),
        offload=offload_mode,
        max_text_length=max_text_length,
    )


@dataclass(frozen=True)
class SiteListing:
    model_id: str
    sites: list[tuple[str, int]]
    default: str


def describe_sites(model: str, *, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu") -> SiteListing:
    """A model's sites without loading its weights: the transformer is built on the meta device
    from its config, so listing FLUX's sites does not read 24 GB."""
    if str(model).strip().lower() == "toy":
        adapter = load_adapter("toy", dtype=dtype, device=device)
        return SiteListing(adapter.model_id, [(s, adapter.site_dim(s)) for s in adapter.sites()], adapter.default_site())
    parse_dtype(dtype, parse_device(device))
    import diffusers

    source = resolve_source(model)
    cls = adapter_class(source.pipeline_class)
    config = source.read_json("transformer/config.json")
    with torch.device("meta"):
        transformer = getattr(diffusers, cls.transformer_class).from_config(config)
    bindings = cls.bindings_for(transformer)
    return SiteListing(
        source.model_id,
        [(site, b.dim) for site, b in bindings.items()],
        cls.default_site_for(transformer),
    )


@dataclass(frozen=True)
class ModelPlan:
    """What a run will see, from configs alone: sites, token counts at a size, default steps."""

    model_id: str
    family: str
    sites: dict[str, int]
    default_site: str
    height: int
    width: int
    image_tokens: int
    text_tokens: int
    default_steps: int
    has_labels: bool  # toy-world concept bitmasks are stored per row


def describe_model(model: str, *, height: int | None = None, width: int | None = None,
                   max_text_length: int | None = None) -> ModelPlan:
    """Sizes for planning (`harvest --dry-run`) without reading a pipeline's weights."""
    if str(model).strip().lower() == "toy" or resolve_source(model).pipeline_class == "toy":
        adapter = load_adapter(model)
        cfg = adapter.model.cfg
        for name, v in (("height", height), ("width", width)):
            if v is not None and v != cfg.image_size:
                raise DifflensError(f"the toy model makes {cfg.image_size}x{cfg.image_size} images; drop --{name}")
        gh, gw = adapter.grid_hw()
        return ModelPlan(adapter.model_id, "toy", {s: adapter.site_dim(s) for s in adapter.sites()},
                         adapter.default_site(), cfg.image_size, cfg.image_size, gh * gw, int(cfg.max_text_length),
                         int(cfg.steps_default), True)
    import diffusers

    source = resolve_source(model)
    cls = adapter_class(source.pipeline_class)
    with torch.device("meta"):
        transformer = getattr(diffusers, cls.transformer_class).from_config(source.read_json("transformer/config.json"))
    vae_scale = 2 ** (len(source.read_json("vae/config.json").get("block_out_channels", [0])) - 1)
    side = cls.default_side_for(transformer, vae_scale)
    h, w = int(height or side), int(width or side)
    px = cls.token_px_for(transformer, vae_scale)
    if h % px or w % px:
        raise DifflensError(f"image size {h}x{w} must be multiples of {px} px for this {cls.name} model")
    clip_length = 77
    if source.pipeline_class.startswith("StableDiffusion3"):
        clip_length = int(source.read_json("tokenizer/tokenizer_config.json").get("model_max_length", 77))
    bindings = cls.bindings_for(transformer)
    return ModelPlan(source.model_id, cls.name, {site: b.dim for site, b in bindings.items()},
                     cls.default_site_for(transformer), h, w, (h // px) * (w // px),
                     cls.text_tokens_for(max_text_length, clip_length),
                     cls.default_steps_for(source.pipeline_class, transformer), False)
