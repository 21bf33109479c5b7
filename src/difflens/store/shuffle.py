"""Shuffled streaming over data larger than memory.

Selected rows are cut into chunks of neighbouring rows (one shard, a window of `chunk_rows`).
Each epoch permutes the chunk order (the same for every rank) and hands each rank a contiguous
slice of that row stream. A background thread fills one shuffle buffer of ~`buffer_rows` rows
(one large read per chunk, several in flight) while the consumer cuts batches, in a random
order, out of the previous one. Large reads with a few requests in flight are what keeps this
close to sequential speed; random row reads are many times slower.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from difflens.errors import DifflensError
from difflens.store.format import COLUMNS, INDEX_COLUMN, STREAMS

CHUNK_BYTES = 2 << 20  # bytes of activations per chunk read
BUFFER_BYTES = 128 << 20  # bytes of (stored) activations per shuffle buffer (two in flight)
GAP_BYTES = 64 << 10  # read through gaps smaller than this instead of seeking


@dataclass(frozen=True)
class BatchSpec:
    """Everything that defines a batch stream; equal specs give identical streams."""

    batch_size: int
    shuffle: bool = True
    seed: int = 0
    timestep_range: tuple[float, float] | None = None
    steps: tuple[int, ...] | None = None
    stream: str | None = None
    columns: tuple[str, ...] = ("acts", "timestep")
    drop_last: bool = False
    epochs: int | None = 1  # None = endless
    start_epoch: int = 0
    rank: int = 0
    world_size: int = 1
    buffer_rows: int | None = None
    chunk_rows: int | None = None
    prefetch: bool = True  # fill the next shuffle buffer in a background thread
    io_threads: int = 4  # concurrent chunk reads while filling a buffer (1 = one at a time)
    branch: str = "all"  # "cond" | "uncond" | "both"; "all" = every row (stores with one branch)
    padding: bool = False  # include text padding tokens (rows with attn_mask 0)

    def check(self) -> None:
        def bad(msg: str):
            raise DifflensError(f"batches(): {msg}")

        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            bad(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad(f"seed must be a non-negative int, got {self.seed!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            bad(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        if self.epochs is not None and self.epochs < 0:
            bad(f"epochs must be >= 0 or None (endless), got {self.epochs}")
        if self.timestep_range is not None:
            lo, hi = self.timestep_range
            if lo > hi:
                bad(f"timestep_range=({lo}, {hi}) is empty: give (low, high) with low <= high (inclusive)")
        if self.stream is not None and self.stream not in STREAMS:
            bad(f"stream must be one of {sorted(STREAMS)} or None, got {self.stream!r}")
        known = {"acts", INDEX_COLUMN, *COLUMNS}
        unknown = [c for c in self.columns if c not in known]
        if unknown or not self.columns:
            bad(f"unknown columns {unknown}; choose from {sorted(known)}")
        if self.branch not in ("all", "both", "cond", "uncond"):
            bad(f"branch must be 'cond', 'uncond' or 'both', got {self.branch!r}")
        if not isinstance(self.io_threads, int) or self.io_threads < 1:
            bad(f"io_threads must be an int >= 1, got {self.io_threads!r}")
        for name in ("buffer_rows", "chunk_rows"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                bad(f"{name} must be positive, got {v}")

    def filter_columns(self) -> list[str]:
        return [c for c, on in (("timestep", self.timestep_range), ("step", self.steps), ("stream", self.stream)) if on is not None]

    def mask(self, cols: dict[str, np.ndarray]) -> np.ndarray:
        n = len(next(iter(cols.values())))
        m = np.ones(n, dtype=bool)
        if self.timestep_range is not None:
            lo, hi = self.timestep_range
            m &= (cols["timestep"] >= np.float32(lo)) & (cols["timestep"] <= np.float32(hi))
        if self.steps is not None:
            m &= np.isin(cols["step"], np.asarray(self.steps, dtype=np.int64))
        if self.stream is not None:
            m &= cols["stream"] == STREAMS[self.stream]
        return m


@dataclass(frozen=True)
class Piece:
    """Selected rows of one shard: a contiguous range [start, stop) or explicit sorted rows."""

    shard: int
    start: int
    stop: int
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return self.stop - self.start if self.rows is None else len(self.rows)

    def sub(self, a: int, b: int) -> Piece:
        if self.rows is None:
            return Piece(self.shard, self.start + a, self.start + b)
        return Piece(self.shard, 0, 0, self.rows[a:b])

    def local_rows(self) -> np.ndarray:
        return np.arange(self.start, self.stop, dtype=np.int64) if self.rows is None else self.rows.astype(np.int64)


def make_chunks(selection: list[int | np.ndarray], chunk_rows: int) -> list[Piece]:
    """Chunks in natural order; `selection[i]` is a shard's row count (all rows) or its selected rows."""
    out: list[Piece] = []
    for i, sel in enumerate(selection):
        if isinstance(sel, (int, np.integer)):
            out += [Piece(i, a, min(a + chunk_rows, int(sel))) for a in range(0, int(sel), chunk_rows)]
            continue
        if len(sel) == 0:
            continue
        win = sel // chunk_rows
        cuts = np.flatnonzero(np.diff(win)) + 1
        out += [Piece(i, 0, 0, part) for part in np.split(sel, cuts)]
    return out


def rank_bounds(total: int, spec: BatchSpec) -> tuple[int, int]:
    """This rank's [lo, hi) of an epoch's row stream.

    Shares differ by at most one row; with drop_last they are made equal (the < world_size rows
    at the end of the shuffled stream sit out this epoch) so every DDP rank takes the same
    number of steps.
    """
    W, r = spec.world_size, spec.rank
    if spec.drop_last and W > 1:
        share = total // W
        return r * share, (r + 1) * share
    return total * r // W, total * (r + 1) // W


def rank_pieces(chunks: list[Piece], spec: BatchSpec, epoch: int) -> list[Piece]:
    """This rank's share of the epoch's chunk stream: a contiguous slice (see rank_bounds)."""
    if spec.shuffle:
        order = np.random.default_rng([spec.seed, epoch, 0]).permutation(len(chunks))
    else:
        order = np.arange(len(chunks))
    sizes = np.array([len(chunks[i]) for i in order], dtype=np.int64)
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if len(ends) else 0
    lo, hi = rank_bounds(total, spec)
    out = []
    for k, i in enumerate(order):
        end, start = int(ends[k]), int(ends[k] - sizes[k])
        if end <= lo or start >= hi:
            continue
        a, b = max(lo, start) - start, min(hi, end) - start
        out.append(chunks[i] if (a, b) == (0, int(sizes[k])) else chunks[i].sub(a, b))
    return out


def coalesce(rows: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Merge sorted rows into read ranges [a, b); also positions of `rows` in the concatenated read.

    Positions are None when the read is exactly the rows (no gaps read through).
    """
    if len(rows) == 0:
        return np.zeros((0, 2), np.int64), None
    breaks = np.flatnonzero(np.diff(rows) > max_gap + 1) + 1
    starts = rows[np.r_[0, breaks]]
    stops = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
    runs = np.stack([starts, stops], axis=1).astype(np.int64)
    if int((stops - starts).sum()) == len(rows) and bool(np.all(np.diff(rows) > 0)):
        return runs, None
    run_id = np.zeros(len(rows), np.int64)
    run_id[breaks] = 1
    run_id = np.cumsum(run_id)
    base = np.r_[0, np.cumsum(stops - starts)[:-1]]
    return runs, rows - starts[run_id] + base[run_id]


def acts_to_torch(raw: np.ndarray, st_dtype: str) -> torch.Tensor:
    """Stored rows -> float32 tensor; bf16 arrives as uint16 because numpy has no bfloat16.

    bf16 is the top half of a float32, so widening is a 16-bit shift. numpy does it in one
    single-threaded pass; torch's `.float()` is as fast on an idle machine but slows down
    several-fold when its worker threads compete for busy cores.
    """
    if st_dtype == "BF16":
        out = np.empty(raw.shape, np.uint32)
        np.left_shift(raw, 16, out=out, dtype=np.uint32)
        return torch.from_numpy(out.view(np.float32))
    return torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))


_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Stopped(Exception):
    """Raised inside the producer when the consumer went away."""


def prefetched(make: Callable[[], Iterator], depth: int, stop: threading.Event | None = None) -> Iterator:
    """Run the iterator `make()` in a background thread, `depth` items ahead (I/O overlaps compute)."""
    if depth <= 0:
        yield from make()
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = stop or threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in make():
                if not put(item):
                    return
            put(_END)
        except _Stopped:
            return
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failure(e))

    th = threading.Thread(target=work, name="difflens-store-prefetch", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        th.join(timeout=5)


class BufferRing:
    """A few shuffle buffers, reused: one is filled (in a thread) while the consumer drains another.

    Each buffer is a dict column -> array of `capacity` rows; rows are read straight into it,
    so the only copies are the kernel's read and the gather that forms a batch.
    """

    def __init__(self, n: int, alloc: Callable[[], dict[str, np.ndarray]]):
        self._free: queue.Queue = queue.Queue()
        for _ in range(n):
            self._free.put(None)
        self._alloc = alloc
        self.stop = threading.Event()

    def take(self) -> dict[str, np.ndarray]:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                buf = self._free.get(timeout=0.1)
            except queue.Empty:
                continue
            return self._alloc() if buf is None else buf

    def give(self, buf: dict[str, np.ndarray]) -> None:
        self._free.put(buf)


def fill_buffers(
    pieces: list[Piece],
    read_into: Callable[[Piece, dict[str, np.ndarray], int], None],
    ring: BufferRing,
    reserve: int,
    buffer_rows: int,
    pool: ThreadPoolExecutor | None,
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Yield (buffer, end): rows [reserve, end) hold whole pieces, at least buffer_rows unless last.

    Every piece has its own destination rows, so a pool can read them concurrently: on network
    or virtual disks several requests in flight are what keeps the device busy.
    """
    k = 0
    while k < len(pieces):
        load, pos = [], reserve
        while k < len(pieces) and pos - reserve < buffer_rows:
            load.append((pieces[k], pos))
            pos += len(pieces[k])
            k += 1
        buf = ring.take()
        if pool is None:
            for p, at in load:
                read_into(p, buf, at)
        else:
            for fut in [pool.submit(read_into, p, buf, at) for p, at in load]:
                fut.result()
        yield buf, pos


# Streams still open at interpreter exit (a consumer kept one in a global or a traceback): closed by
# an atexit hook while modules are intact. Left to interpreter teardown, their cleanup (stopping the
# prefetch thread, shutting the I/O pool) would run against half-cleared modules and print errors.
_OPEN_STREAMS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    for stream in list(_OPEN_STREAMS):
        stream.close()


def shuffled_batches(*args, **kwargs) -> Iterator[dict[str, torch.Tensor]]:
    """`_shuffled_batches` (same arguments), closed at interpreter exit if still open."""
    stream = _shuffled_batches(*args, **kwargs)
    _OPEN_STREAMS.add(stream)
    return stream


def _shuffled_batches(
    spec: BatchSpec,
    epoch: int,
    pieces: list[Piece],
    read_into: Callable[[Piece, dict[str, np.ndarray], int], None],
    alloc: Callable[[int], dict[str, np.ndarray]],
    buffer_rows: int,
    max_piece: int,
    to_torch: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]],
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of batches for this rank: every row of `pieces` exactly once (minus drop_last).

    Rows left over after a buffer's full batches (< batch_size) are copied into the reserved
    front of the next buffer and shuffled with it.
    """
    rng = np.random.default_rng([spec.seed, epoch, 1, spec.rank])
    B = spec.batch_size
    capacity = B + buffer_rows + max_piece
    ring = BufferRing(2 if spec.prefetch else 1, lambda: alloc(capacity))
    left: dict[str, np.ndarray] | None = None
    n_left = 0
    pool = ThreadPoolExecutor(spec.io_threads, thread_name_prefix="difflens-store-io") if spec.io_threads > 1 else None
    source = prefetched(lambda: fill_buffers(pieces, read_into, ring, B, buffer_rows, pool), int(spec.prefetch), ring.stop)
    try:
        for buf, end in source:
            start = B - n_left
            if n_left:
                for k, v in left.items():
                    buf[k][start:B] = v
            n = end - start
            order = (rng.permutation(n) if spec.shuffle else np.arange(n)) + start
            full = n // B
            for b in range(full):
                idx = order[b * B : (b + 1) * B]
                yield to_torch({k: np.take(v, idx, axis=0) for k, v in buf.items()})
            rest = order[full * B :]
            left = {k: np.take(v, rest, axis=0) for k, v in buf.items()}
            n_left = len(rest)
            ring.give(buf)
        if n_left and not spec.drop_last:
            yield to_torch(left)
    finally:
        ring.stop.set()
        source.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
