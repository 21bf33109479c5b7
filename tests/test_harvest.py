import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from difflens.errors import DifflensError
from difflens.harvest import HarvestConfig, harvest
from difflens.world.prompts import world_prompts
from difflens.hooks import HookSet
from difflens.models.toy.adapter import ToyAdapter
from difflens.store import Store
from difflens.world.labels import token_label_masks
from difflens.world.scene import Scene, render
from toy_fixtures import make_tiny_toy

SITES = ["transformer_blocks.1:img", "transformer_blocks.0:txt", "transformer_blocks.1.ff.net.0:img"]


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    return make_tiny_toy(tmp_path_factory.mktemp("tiny_toy"))


@pytest.fixture(scope="module")
def adapter(toy_folder):
    return ToyAdapter.load(folder=toy_folder)


def cfg(**kw):
    base = dict(sites=SITES, steps=3, tokens_per_image=8, batch_size=3, seeds=[0, 5])
    base.update(kw)
    return HarvestConfig(**base)


def rows_by_key(store: Store, site: str):
    m = store.meta(site)
    acts = store.read_rows(site, np.arange(store.num_rows(site))).float().numpy()
    keys = list(zip(m["sample_id"].tolist(), m["step"].tolist(), m["token"].tolist()))
    return dict(zip(keys, acts)), m


def test_harvest_coordinates_labels_and_values(tmp_path, adapter):
    prompts, scenes = world_prompts(4, seed=3)
    out = harvest(tmp_path / "s", cfg(), prompts, scenes=scenes, adapter=adapter)
    store = Store(tmp_path / "s")
    assert sorted(store.sites) == sorted(SITES)
    n_samples = 4 * 2
    ts = adapter.timesteps(3)
    for site in SITES:
        assert store.num_rows(site) == n_samples * 3 * 8
        _, m = rows_by_key(store, site)
        assert np.allclose(m["timestep"], np.array(ts, np.float32)[m["step"]])
        if site.endswith(":img"):
            assert (m["h"].astype(int) * 16 + m["w"] == m["token"]).all()
        else:
            assert (m["h"] == -1).all() and (m["stream"] == 1).all()
    assert out["rows_written"] == 3 * n_samples * 3 * 8
    samples = store.samples()
    assert [s["sample_id"] for s in samples] == list(range(n_samples))
    # Labels are the reference scene's per-token concepts.
    _, m = rows_by_key(store, SITES[0])
    for s in samples:
        expect = token_label_masks(render(Scene.from_dict(s["scene"])))
        sel = m["sample_id"] == s["sample_id"]
        assert (m["labels"][sel] == expect[m["token"][sel]]).all()
        assert store.image_path(s["sample_id"]).exists()
    # Text rows carry the world's labels of the words, tokenized by the adapter's own tokenizer.
    _, mt = rows_by_key(store, "transformer_blocks.0:txt")
    world = adapter.ground_truth()
    for s in samples:
        expect = world.text_labels(s["prompt"], adapter.text_tokenizer())
        sel = mt["sample_id"] == s["sample_id"]
        assert (mt["labels"][sel] == expect[mt["token"][sel]]).all()
    assert mt["labels"].any()
    # Stored activations equal what a hook sees in a direct generation.
    seen = {}

    def grab(acts, ctx):
        seen[ctx.step] = acts[ctx.is_cond][0].clone()

    adapter.generate([prompts[1]], [5], steps=3, hooks=HookSet().add(SITES[0], grab))
    rows, _ = rows_by_key(store, SITES[0])
    sid = 1 * 2 + 1
    for (s, step, tok), a in rows.items():
        if s == sid:
            np.testing.assert_allclose(a, seen[step][tok].numpy(), rtol=1e-5, atol=1e-5)


def test_steps_filter_and_both_branches(tmp_path, adapter):
    prompts, scenes = world_prompts(2, seed=4)
    harvest(tmp_path / "s", cfg(record_steps=[0, 2], cond_only=False, seeds=[0]), prompts, scenes=scenes, adapter=adapter)
    store = Store(tmp_path / "s")
    m = store.meta(SITES[0])
    assert set(m["step"].tolist()) == {0, 2}
    assert store.num_rows(SITES[0]) == 2 * 2 * 2 * 8  # samples x steps x branches x tokens


def test_resume_gives_no_duplicates_and_no_gaps(tmp_path, adapter):
    prompts, scenes = world_prompts(5, seed=5)
    harvest(tmp_path / "full", cfg(), prompts, scenes=scenes, adapter=adapter)
    harvest(tmp_path / "part", cfg(), prompts, scenes=scenes, adapter=adapter, stop_after_units=2)
    assert Store(tmp_path / "part").num_rows(SITES[0]) < Store(tmp_path / "full").num_rows(SITES[0])
    with pytest.raises(DifflensError, match="--resume"):
        harvest(tmp_path / "part", cfg(), prompts, scenes=scenes, adapter=adapter)
    harvest(tmp_path / "part", cfg(), prompts, scenes=scenes, adapter=adapter, resume=True)
    for site in SITES:
        a, _ = rows_by_key(Store(tmp_path / "full"), site)
        b, mb = rows_by_key(Store(tmp_path / "part"), site)
        assert len(mb["sample_id"]) == len(a)  # no duplicates
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_other_config_refused(tmp_path, adapter):
    prompts, scenes = world_prompts(2, seed=6)
    harvest(tmp_path / "s", cfg(), prompts, scenes=scenes, adapter=adapter)
    with pytest.raises(DifflensError):
        harvest(tmp_path / "s", cfg(steps=4), prompts, scenes=scenes, adapter=adapter, resume=True)


def test_bad_config_errors():
    with pytest.raises(DifflensError, match="tokens-per-image"):
        cfg(tokens_per_image=4, token_fraction=0.5).validate()
    with pytest.raises(DifflensError, match="step-window"):
        cfg(record_steps=[7]).validate()


def _cli(*args, env=None):
    return [sys.executable, "-m", "difflens", "harvest", *args]


def _env():
    env = dict(os.environ)
    env["DIFFLENS_QUIET"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_kill_9_then_resume(tmp_path, toy_folder):
    common = ["--model", str(toy_folder), "--sites", "transformer_blocks.1:img", "--num-prompts", "24",
              "--steps", "3", "--tokens-per-image", "8", "--batch-size", "2"]
    subprocess.run(_cli(*common, "--out", str(tmp_path / "full")), check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen(_cli(*common, "--out", str(tmp_path / "killed")), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    units = tmp_path / "killed" / "units"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if units.exists() and len(list(units.glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "harvest finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = subprocess.run(_cli(*common, "--out", str(tmp_path / "killed"), "--resume"), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    site = "transformer_blocks.1:img"
    a, _ = rows_by_key(Store(tmp_path / "full"), site)
    b, mb = rows_by_key(Store(tmp_path / "killed"), site)
    assert len(mb["sample_id"]) == len(a) and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_torchrun_two_ranks_one_store(tmp_path, toy_folder):
    common = ["--model", str(toy_folder), "--sites", "transformer_blocks.1:img", "--num-prompts", "6",
              "--steps", "2", "--tokens-per-image", "4", "--batch-size", "2"]
    subprocess.run(_cli(*common, "--out", str(tmp_path / "one")), check=True, env=_env(), capture_output=True)
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         "-m", "difflens", "harvest", *common, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    site = "transformer_blocks.1:img"
    a, _ = rows_by_key(Store(tmp_path / "one"), site)
    b, mb = rows_by_key(Store(tmp_path / "two"), site)
    assert len(mb["sample_id"]) == len(a) and a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)


def test_cli_errors(tmp_path):
    r = subprocess.run(_cli("--num-prompts", "0", "--out", str(tmp_path / "x")), env=_env(), capture_output=True, text=True)
    assert r.returncode != 0 and "num-prompts" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(_cli("--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")), env=_env(), capture_output=True, text=True)
    assert r.returncode != 0 and "not found" in r.stderr and "Traceback" not in r.stderr


# ---- the background store writer ------------------------------------------------------------------
def test_background_writer_order_bound_and_errors():
    import threading

    from difflens.store.background import BackgroundWriter

    gate = threading.Event()
    with BackgroundWriter(1) as w:
        w.submit(lambda: gate.wait(5) and "a")  # runs, blocked on the gate
        w.submit(lambda: "b")  # waits in the queue (max_pending=1)
        t = threading.Timer(0.3, gate.set)
        t.start()
        w.submit(lambda: "c")  # blocks until the first job is done and the queue has room
    assert w.results == ["a", "b", "c"] and w.wait_seconds >= 0.2

    ran = []
    w = BackgroundWriter(2)
    w.submit(lambda: (_ for _ in ()).throw(DifflensError("disk full")))
    w.submit(lambda: ran.append("after"))  # dropped: the writer stopped at the first failure
    with pytest.raises(DifflensError, match="disk full"):
        w.close()
    assert ran == []

    gate.clear()
    with pytest.raises(KeyboardInterrupt):
        with BackgroundWriter(3) as w:
            w.submit(lambda: gate.wait(0.3))
            w.submit(lambda: ran.append("queued"))
            raise KeyboardInterrupt  # the generating side fails: queued jobs are dropped, the running one ends
    assert ran == []
    assert BackgroundWriter(0).max_pending == 0


@pytest.mark.parametrize("queue", [0, 2])
def test_background_writes_equal_synchronous_ones(tmp_path, adapter, queue):
    prompts, scenes = world_prompts(4, seed=6)
    ref = harvest(tmp_path / "ref", cfg(), prompts, scenes=scenes, adapter=adapter, write_queue=0)
    out = harvest(tmp_path / f"q{queue}", cfg(), prompts, scenes=scenes, adapter=adapter, write_queue=queue)
    assert out["rows_written"] == ref["rows_written"] and out["bytes_written"] > 0
    assert Store(tmp_path / f"q{queue}").fingerprint() == Store(tmp_path / "ref").fingerprint()
    assert Store(tmp_path / f"q{queue}").samples() == Store(tmp_path / "ref").samples()


def test_a_failing_background_write_commits_whole_units_only_and_resumes(tmp_path, adapter, monkeypatch):
    from difflens.store import StoreWriter

    prompts, scenes = world_prompts(5, seed=5)  # 10 samples = 4 units of 3
    harvest(tmp_path / "full", cfg(), prompts, scenes=scenes, adapter=adapter)
    real = StoreWriter.write_unit

    def flaky(self, unit_id, *a, **kw):
        if unit_id.endswith("2"):
            raise DifflensError("no space left on device (planted)")
        return real(self, unit_id, *a, **kw)

    monkeypatch.setattr(StoreWriter, "write_unit", flaky)
    with pytest.raises(DifflensError, match="planted"):
        harvest(tmp_path / "part", cfg(), prompts, scenes=scenes, adapter=adapter, write_queue=2)
    monkeypatch.setattr(StoreWriter, "write_unit", real)
    units = sorted(p.name for p in (tmp_path / "part" / "units").glob("*.json"))
    assert units == ["u0000000.json", "u0000001.json"]  # nothing after the failure, nothing half
    harvest(tmp_path / "part", cfg(), prompts, scenes=scenes, adapter=adapter, resume=True)
    for site in SITES:
        a, _ = rows_by_key(Store(tmp_path / "full"), site)
        b, mb = rows_by_key(Store(tmp_path / "part"), site)
        assert len(mb["sample_id"]) == len(a) and a.keys() == b.keys()
    with pytest.raises(DifflensError, match="--write-queue"):
        harvest(tmp_path / "x", cfg(), prompts, scenes=scenes, adapter=adapter, write_queue=-1)
