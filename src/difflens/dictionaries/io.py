"""Dictionary checkpoints: a folder with ``cfg.json`` + ``weights.safetensors``. Never pickles.

cfg.json holds everything needed to rebuild the module (the full `DictConfig` under "config")
plus a human-readable summary (architecture, sizes, site, model, normalisation statistics,
library version, store fingerprint, training config). weights.safetensors holds every tensor
of the module's state dict: parameters, normalisation buffers, dead-latent counters, BatchTopK's
threshold, ITDA atoms and their provenance.

Atomicity: a new folder is written as a temp folder and renamed into place. An existing folder
(the trainer keeps its logs next to the dictionary) gets each file replaced atomically, weights
first; both files carry the same random ``save_id`` so a load that finds a torn pair (a crash
between the two renames) says so instead of mixing two saves.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from difflens.dictionaries.base import ARCHITECTURES, Dictionary
from difflens.dictionaries.config import SCHEMA_VERSION, DictConfig
from difflens.errors import DifflensError
from difflens.utils import write_json

FORMAT = "difflens-dictionary"
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "weights.safetensors"


def _jsonable(obj, where: str):
    def default(o):
        if isinstance(o, Path):
            return str(o)
        if isinstance(o, torch.Tensor) and o.numel() == 1:
            return o.item()
        if hasattr(o, "item") and callable(o.item):  # numpy scalars
            return o.item()
        if isinstance(o, (set, tuple)):
            return list(o)
        raise TypeError(type(o).__name__)

    try:
        return json.loads(json.dumps(obj, default=default))
    except (TypeError, ValueError) as e:
        raise DifflensError(f"{where} is not JSON-serialisable ({e}); pass plain numbers, strings, lists and dicts") from e


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_weights(tensors: dict, path: Path, save_id: str) -> None:
    save_file(tensors, str(path), metadata={"format": "pt", "difflens_save_id": save_id})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(d: Dictionary, path, extra: dict | None = None) -> Path:
    """Write `d` to the folder `path` (created or updated); returns the folder."""
    import difflens

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DifflensError(f"cannot save a dictionary to {path}: it is a file; give a folder path")
    extra = dict(extra or {})
    save_id = uuid.uuid4().hex
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in d.state_dict().items()}
    meta = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "library_version": difflens.__version__,
        "architecture": d.arch,
        "d_in": d.d_in,
        "width": int(d.cfg.width),
        "num_latents": d.num_latents,
        "k": d.cfg.k,
        "site": d.cfg.site,
        "model": d.cfg.model,
        "normalization": d.norm.summary(),
        "store_fingerprint": _jsonable(extra.pop("store_fingerprint", None), "extra['store_fingerprint']"),
        "training": _jsonable(extra.pop("training", None), "extra['training']"),
        "extra": _jsonable(extra, "extra"),
        "config": _jsonable(d.cfg.to_dict(), "the dictionary config"),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
        "save_id": save_id,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # whole-folder atomic: temp folder, then rename
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            _write_weights(tensors, tmp / WEIGHTS_NAME, save_id)
            write_json(tmp / CFG_NAME, meta)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:  # folder shared with other files (logs): replace our two files, weights first
        tmp = path / f".{WEIGHTS_NAME}.{save_id}.tmp"
        try:
            _write_weights(tensors, tmp, save_id)
            os.replace(tmp, path / WEIGHTS_NAME)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        write_json(path / CFG_NAME, meta)
    _fsync_dir(path.parent)
    return path


def read_meta(path) -> dict:
    """cfg.json of a checkpoint folder, with clear errors (no weights are read)."""
    path = Path(path)
    if not path.is_dir():
        raise DifflensError(
            f"no dictionary at {path}: expected a folder with {CFG_NAME} and {WEIGHTS_NAME} (written by difflens train)"
        )
    cfg_path = path / CFG_NAME
    if not cfg_path.is_file():
        raise DifflensError(f"{cfg_path} is missing; {path} is not a dictionary checkpoint (or the save was interrupted)")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DifflensError(f"{cfg_path} is corrupt ({e}); re-export the dictionary") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise DifflensError(f"{cfg_path} is not a difflens dictionary config (format field missing or wrong)")
    version = meta.get("schema_version", 0)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise DifflensError(
            f"{cfg_path} has schema version {version}, newer than this difflens understands ({SCHEMA_VERSION}); "
            "upgrade difflens to load it"
        )
    return meta


def load(path, *, expect_site: str | None = None, expect_d_in: int | None = None, device="cpu", fast: bool = True) -> Dictionary:
    """Rebuild a dictionary from its folder (eval mode). Never unpickles: JSON + safetensors only.

    `path` may also be a sparsify or SAELens folder (`interop.load_foreign`) or ``hf:ORG/REPO[/SUB]``
    (downloaded through the Hugging Face cache, `hub.resolve`)."""
    from difflens.dictionaries import hub, interop

    if isinstance(path, str) and path.startswith(hub.PREFIX):
        path = hub.resolve(path)
    path = Path(path)
    if interop.detect(path) is not None:
        d = interop.load_foreign(path, device=device)
        if expect_d_in is not None and d.d_in != expect_d_in:
            raise DifflensError(
                f"dictionary {path} expects activations of width {d.d_in}, but the site has width {expect_d_in}"
            )
        if expect_site is not None and d.cfg.site and d.cfg.site != expect_site:
            raise DifflensError(f"dictionary {path} was trained on site {d.cfg.site!r}, not {expect_site!r}")
        return d
    meta = read_meta(path)
    arch = meta.get("architecture")
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        raise DifflensError(
            f"{path / CFG_NAME}: architecture {arch!r} is unknown; this difflens knows {', '.join(sorted(ARCHITECTURES))}"
        )
    cfg = DictConfig.from_dict({**meta["config"], "arch": arch})
    if expect_site is not None and cfg.site != expect_site:
        raise DifflensError(
            f"dictionary {path} was trained on site {cfg.site!r}, not {expect_site!r}; "
            "use a dictionary trained on that site or change the site"
        )
    if expect_d_in is not None and cfg.d_in != expect_d_in:
        raise DifflensError(
            f"dictionary {path} expects activations of width {cfg.d_in}, but the site has width {expect_d_in}; "
            "it was trained on a different model or site"
        )
    wpath = path / WEIGHTS_NAME
    if not wpath.is_file():
        raise DifflensError(f"{wpath} is missing; the checkpoint is incomplete — re-export the dictionary")
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            file_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DifflensError(f"{wpath} is corrupt or truncated ({e}); re-export the dictionary") from e
    if meta.get("save_id") and file_meta.get("difflens_save_id") not in (None, meta["save_id"]):
        raise DifflensError(
            f"{wpath} and {path / CFG_NAME} come from different saves (interrupted save?); "
            "save the dictionary again or restore both files together"
        )
    kwargs = {"fast": fast} if cls.has_fast_path else {}
    d = cls(cfg, **kwargs)
    d.load_tensors(tensors)
    d.to(device)
    d.eval()
    return d


def expand_dict_paths(paths: list[str]) -> list[str]:
    """A training run folder (with run.json) stands for all of its dictionaries; ``hf:ORG/REPO[/SUB][@REV]``
    is resolved to its folder in the local Hugging Face cache (downloaded first when online)."""
    from difflens.dictionaries.hub import local_folder

    out = []
    for path in paths:
        p = local_folder(path)
        if not p.exists():
            raise DifflensError(f"dictionary folder {p} does not exist; pass a folder written by `difflens train`")
        if (p / "cfg.json").exists():
            out.append(str(p))
            continue
        if (p / "run.json").exists():
            from difflens.utils import read_json

            names = [d["name"] for d in read_json(p / "run.json")["dictionaries"]]
            found = [str(p / n) for n in names if (p / n / "cfg.json").exists()]
            if not found:
                raise DifflensError(f"training run {p} has no saved dictionary yet; wait for its first checkpoint")
            out.extend(found)
            continue
        raise DifflensError(f"{p} is not a dictionary folder (no cfg.json) nor a training run (no run.json)")
    return out
