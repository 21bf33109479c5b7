"""The on-disk layout of a store: file names, column contract, dtypes. docs/store.md is the prose twin."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difflens.errors import DifflensError

SCHEMA_VERSION = 1
FORMAT_NAME = "difflens-store"

MANIFEST = "manifest.json"
UNITS_DIR = "units"
SHARDS_DIR = "shards"
SAMPLES_DIR = "samples"
IMAGES_DIR = "images"
STATS_JSON = "stats.json"
STATS_TENSORS = "stats.safetensors"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class ActDtype:
    name: str  # "bf16" | "fp32": what users type
    st: str  # the safetensors dtype string
    storage: np.dtype  # numpy dtype of the raw bytes (numpy has no bfloat16)


ACT_DTYPES: dict[str, ActDtype] = {
    "bf16": ActDtype("bf16", "BF16", np.dtype(np.uint16)),
    "fp32": ActDtype("fp32", "F32", np.dtype(np.float32)),
}

# The metadata contract: one value per activation row.
COLUMNS: dict[str, np.dtype] = {
    "sample_id": np.dtype(np.int64),
    "prompt_id": np.dtype(np.int64),
    "seed": np.dtype(np.int64),
    "step": np.dtype(np.int32),
    "timestep": np.dtype(np.float32),
    "token": np.dtype(np.int32),
    "h": np.dtype(np.int16),
    "w": np.dtype(np.int16),
    "stream": np.dtype(np.int8),
    "labels": np.dtype(np.int64),
    "branch": np.dtype(np.int8),  # CFG branch: 0 conditional, 1 unconditional (only when both are recorded)
    "attn_mask": np.dtype(np.int8),  # text tokens: 1 attended, 0 padding (only when the model reports a mask)
}
OPTIONAL_COLUMNS = ("labels", "branch", "attn_mask")
BRANCHES = {"cond": 0, "uncond": 1}
REQUIRED_COLUMNS = tuple(c for c in COLUMNS if c not in OPTIONAL_COLUMNS)
INDEX_COLUMN = "index"  # pseudo-column: the row's global index within its site
STREAMS = {"img": 0, "txt": 1}

# safetensors dtype string <-> numpy dtype of the raw bytes.
ST_TO_NUMPY: dict[str, np.dtype] = {
    "BF16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
}
NUMPY_TO_ST: dict[np.dtype, str] = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int16): "I16",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}

_UNIT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_unit_id(unit_id: str) -> str:
    """Unit ids become file names, so they must be plain and portable."""
    if not isinstance(unit_id, str) or not _UNIT_ID.match(unit_id) or unit_id.endswith(".tmp"):
        raise DifflensError(
            f"unit id {unit_id!r} is not usable as a file name: use 1-128 characters from "
            "[A-Za-z0-9._-], starting with a letter or digit (e.g. 'r0-b000012')"
        )
    return unit_id


def check_site(site: str) -> str:
    if not isinstance(site, str) or not site or "/" in site or site != site.strip():
        raise DifflensError(
            f"site {site!r} is not a valid site name: use '<module path>[:<stream>]' "
            "without '/' or surrounding spaces, e.g. 'transformer_blocks.18:img'"
        )
    return site


def tensor_name(site: str, column: str) -> str:
    """Name of a per-site tensor inside a shard: '<site>/acts', '<site>/timestep', ..."""
    return f"{site}/{column}"


def stats_tensor_name(site: str, part: str) -> str:
    return f"{site}/stats/{part}"


def shard_rel(unit_id: str) -> str:
    return f"{SHARDS_DIR}/{unit_id}.safetensors"


def samples_rel(unit_id: str) -> str:
    return f"{SAMPLES_DIR}/{unit_id}.jsonl"


def unit_record_rel(unit_id: str) -> str:
    return f"{UNITS_DIR}/{unit_id}.json"


def image_rel(sample_id: int) -> str:
    return f"{IMAGES_DIR}/{int(sample_id)}.png"


def damaged_shard_error(path: Path, why: str) -> DifflensError:
    """One wording for every damaged-shard problem, always with the way out."""
    root = path.parent.parent
    return DifflensError(
        f"shard {path} is damaged ({why}). Fix: run `difflens store repair {root}` (it sets damaged units aside), "
        "then re-run the harvest with --resume to regenerate them"
    )
