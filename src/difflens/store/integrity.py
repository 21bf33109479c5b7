"""Checks that make a reader refuse corrupt data instead of training on it.

A shard is checked once per process, the first time any reader opens it: one sequential pass
hashes the file (sha256 against its unit record) and, in the same pass, checks that every
activation is finite. Metadata columns are checked against the harvest configuration (steps in
range, finite timesteps, valid streams). The cost is one extra sequential read per shard per
process; `bench/store_read.py` measures it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from difflens.errors import DifflensError
from difflens.store.format import ACT_DTYPES, damaged_shard_error, tensor_name

_BLOCK = 8 * 1024 * 1024
_verified: set[tuple] = set()  # (real path, inode, size, mtime_ns, sha256) checked in this process
_lock = threading.Lock()


def _key(path: Path, sha256: str) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, sha256)


def _nonfinite(raw: np.ndarray, st_dtype: str) -> int:
    if st_dtype == "BF16":  # exponent bits all ones = inf or NaN
        return int(np.count_nonzero((raw & 0x7F80) == 0x7F80))
    return int(raw.size - np.count_nonzero(np.isfinite(raw)))


def scan_shard(f, sha256: str, act_sites: list[str]) -> None:
    """Hash the whole file and count non-finite activations in one pass; raise naming the shard.

    `f` is a parsed SafetensorsFile. Tensors are aligned to their item size and the block size is a
    multiple of 8, so each block's slice of a tensor holds whole elements.
    """
    path = f.path
    key = _key(path, sha256)
    with _lock:
        if key in _verified:
            return
    acts = [f.info(tensor_name(s, "acts")) for s in act_sites]
    bad: dict[str, int] = {}
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    mv = memoryview(buf)
    pos = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(mv[:n])
            for site, t in zip(act_sites, acts):
                a, b = max(pos, t.start), min(pos + n, t.start + t.nbytes)
                if a < b:
                    raw = np.frombuffer(buf, dtype=t.np_dtype, count=(b - a) // t.np_dtype.itemsize, offset=a - pos)
                    k = _nonfinite(raw, t.st_dtype)
                    if k:
                        bad[site] = bad.get(site, 0) + k
            pos += n
    if h.hexdigest() != sha256:
        raise damaged_shard_error(path, "checksum mismatch: its bytes changed after it was written")
    if bad:
        what = ", ".join(f"{s}: {k} NaN/inf values" for s, k in bad.items())
        raise damaged_shard_error(path, f"non-finite activations ({what})")
    with _lock:
        _verified.add(key)


def check_columns(f, site: str, n: int, steps: int | None) -> None:
    """Metadata values a trainer relies on: steps within the harvest's schedule, finite timesteps."""
    step = f.read(tensor_name(site, "step"))
    if n and (int(step.min()) < 0 or (steps is not None and int(step.max()) >= steps)):
        raise damaged_shard_error(
            f.path, f"column {site}/step holds {int(step.min())}..{int(step.max())}, but the harvest ran "
            f"{steps} steps (0..{(steps or 1) - 1})"
        )
    ts = f.read(tensor_name(site, "timestep"))
    if n and not np.isfinite(ts).all():
        raise damaged_shard_error(f.path, f"column {site}/timestep holds NaN/inf")
    stream = f.read(tensor_name(site, "stream"))
    if n and not np.isin(stream, (0, 1)).all():
        raise damaged_shard_error(f.path, f"column {site}/stream holds values other than 0 (img) and 1 (txt)")


def header_layout(f, site: str) -> tuple[str, int] | None:
    """(safetensors dtype, width) of a site's acts in a shard, or None when absent or malformed."""
    t = f.tensors.get(tensor_name(site, "acts"))
    if t is None or len(t.shape) != 2:
        return None
    return t.st_dtype, int(t.shape[1])


def manifest_blame(root: Path, site: str, manifest_dtype: str, manifest_d: int, layouts: list) -> DifflensError | None:
    """When every shard agrees on a site's layout and the manifest does not, the manifest is wrong."""
    seen = {lay for lay in layouts if lay is not None}
    if len(seen) != 1 or None in layouts:
        return None
    st, d = next(iter(seen))
    want_st = ACT_DTYPES[manifest_dtype].st if manifest_dtype in ACT_DTYPES else manifest_dtype
    if (st, d) == (want_st, manifest_d):
        return None
    name = next((k for k, v in ACT_DTYPES.items() if v.st == st), st)
    return DifflensError(
        f"{root / 'manifest.json'} says site {site} is {manifest_dtype} with width {manifest_d}, but all "
        f"{len(layouts)} shards agree on {name} with width {d}: the manifest is wrong, not the shards (keep them). "
        f"Fix: run `difflens store repair {root}` to restore the manifest from the shards"
    )


__all__ = ["check_columns", "header_layout", "manifest_blame", "scan_shard"]
