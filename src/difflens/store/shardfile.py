"""Streaming writer and validating reader for the safetensors files a store is made of.

We write the format ourselves (8-byte little-endian header size, JSON header, raw tensor bytes)
so the checksum is computed while writing and nothing is held twice in memory; we read it
ourselves so a damaged file gives a clear error naming it, and so rows come in with one
`preadv` per contiguous range straight into a numpy buffer.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difflens.store.format import ST_TO_NUMPY, damaged_shard_error
from difflens.store.fsio import write_atomic

MAX_HEADER_BYTES = 100 * 1024 * 1024  # same limit as the safetensors library
_WRITE_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    st_dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return ST_TO_NUMPY[self.st_dtype]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.np_dtype.itemsize


def _le(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))


def write_safetensors(
    final: Path, tensors: list[tuple[str, np.ndarray, str]], metadata: dict[str, str] | None = None
) -> tuple[int, str]:
    """Atomically write tensors (name, array, safetensors dtype); returns (file bytes, sha256 hex).

    Tensors are laid out by decreasing item size so each one is naturally aligned.
    """
    order = sorted(range(len(tensors)), key=lambda i: (-tensors[i][1].dtype.itemsize, i))
    arrays = [(tensors[i][0], _le(tensors[i][1]), tensors[i][2]) for i in order]
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, arr, st in arrays:
        if ST_TO_NUMPY.get(st, None) is None or ST_TO_NUMPY[st].itemsize != arr.dtype.itemsize:
            raise ValueError(f"tensor {name}: dtype {st} does not match array dtype {arr.dtype}")
        header[name] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)

    def fill(f) -> tuple[int, str]:
        h = hashlib.sha256()
        for chunk in (len(hbytes).to_bytes(8, "little"), hbytes):
            h.update(chunk)
            f.write(chunk)
        for _, arr, _ in arrays:
            flat = memoryview(arr.reshape(-1).view(np.uint8))
            for a in range(0, len(flat), _WRITE_BLOCK):
                block = flat[a : a + _WRITE_BLOCK]
                h.update(block)
                f.write(block)
        return 8 + len(hbytes) + offset, h.hexdigest()

    return write_atomic(final, fill)


def sha256_file(path: Path, block: int = _WRITE_BLOCK) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        mv = memoryview(buf)
        while n := f.readinto(buf):
            h.update(mv[:n])
    return h.hexdigest()


def _pread_into(fd: int, mv: memoryview, offset: int, path: Path) -> None:
    """Fill `mv` from `offset`, looping over short reads; a premature EOF means truncation."""
    done = 0
    while done < len(mv):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [mv[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, len(mv) - done, offset + done)
            n = len(data)
            mv[done : done + n] = data
        if n == 0:
            raise damaged_shard_error(path, f"file ends at byte {offset + done}, data expected up to {offset + len(mv)}")
        done += n


class SafetensorsFile:
    """A validated view of one safetensors file: the header is checked against the file size."""

    def __init__(self, path: Path, expected_bytes: int | None = None):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise damaged_shard_error(self.path, "file is missing") from None
        if expected_bytes is not None and size != expected_bytes:
            raise damaged_shard_error(self.path, f"size is {size} bytes, the manifest says {expected_bytes}")
        if size < 8:
            raise damaged_shard_error(self.path, f"only {size} bytes, too short for a safetensors header")
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise damaged_shard_error(self.path, f"header size field says {n} bytes, file has {size}")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise damaged_shard_error(self.path, f"header is not valid JSON: {e}") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        end = 0
        for name, spec in header.items():
            try:
                st = spec["dtype"]
                shape = tuple(int(s) for s in spec["shape"])
                a, b = (int(x) for x in spec["data_offsets"])
                np_dtype = ST_TO_NUMPY[st]
            except (KeyError, TypeError, ValueError):
                raise damaged_shard_error(self.path, f"header entry {name!r} is malformed") from None
            expect = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
            if a < 0 or b - a != expect or any(s < 0 for s in shape):
                raise damaged_shard_error(self.path, f"tensor {name!r}: offsets {a}..{b} do not fit shape {shape}")
            self.tensors[name] = TensorInfo(name, st, shape, data_start + a, expect)
            end = max(end, b)
        if data_start + end != size:
            raise damaged_shard_error(
                self.path, f"header describes {data_start + end} bytes but the file has {size} (truncated or padded)"
            )

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise damaged_shard_error(self.path, f"tensor {name!r} is missing") from None

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a tensor (axis 0), as the raw numpy dtype."""
        t = self.info(name)
        stop = t.shape[0] if stop is None else stop
        return self.read_runs(name, np.array([[start, stop]], dtype=np.int64))

    def read_runs(self, name: str, runs_R2: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Concatenate row ranges [a, b) of a tensor (into `out` if given); one positioned read per range."""
        t = self.info(name)
        total = int((runs_R2[:, 1] - runs_R2[:, 0]).sum()) if len(runs_R2) else 0
        if out is None:
            out = np.empty((total, *t.shape[1:]), dtype=t.np_dtype)
        elif out.shape != (total, *t.shape[1:]) or out.dtype != t.np_dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {t.np_dtype} array of shape {(total, *t.shape[1:])}")
        if total == 0:
            return out
        if t.shape and (runs_R2.min() < 0 or runs_R2.max() > t.shape[0]):
            raise IndexError(f"rows {runs_R2.min()}..{runs_R2.max()} out of range for {name} with {t.shape[0]} rows")
        rb = t.row_bytes
        mv = memoryview(out.reshape(-1).view(np.uint8))
        pos = 0
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for a, b in runs_R2.tolist():
                nb = (b - a) * rb
                _pread_into(fd, mv[pos : pos + nb], t.start + a * rb, self.path)
                pos += nb
        finally:
            os.close(fd)
        return out
