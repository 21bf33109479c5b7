"""Benchmark: shuffled batch streaming vs a plain sequential read of the same activation store.

Builds synthetic stores (several widths, bf16 and fp32), evicts them from the page cache before
every measurement, and prints a markdown table. Target: shuffled >= 50% of sequential.
Each store should span several shuffle buffers (128 MB each) so the steady state is measured,
not just the wait for the first buffer.

    .venv/bin/python bench/store_read.py            # ~512 MB per config
    .venv/bin/python bench/store_read.py --mb 128   # quicker, dominated by the first buffer
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from difflens.store import Store, StoreWriter
from difflens.store.format import ACT_DTYPES, tensor_name
from difflens.store.shardfile import SafetensorsFile
from difflens.store.shuffle import acts_to_torch

SITE = "transformer_blocks.18:img"
SHARD_MB = 16


def build_store(path: Path, d: int, dtype: str, total_mb: int) -> int:
    """A store of ~total_mb of activations in ~16 MB shards, laid out like a harvest (step-major)."""
    itemsize = ACT_DTYPES[dtype].storage.itemsize
    rows_per_unit = (SHARD_MB << 20) // (d * itemsize) // 256 * 256
    n_units = max(1, (total_mb << 20) // (rows_per_unit * d * itemsize))
    w = StoreWriter.open(path, model="bench", sites={SITE: d}, dtype=dtype, harvest_config={"bench": True})
    g = torch.Generator().manual_seed(0)
    for u in range(n_units):
        n = rows_per_unit
        tok = np.arange(n)
        meta = {
            "sample_id": u * 1000 + (tok // 256) % 4,
            "prompt_id": u * 1000 + (tok // 256) % 4,
            "seed": np.zeros(n, np.int64),
            "step": (tok // 1024) % 4,
            "timestep": (1000.0 - 250.0 * ((tok // 1024) % 4)).astype(np.float32),
            "token": tok % 256,
            "h": (tok % 256) // 16,
            "w": tok % 16,
            "stream": np.zeros(n, np.int8),
        }
        w.write_unit(f"u{u:05d}", {SITE: (torch.randn(n, d, generator=g), meta)})
    w.finalize()
    return n_units * rows_per_unit


def evict(paths: list[Path]) -> str:
    """Drop the files from the page cache: per file with fadvise (touches nobody else's cache),
    else globally via drop_caches (needs root)."""
    subprocess.run(["sync"], check=False)
    if hasattr(os, "posix_fadvise"):
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        if cached_fraction(paths) < 0.05:
            return "fadvise(DONTNEED)"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        return "nothing (could not evict: numbers include page-cache hits)"


def cached_fraction(paths: list[Path]) -> float:
    """Share of the files' pages in the page cache (mincore); 0 if it cannot be measured."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0.0
    page = mmap.PAGESIZE
    cached = total = 0
    for p in paths:
        size = p.stat().st_size
        if size == 0:
            continue
        with open(p, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
            n = (size + page - 1) // page
            vec = (ctypes.c_ubyte * n)()
            anchor = ctypes.c_char.from_buffer(m)  # address of the mapping; no page is touched
            ok = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) == 0
            del anchor
            if not ok:
                return 0.0
            cached += sum(v & 1 for v in bytes(vec))
            total += n
    return cached / max(total, 1)


def sequential(store: Store, block_mb: int = 8) -> tuple[int, float]:
    """Read every shard's activations front to back in large blocks, converted like batches are."""
    rows, t0 = 0, time.perf_counter()
    st = ACT_DTYPES[store.dtype].st
    for rec in store.records:
        f = SafetensorsFile(store.root / rec.shard, rec.bytes)
        info = f.info(tensor_name(SITE, "acts"))
        step = max(1, (block_mb << 20) // info.row_bytes)
        for a in range(0, info.shape[0], step):
            x = acts_to_torch(f.read(info.name, a, min(a + step, info.shape[0])), st)
            rows += x.shape[0]
    return rows, time.perf_counter() - t0


def shuffled(store: Store, batch: int) -> tuple[int, float]:
    rows, t0 = 0, time.perf_counter()
    for b in store.batches(SITE, batch, shuffle=True, seed=0, columns=("acts", "timestep")):
        rows += b["acts"].shape[0]
    return rows, time.perf_counter() - t0


def random_rows(store: Store, batch: int, budget_s: float = 10.0) -> tuple[int, float]:
    """Batches of uniformly random rows read by index: what a naive shuffled loader does."""
    rng = np.random.default_rng(0)
    n = store.num_rows(SITE)
    rows, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s and rows < n:
        rows += store.read_rows(SITE, rng.integers(0, n, batch)).shape[0]
    return rows, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512, help="activation megabytes per store")
    ap.add_argument("--configs", default="256:bf16,768:bf16,768:fp32", help="comma list of d:dtype")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dir", default=None, help="where to build the stores (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    args = ap.parse_args()
    os.environ.setdefault("DIFFLENS_QUIET", "1")
    base = Path(args.dir or tempfile.mkdtemp(prefix="difflens-bench-"))
    results = []
    try:
        for cfg in args.configs.split(","):
            d_s, dtype = cfg.split(":")
            d = int(d_s)
            path = base / f"d{d}-{dtype}"
            if path.exists():
                shutil.rmtree(path)
            n = build_store(path, d, dtype, args.mb)
            store = Store(path)
            files = [path / r.shard for r in store.records]
            mb = n * d * ACT_DTYPES[dtype].storage.itemsize / 2**20
            method = evict(files)
            seq = sequential(store)
            evict(files)
            shuf = shuffled(store, args.batch)
            evict(files)
            rnd = random_rows(store, args.batch)
            assert seq[0] == shuf[0] == n, (seq[0], shuf[0], n)
            results.append((d, dtype, n, mb, seq, shuf, rnd, method))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    def rate(r, mb_per_row):
        rows, s = r
        return f"{rows / s:,.0f} rows/s, {rows * mb_per_row / s:,.0f} MB/s"

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nStore read throughput (batch {args.batch}, page cache evicted via {results[0][7]}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f})\n")
    print("| d | dtype | rows | MB | sequential | shuffled batches | random-row batches | shuffled / sequential |")
    print("|---|---|---|---|---|---|---|---|")
    for d, dtype, n, mb, seq, shuf, rnd, _ in results:
        per_row = mb / n
        ratio = (shuf[0] / shuf[1]) / (seq[0] / seq[1])
        print(f"| {d} | {dtype} | {n:,} | {mb:,.0f} | {rate(seq, per_row)} | {rate(shuf, per_row)} | "
              f"{rate(rnd, per_row)} | {ratio:.0%} |")


if __name__ == "__main__":
    main()
