"""Activation store: round trips, shuffled streaming, crash safety, concurrency, integrity, stats."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflens.errors import DifflensError
from difflens.store import SCHEMA_VERSION, Store, StoreWriter
from difflens.store.format import image_rel
from difflens.store.fsio import _HOST

IMG, TXT = "blk.1:img", "blk.1:txt"
SITES = {IMG: 12, TXT: 6}
TIMESTEPS = (1000.0, 625.0, 250.0)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("DIFFLENS_QUIET", "1")


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_unit(u: int, n_samples: int = 2, grid: int = 2, n_txt: int = 3):
    """Rows for one unit: per step, per sample, grid*grid image tokens and n_txt text tokens."""
    g = torch.Generator().manual_seed(1000 + u)
    out = {}
    for site, stream in ((IMG, 0), (TXT, 1)):
        n_tok = grid * grid if stream == 0 else n_txt
        m = {k: [] for k in ("sample_id", "prompt_id", "seed", "step", "timestep", "token", "h", "w", "stream", "labels")}
        for step, t in enumerate(TIMESTEPS):
            for s in range(n_samples):
                sid = u * 100 + s
                for tok in range(n_tok):
                    m["sample_id"].append(sid)
                    m["prompt_id"].append(sid // 2)
                    m["seed"].append(7 + sid)
                    m["step"].append(step)
                    m["timestep"].append(t)
                    m["token"].append(tok)
                    m["h"].append(tok // grid if stream == 0 else -1)
                    m["w"].append(tok % grid if stream == 0 else -1)
                    m["stream"].append(stream)
                    m["labels"].append(1 << (sid % 5))
        n = len(m["sample_id"])
        shift = torch.tensor(m["timestep"]).unsqueeze(1) / 250.0  # statistics differ per timestep
        acts = torch.randn(n, SITES[site], generator=g) + shift
        out[site] = (acts, {k: np.asarray(v) for k, v in m.items()})
    samples = [{"sample_id": u * 100 + s, "prompt": f"a red circle {u}.{s}", "prompt_id": (u * 100 + s) // 2,
                "seed": 7 + u * 100 + s, "factors": {"shape": "circle"}} for s in range(n_samples)]
    images = {u * 100 + s: _png(u * 10 + s) for s in range(n_samples)}
    return out, samples, images


def open_writer(path, dtype="fp32", **kw):
    kw.setdefault("harvest_config", {"steps": len(TIMESTEPS), "prompts": "grammar-v1"})
    return StoreWriter.open(path, model="toy", sites=SITES, dtype=dtype, **kw)


def build(path, units=range(4), dtype="fp32", finalize=True):
    w = open_writer(path, dtype)
    made = {}
    for u in units:
        rows, samples, images = make_unit(u)
        w.write_unit(f"u{u:03d}", rows, samples, images)
        made[u] = rows
    if finalize:
        w.finalize()
    return made


def expected(made, site, dtype):
    acts = torch.cat([made[u][site][0] for u in sorted(made)])
    if dtype == "bf16":
        acts = acts.to(torch.bfloat16).float()
    meta = {k: np.concatenate([made[u][site][1][k] for u in sorted(made)]) for k in made[min(made)][site][1]}
    return acts, meta


def all_indices(stream):
    return np.concatenate([b["index"].numpy() for b in stream])


# ---- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_round_trip(tmp_path, dtype):
    made = build(tmp_path / "s", dtype=dtype)
    store = Store(tmp_path / "s")
    assert store.dtype == dtype and store.sites == sorted(SITES) and store.d(IMG) == 12
    assert store.manifest["schema_version"] == SCHEMA_VERSION
    for site in SITES:
        acts, meta = expected(made, site, dtype)
        assert store.num_rows(site) == len(acts)
        got = store.meta(site)
        assert set(got) == set(meta)
        for k in meta:
            np.testing.assert_array_equal(got[k], meta[k].astype(got[k].dtype))
        assert got["h"].dtype == np.int16 and got["stream"].dtype == np.int8 and got["timestep"].dtype == np.float32
        assert torch.equal(store.read_rows(site, np.arange(len(acts))), acts)
        idx = [5, 0, len(acts) - 1, 5, 17]
        assert torch.equal(store.read_rows(site, idx), acts[idx])
        batches = list(store.batches(site, 7, shuffle=False, columns=("acts", "timestep", "sample_id")))
        assert torch.equal(torch.cat([b["acts"] for b in batches]), acts)
        assert batches[0]["acts"].dtype == torch.float32 and batches[0]["acts"].shape == (7, SITES[site])
        np.testing.assert_array_equal(torch.cat([b["sample_id"] for b in batches]).numpy(), meta["sample_id"])
    samples = store.samples()
    assert [s["sample_id"] for s in samples] == [0, 1, 100, 101, 200, 201, 300, 301]
    assert samples[2]["prompt"] == "a red circle 1.0" and samples[2]["image"] == image_rel(100)
    assert store.image_path(301).read_bytes() == _png(31)
    with pytest.raises(DifflensError, match="no image for sample 999"):
        store.image_path(999)


def test_shards_are_plain_safetensors(tmp_path):
    from safetensors import safe_open

    made = build(tmp_path / "s", units=[0], dtype="bf16")
    with safe_open(str(tmp_path / "s" / "shards" / "u000.safetensors"), framework="pt") as f:
        acts = f.get_tensor(f"{IMG}/acts")
        assert acts.dtype == torch.bfloat16
        assert torch.equal(acts, made[0][IMG][0].to(torch.bfloat16))
        assert f.metadata()["unit_id"] == "u000"


def test_readable_before_finalize(tmp_path):
    made = build(tmp_path / "s", units=[0, 1], finalize=False)
    store = Store(tmp_path / "s")
    assert store.num_rows(IMG) == len(expected(made, IMG, "fp32")[0])
    assert store.manifest["num_rows"][IMG] == store.num_rows(IMG)


# ---- batches ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """12 units, 288 image rows: enough chunks and buffer refills to exercise the shuffler."""
    path = tmp_path_factory.mktemp("big") / "s"
    made = build(path, units=range(12), dtype="bf16")
    return Store(path), made


def test_shuffled_batches_exactly_once_and_match_rows(big_store):
    store, made = big_store
    n = store.num_rows(IMG)
    stream = store.batches(IMG, 16, seed=3, epochs=2, chunk_rows=5, buffer_rows=40, columns=("acts", "index", "step"))
    batches = list(stream)
    assert len(batches) == len(stream)
    idx = np.concatenate([b["index"].numpy() for b in batches])
    assert Counter(idx.tolist()) == Counter({i: 2 for i in range(n)})
    assert not np.array_equal(idx[:n], np.arange(n))  # shuffled
    assert not np.array_equal(idx[:n], idx[n:])  # each epoch its own order
    acts, meta = expected(made, IMG, "bf16")
    for b in batches[:5]:
        assert torch.equal(b["acts"], acts[b["index"]])
        assert torch.equal(b["step"].long(), torch.from_numpy(meta["step"][b["index"].numpy()]).long())
    # a batch mixes rows of several units (the buffer holds several chunks)
    assert len({int(i) // 24 for i in batches[0]["index"]}) > 2


def test_a_stream_left_open_at_exit_closes_quietly(big_store):
    """A consumer that keeps a half-read stream (in a global, say) until the interpreter exits: the
    stream's prefetch thread and I/O pool are stopped before modules are torn down, so nothing is
    printed (before the atexit hook, teardown printed "'NoneType' object has no attribute 'Empty'")."""
    store, _ = big_store
    code = (f"from difflens.store import Store\n"
            f"KEEP = iter(Store({str(store.root)!r}).batches({IMG!r}, 4, chunk_rows=3, buffer_rows=12, io_threads=4))\n"
            f"next(KEEP)\n")
    for _ in range(3):  # the teardown race did not lose every time
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_batches_deterministic_by_seed(big_store):
    store, _ = big_store
    kw = dict(chunk_rows=8, buffer_rows=50, columns=("index",))
    a = all_indices(store.batches(IMG, 10, seed=1, **kw))
    b = all_indices(store.batches(IMG, 10, seed=1, **kw))
    c = all_indices(store.batches(IMG, 10, seed=2, **kw))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    stream = store.batches(IMG, 10, seed=1, prefetch=False, **kw)  # inline reads give the same stream
    np.testing.assert_array_equal(all_indices(stream), a)
    np.testing.assert_array_equal(all_indices(stream), a)  # and re-iterating replays it
    np.testing.assert_array_equal(all_indices(store.batches(IMG, 10, seed=1, io_threads=1, **kw)), a)


def test_coalesce_reads_through_small_gaps():
    from difflens.store.shuffle import coalesce

    rows = np.array([3, 4, 5, 9, 10, 40])
    runs, pos = coalesce(rows, max_gap=3)
    assert runs.tolist() == [[3, 11], [40, 41]]
    assert pos.tolist() == [0, 1, 2, 6, 7, 8]  # positions inside the concatenated read
    runs, pos = coalesce(np.array([2, 3, 4]), max_gap=0)
    assert runs.tolist() == [[2, 5]] and pos is None
    runs, pos = coalesce(np.array([0, 0, 2]), max_gap=1)  # duplicates need positions too
    assert runs.tolist() == [[0, 3]] and pos.tolist() == [0, 0, 2]


def test_filters(big_store):
    store, _ = big_store
    meta = store.meta(TXT)
    cases = [
        (dict(timestep_range=(250.0, 625.0)), (meta["timestep"] >= 250) & (meta["timestep"] <= 625)),
        (dict(timestep_range=(1000.0, 1000.0)), meta["timestep"] == 1000),
        (dict(steps=[0, 2]), np.isin(meta["step"], [0, 2])),
        (dict(stream="txt", steps=[1]), meta["step"] == 1),
    ]
    for kw, mask in cases:
        got = all_indices(store.batches(TXT, 9, seed=0, chunk_rows=4, columns=("index", "timestep", "step"), **kw))
        assert sorted(got.tolist()) == np.flatnonzero(mask).tolist(), kw
    with pytest.raises(DifflensError, match="no rows of site blk.1:txt match"):
        store.batches(TXT, 9, stream="img")
    with pytest.raises(DifflensError, match="timestep_range"):
        store.batches(TXT, 9, timestep_range=(600, 200))
    with pytest.raises(DifflensError, match="stream must be one of"):
        store.batches(TXT, 9, stream="image")
    with pytest.raises(DifflensError, match="unknown columns"):
        store.batches(TXT, 9, columns=("acts", "colour"))
    with pytest.raises(DifflensError, match="site 'nope' is not in store"):
        store.batches("nope", 9)


def test_filtered_batch_values(big_store):
    store, made = big_store
    acts, meta = expected(made, IMG, "bf16")
    for b in store.batches(IMG, 5, steps=[1], chunk_rows=3, columns=("acts", "index", "timestep")):
        assert (b["timestep"] == 625.0).all()
        assert torch.equal(b["acts"], acts[b["index"]])


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_partitions_disjoint_and_complete(big_store, world_size):
    store, _ = big_store
    n = store.num_rows(IMG)
    parts = []
    for r in range(world_size):
        s = store.batches(IMG, 8, seed=5, rank=r, world_size=world_size, chunk_rows=7, columns=("index",))
        got = all_indices(s)
        assert len(got) == s.rows_per_epoch
        parts.append(set(got.tolist()))
    assert sum(len(p) for p in parts) == n and set().union(*parts) == set(range(n))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    with pytest.raises(DifflensError, match="rank"):
        store.batches(IMG, 8, rank=world_size, world_size=world_size)


def test_drop_last_gives_ranks_equal_steps(big_store):
    store, _ = big_store
    n = store.num_rows(IMG)  # 288 rows over 5 ranks: shares of 57 or 58, i.e. 1 or 2 batches of 29
    assert n == 288
    streams = [store.batches(IMG, 29, rank=r, world_size=5, drop_last=True, columns=("index",)) for r in range(5)]
    got = [all_indices(s) for s in streams]
    assert [len(g) for g in got] == [29] * 5 and [len(s) for s in streams] == [1] * 5
    assert len(set(np.concatenate(got).tolist())) == sum(len(g) for g in got)  # still disjoint


def test_drop_last_and_lengths(big_store):
    store, _ = big_store
    n = store.num_rows(IMG)
    s = store.batches(IMG, 50, drop_last=True, columns=("index",))
    sizes = [len(b["index"]) for b in s]
    assert sizes == [50] * (n // 50) and len(s) == n // 50
    s = store.batches(IMG, 50, columns=("index",))
    assert [len(b["index"]) for b in s][-1] == n % 50 and len(s) == -(-n // 50)


def test_endless_stream_and_start_epoch(big_store):
    store, _ = big_store
    n = store.num_rows(IMG)
    endless = iter(store.batches(IMG, n, epochs=None, columns=("index",)))
    first, second = next(endless)["index"], next(endless)["index"]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(n))
    resumed = next(iter(store.batches(IMG, n, start_epoch=1, columns=("index",))))["index"]
    assert torch.equal(resumed, second)


# ---- crash safety and resume ------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_resume_after_crash_between_shard_and_commit(tmp_path, monkeypatch):
    path = tmp_path / "s"
    w = open_writer(path)
    w.write_unit("u000", *make_unit(0))

    def crash(self, record_path, record):
        raise KeyboardInterrupt("killed before commit")

    monkeypatch.setattr(StoreWriter, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        w.write_unit("u001", *make_unit(1))
    monkeypatch.undo()
    assert (path / "shards" / "u001.safetensors").exists()  # written but not committed
    # leftovers of a writer killed mid-write: a dead process's temp file, and a live one's
    dead = path / "shards" / f".u002.safetensors.{_HOST}.{_dead_pid()}.0123abcd.tmp"
    dead.write_bytes(b"partial")
    live = path / "shards" / f".u003.safetensors.{_HOST}.{os.getppid()}.0123abcd.tmp"
    live.write_bytes(b"someone else's work in progress")

    assert Store(path).num_rows(IMG) == 24  # the uncommitted unit is invisible
    w = open_writer(path)  # resume
    assert not dead.exists() and live.exists()
    assert w.done_units() == {"u000"}
    made = {}
    for u in range(4):
        made[u] = make_unit(u)[0]
        if f"u{u:03d}" not in w.done_units():
            w.write_unit(f"u{u:03d}", *make_unit(u))
    with pytest.raises(DifflensError, match="already committed"):
        w.write_unit("u001", *make_unit(1))
    w.finalize(prune=True)
    assert not live.exists()
    store = Store(path)
    acts, meta = expected(made, IMG, "fp32")
    assert torch.equal(store.read_rows(IMG, np.arange(store.num_rows(IMG))), acts)
    np.testing.assert_array_equal(store.meta(IMG)["sample_id"], meta["sample_id"])
    assert [s["sample_id"] for s in store.samples()] == [0, 1, 100, 101, 200, 201, 300, 301]
    store.verify()


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_store import make_unit, open_writer
    w = open_writer({path!r})
    for u in range(40):
        if f"u{{u:03d}}" not in w.done_units():
            w.write_unit(f"u{{u:03d}}", *make_unit(u, n_samples=8, grid=4))
    """
)


def test_kill9_at_any_moment_then_resume(tmp_path):
    path = tmp_path / "s"
    script = _KILL_SCRIPT.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "DIFFLENS_QUIET": "1"}, stderr=subprocess.PIPE
    )
    units = path / "units"
    while proc.poll() is None and not (units.is_dir() and len(list(units.glob("*.json"))) >= 3):
        time.sleep(0.01)  # no deadline: slow machines are slow; a hung child is pytest-timeout's job
    assert proc.poll() is None, f"writer exited early: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)  # wherever it is: mid-shard, mid-rename, mid-commit
    proc.wait()
    proc.stderr.close()
    committed = len(list(units.glob("*.json")))
    assert committed >= 3
    Store(path).verify()  # consistent right after the kill
    w = open_writer(path)
    todo = [u for u in range(40) if f"u{u:03d}" not in w.done_units()]
    assert len(todo) == 40 - committed
    for u in todo:
        w.write_unit(f"u{u:03d}", *make_unit(u, n_samples=8, grid=4))
    w.finalize()
    store = Store(path)
    store.verify()
    sid = store.meta(IMG, ["sample_id"])["sample_id"]
    per_unit = len(TIMESTEPS) * 16  # rows per sample
    assert Counter(sid.tolist()) == Counter({u * 100 + s: per_unit for u in range(40) for s in range(8)})
    assert not list(path.rglob("*.tmp"))


# ---- configuration checks on reopen -----------------------------------------------------------


def test_reopen_with_other_config_refused_unless_append(tmp_path):
    path = tmp_path / "s"
    build(path, units=[0])
    open_writer(path)  # same config: fine (resume)
    with pytest.raises(DifflensError, match=r"different harvest_config.*append=True"):
        open_writer(path, harvest_config={"steps": 8})
    with pytest.raises(DifflensError, match="different model"):
        StoreWriter.open(path, model="flux", sites=SITES, dtype="fp32", harvest_config={})
    with pytest.raises(DifflensError, match="different dtype"):
        open_writer(path, dtype="bf16")
    w = open_writer(path, harvest_config={"steps": 8}, append=True)
    w.write_unit("u001", *make_unit(1))
    store = Store(path)
    cfgs = store.manifest["configs"]
    assert [c["harvest_config"] for c in cfgs] == [{"steps": 3, "prompts": "grammar-v1"}, {"steps": 8}]
    assert {r.unit_id: r.config for r in store.records} == {"u000": 0, "u001": 1}
    open_writer(path, harvest_config={"steps": 8})  # now a known config: no append needed
    with pytest.raises(DifflensError, match="mix dtypes"):
        open_writer(path, dtype="bf16", append=True)
    with pytest.raises(DifflensError, match="width cannot change"):
        StoreWriter.open(path, model="toy", sites={IMG: 99}, dtype="fp32", harvest_config={}, append=True)


def test_not_a_store(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(DifflensError, match="not empty"):
        open_writer(tmp_path)
    with pytest.raises(DifflensError, match="not a difflens store"):
        Store(tmp_path)
    with pytest.raises(DifflensError, match="does not exist"):
        Store(tmp_path / "missing")


# ---- concurrent writers -----------------------------------------------------------------------


def _rank_worker(path: str, rank: int, barrier) -> None:
    os.environ["DIFFLENS_QUIET"] = "1"
    units = [make_unit(u) for u in range(rank, 20, 2)]
    barrier.wait()  # both ranks create/open the store and write at the same time
    w = open_writer(path)
    for u, unit in zip(range(rank, 20, 2), units):
        w.write_unit(f"u{u:03d}", *unit)


def test_concurrent_writers(tmp_path):
    path = str(tmp_path / "s")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_rank_worker, args=(path, r, barrier)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        assert p.exitcode == 0
    w = open_writer(path)
    assert w.done_units() == {f"u{u:03d}" for u in range(20)}
    manifest = w.finalize()
    assert len(manifest["shards"]) == 20 and len(manifest["configs"]) == 1
    store = Store(path)
    made = {u: make_unit(u)[0] for u in range(20)}
    acts, _ = expected(made, TXT, "fp32")
    assert torch.equal(store.read_rows(TXT, np.arange(store.num_rows(TXT))), acts)
    assert len(store.samples()) == 40


# ---- integrity --------------------------------------------------------------------------------


def test_corrupt_shard_named_by_verify(tmp_path):
    path = tmp_path / "s"
    build(path, units=range(3))
    shard = path / "shards" / "u001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0xFF  # flip bits inside the tensor data
    shard.write_bytes(bytes(data))
    with pytest.raises(DifflensError, match=r"u001\.safetensors \(checksum mismatch.*--resume"):
        Store(path).verify()


def test_truncated_shard_named_on_read(tmp_path):
    path = tmp_path / "s"
    build(path, units=range(3))
    shard = path / "shards" / "u002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    store = Store(path)
    with pytest.raises(DifflensError, match=r"shard .*u002\.safetensors is damaged.*store repair"):
        store.meta(IMG)
    with pytest.raises(DifflensError, match=r"u002\.safetensors"):
        list(store.batches(IMG, 4))
    with pytest.raises(DifflensError, match=r"u002\.safetensors \(size"):
        store.verify()


def test_garbage_header_named(tmp_path):
    path = tmp_path / "s"
    build(path, units=[0])
    shard = path / "shards" / "u000.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00garbag\x01"
    shard.write_bytes(bytes(data))
    rec = json.loads((path / "units" / "u000.json").read_text())
    assert rec["bytes"] == len(data)  # same size: only the header check can catch it
    with pytest.raises(DifflensError, match=r"u000\.safetensors is damaged \(header is not valid JSON"):
        Store(path).read_rows(IMG, [0])


# ---- statistics and fingerprint ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_stats_match_numpy(tmp_path, dtype):
    path = tmp_path / "s"
    build(path, units=range(3), dtype=dtype)
    store = Store(path)
    assert json.loads((path / "stats.json").read_text())["fingerprint"] == store.fingerprint()
    for site in SITES:
        x = store.read_rows(site, np.arange(store.num_rows(site))).double().numpy()
        ts = store.meta(site, ["timestep"])["timestep"]
        st = store.stats(site)
        assert st.count == len(x)
        np.testing.assert_allclose(st.mean_D.numpy(), x.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(st.std_D.numpy(), x.std(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(st.mean_norm, np.linalg.norm(x, axis=1).mean(), rtol=1e-9)
        np.testing.assert_allclose(st.mean_sq_norm, (x * x).sum(1).mean(), rtol=1e-9)
        np.testing.assert_array_equal(st.timesteps_T, np.array(sorted(TIMESTEPS), np.float32))
        for i, t in enumerate(st.timesteps_T):
            xt = x[ts == t]
            assert st.count_T[i] == len(xt)
            np.testing.assert_allclose(st.mean_TD[i].numpy(), xt.mean(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(st.mean_norm_T[i], np.linalg.norm(xt, axis=1).mean(), rtol=1e-9)
        assert st.timestep_index(630.0) == 1


def test_stale_stats_recomputed(tmp_path):
    path = tmp_path / "s"
    build(path, units=[0])
    w = open_writer(path)
    w.write_unit("u001", *make_unit(1))  # stats.json now describes old content
    store = Store(path)
    x = store.read_rows(IMG, np.arange(store.num_rows(IMG))).double().numpy()
    assert store.stats(IMG).count == len(x)
    np.testing.assert_allclose(store.stats(IMG).mean_D.numpy(), x.mean(0), rtol=1e-5, atol=1e-5)


def test_fingerprint_tracks_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build(a, units=[0, 1])
    build(b, units=[0, 1])
    fa = Store(a).fingerprint()
    assert len(fa) == 16 and fa == Store(a).fingerprint() == Store(b).fingerprint()
    assert Store(a).manifest["fingerprint"] == fa
    w = open_writer(a)
    w.write_unit("u002", *make_unit(2))
    fa2 = Store(a).fingerprint()
    assert fa2 != fa
    w.finalize()
    assert Store(a).fingerprint() == fa2  # finalizing changes no content
    c = tmp_path / "c"  # same unit ids and shapes, different values
    w = open_writer(c)
    for u in (0, 1):
        rows, samples, images = make_unit(u)
        rows[IMG] = (rows[IMG][0] + 1.0, rows[IMG][1])
        w.write_unit(f"u{u:03d}", rows, samples, images)
    assert Store(c).fingerprint() != fa


# ---- input validation -------------------------------------------------------------------------


def test_write_validation(tmp_path):
    w = open_writer(tmp_path / "s")
    rows, samples, images = make_unit(0)
    acts, meta = rows[IMG]

    def bad(match, **change):
        r = dict(rows)
        r.update(change.pop("rows", {}))
        with pytest.raises(DifflensError, match=match):
            w.write_unit(change.pop("unit", "u009"), r, change.get("samples", samples), change.get("images", images))

    bad(r"shape \(24, 11\); expected \[N, 12\]", rows={IMG: (acts[:, :11], meta)})
    bad(r"column token has shape \(23,\)", rows={IMG: (acts, {**meta, "token": meta["token"][:-1]})})
    bad(r"missing \['seed'\]", rows={IMG: (acts, {k: v for k, v in meta.items() if k != "seed"})})
    bad(r"unknown \['cfg'\]", rows={IMG: (acts, {**meta, "cfg": meta["seed"]})})
    bad("column step must be integers", rows={IMG: (acts, {**meta, "step": meta["step"].astype(float)})})
    bad("outside int16 range", rows={IMG: (acts, {**meta, "h": meta["h"] + 40000})})
    bad("stream must be 0", rows={IMG: (acts, {**meta, "stream": meta["stream"] + 2})})
    bad("h and w must be -1 for text tokens", rows={TXT: (rows[TXT][0], {**rows[TXT][1], "h": rows[TXT][1]["h"] * 0})})
    bad("NaN/inf", rows={IMG: (acts * float("nan"), meta)})
    bad("acts must be floating point", rows={IMG: (acts.long(), meta)})
    bad("unknown site", rows={"blk.2:img": (acts, meta)})
    bad("not usable as a file name", unit="../evil")
    bad("not PNG bytes", images={0: b"JPEG"})
    bad("integer 'sample_id'", samples=[{"prompt": "x"}])
    with pytest.raises(DifflensError, match="dtype 'fp16' is not supported"):
        open_writer(tmp_path / "t", dtype="fp16")
    assert w.done_units() == set() and not list((tmp_path / "s" / "shards").iterdir())


def test_bf16_shards_read_with_numpy(tmp_path):
    """The recipe in docs/store.md: bf16 words widened to float32 give exactly what the reader returns."""
    from difflens.store.shardfile import SafetensorsFile

    build(tmp_path / "s", units=[0], dtype="bf16")
    raw = SafetensorsFile(tmp_path / "s" / "shards" / "u000.safetensors").read(f"{IMG}/acts")
    x = (raw.astype(np.uint32) << 16).view(np.float32)
    s = Store(tmp_path / "s")
    assert raw.dtype == np.uint16 and np.array_equal(x, s.read_rows(IMG, np.arange(s.num_rows(IMG))).numpy())


def test_branch_column_needs_an_explicit_choice_and_padding_is_left_out(tmp_path):
    """Issue 16 item 2: a both-branches store never mixes CFG branches silently; padding is not trained on."""
    from difflens.train.data import Filters

    w = open_writer(tmp_path / "s")
    for u in range(2):
        rows, samples, images = make_unit(u)
        for site, (acts, meta) in rows.items():
            n = len(meta["sample_id"])
            meta["branch"] = (np.arange(n) % 2).astype(np.int8)  # odd rows: unconditional
            meta["attn_mask"] = (np.arange(n) % 3 != 0).astype(np.int8) if site == TXT else np.ones(n, np.int8)
        w.write_unit(f"u{u:03d}", rows, samples, images)
    w.finalize()
    s = Store(tmp_path / "s")
    assert s.branches(IMG) == {"cond", "uncond"}
    with pytest.raises(DifflensError, match="both CFG branches.*branch='cond'"):
        s.batches(IMG, 8)
    meta = s.meta(IMG)
    cond = all_indices(s.batches(IMG, 8, branch="cond", columns=("acts", "index")))
    assert sorted(cond.tolist()) == np.flatnonzero(meta["branch"] == 0).tolist()
    assert len(all_indices(s.batches(IMG, 8, branch="both", columns=("acts", "index")))) == s.num_rows(IMG)
    tmeta = s.meta(TXT)
    real = all_indices(s.batches(TXT, 8, branch="both", columns=("acts", "index")))
    assert sorted(real.tolist()) == np.flatnonzero(tmeta["attn_mask"] == 1).tolist()
    with_pad = all_indices(s.batches(TXT, 8, branch="both", padding=True, columns=("acts", "index")))
    assert len(with_pad) == s.num_rows(TXT)
    assert Filters().store_kwargs()["branch"] == "cond"  # trainers and evaluation read the conditional branch


def test_recorder_writes_branch_and_samples_only_real_text_tokens():
    from types import SimpleNamespace

    from difflens.harvest.record import UnitRecorder

    rec = UnitRecorder(sample_ids=np.array([5]), prompt_ids=np.array([0]), seeds=np.array([0]), keep=lambda n: 3,
                       record_steps=None, cond_only=False, token_seed=0)
    valid = torch.tensor([[True, True, True, True, False, False, False, False]] * 2)
    ctx = SimpleNamespace(step=0, timestep=1000.0, grid_hw=(2, 2), sample_index=torch.tensor([0, 0]),
                          is_cond=torch.tensor([True, False]), text_mask=valid)
    rec.record("b:txt", "txt", torch.randn(2, 8, 4), ctx)
    acts, meta = rec.rows()["b:txt"]
    assert meta["branch"].tolist() == [0, 0, 0, 1, 1, 1]
    assert (meta["token"] < 4).all() and meta["attn_mask"].tolist() == [1] * 6
