"""The trainer: lockstep grid + layer sweep, held-out data, exact resume, clear errors."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_train_fixtures import SITE_A, SITE_B, make_store

import difflens
from difflens.errors import DifflensError
from difflens.train.config import DictSpec, TrainConfig, expand_specs
from difflens.train.data import Filters, SiteStream, choose_heldout, load_eval_slice
from difflens.train.trainer import Interrupted, train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "s")


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        steps=20, batch_size=64, lr=1e-2, warmup_steps=2, eval_every=10, checkpoint_every=8, log_every=2,
        eval_tokens=128, init_tokens=256, progress=False, scale_lr=False, dead_after_tokens=512,
    )
    base.update(kw)
    return TrainConfig(**base)


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    return load_file(str(folder / "weights.safetensors"))


# ---- data stream --------------------------------------------------------------------------------


def test_heldout_samples_never_reach_training(store):
    held = choose_heldout(store, SITE_A, 128, Filters())
    assert held == [0, 1]  # the first samples in store order: 2 × 64 rows >= 128
    stream = SiteStream(store, SITE_A, local_batch_size=64, seed=3, filters=Filters(), heldout=held)
    seen = torch.cat([stream.next()["sample_id"] for _ in range(20)])  # crosses into epoch 1
    assert stream.epoch == 1
    assert not torch.isin(seen, torch.tensor(held)).any()
    sl = load_eval_slice(store, SITE_A, held, Filters())
    assert len(sl) == 128 and set(sl.step.tolist()) == {0, 1, 2, 3}


def test_stream_is_deterministic_and_seekable(store):
    def make():
        return SiteStream(store, SITE_B, local_batch_size=100, seed=7, filters=Filters(timestep_range=(400, 800)), heldout=[])

    a = make()
    ref = [a.next() for _ in range(7)]  # 512 filtered rows -> 5 batches per epoch: crosses epochs
    assert a.position() == {"epoch": 1, "batch": 2}
    assert all(float(t.min()) >= 500 and float(t.max()) <= 750 for t in (b["timestep"] for b in ref))
    b = make()
    b.seek({"epoch": 1, "batch": 1})
    assert torch.equal(b.next()["acts"], ref[6]["acts"])
    b.seek({"epoch": 0, "batch": 2})
    assert torch.equal(b.next()["acts"], ref[2]["acts"])


# ---- training -----------------------------------------------------------------------------------


def test_grid_and_layer_sweep_learn_in_lockstep(store, tmp_path):
    specs = expand_specs(
        [
            {"arch": ["topk", "batchtopk"], "k": 2},
            {"arch": "relu"},
            {"arch": "topk", "k": 2, "site": SITE_B, "name": "layer2"},
            {"arch": "itda", "k": 2, "width": 200, "itda_tau": 0.2},
        ],
        defaults={"site": SITE_A, "width": 16},
    )
    cfg = small_cfg(steps=30, eval_every=15, checkpoint_every=15)
    out = tmp_path / "run"
    trained = train(store, specs, cfg, out)
    assert sorted(trained) == sorted(s.name for s in specs)
    run = json.loads((out / "run.json").read_text())
    assert run["heldout_sample_ids"] == [0, 1]
    for s in specs:
        folder = out / s.name
        d = difflens.load(folder)
        assert d.cfg.site == s.site and d.cfg.arch == s.arch
        meta = json.loads((folder / "cfg.json").read_text())
        assert meta["store_fingerprint"] == store.fingerprint()
        assert meta["training"]["steps"] == 30 and meta["extra"]["step"] == 30
        recs = records(folder)
        evals = [r for r in recs if r["kind"] in ("eval", "final")]
        assert [(r["kind"], r["step"]) for r in evals] == [("eval", 15), ("final", 30)]
        assert evals[-1]["eval_tokens"] == 128
        assert len(evals[-1]["by_timestep"]) == 4
        header = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
        assert header[:3] == ["kind", "step", "tokens"] and "fvu" in header
    name = {(s.arch, s.site): s.name for s in specs}
    assert name[("topk", SITE_A)] == "blocks.1-img-topk-w16-k2"  # the site varies, so it is in the name
    assert name[("topk", SITE_B)] == "layer2"
    # the dictionaries learn: held-out FVU well below the trivial 1.0 (predicting the mean)
    for key in (("topk", SITE_A), ("batchtopk", SITE_A), ("topk", SITE_B), ("itda", SITE_A)):
        final = [r for r in records(out / name[key]) if r["kind"] == "final"][0]
        assert final["fvu"] < 0.6, (key, final["fvu"])
    relu = [r for r in records(out / name[("relu", SITE_A)]) if r["kind"] == "train"]
    assert relu[-1]["loss"] < relu[0]["loss"] and "loss_l1" in relu[-1]
    topk_train = [r for r in records(out / name[("topk", SITE_A)]) if r["kind"] == "train"]
    assert [r["step"] for r in topk_train] == list(range(2, 31, 2))
    assert topk_train[-1]["l0"] <= 2.0 and topk_train[-1]["loss"] < topk_train[0]["loss"]
    itda = trained[name[("itda", SITE_A)]]
    assert itda.num_atoms > 0
    prov = itda.provenance
    assert set(prov) >= {"sample_id", "step", "token"} and not torch.isin(prov["sample_id"], torch.tensor([0, 1])).any()


@pytest.mark.filterwarnings("ignore:ITDA dictionary reached its cap")
def test_resume_after_kill_and_sigterm_gives_identical_weights(store, tmp_path):
    specs = expand_specs(
        [{"arch": ["topk", "tide"], "k": 2}, {"arch": "itda", "k": 2, "width": 100}], defaults={"site": SITE_A, "width": 16}
    )
    cfg = small_cfg(checkpoint_every=6)  # 1024 rows / 64 = 16 batches per epoch: the run crosses an epoch
    ref = tmp_path / "ref"
    train(store, specs, cfg, ref)

    class Crash(Exception):
        pass

    def sigterm_at_5(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    def crash_at_19(step):
        if step == 19:  # a hard kill: step 19 is lost, resume restarts at checkpoint 18 (in epoch 1)
            raise Crash

    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="step 5"):
        train(store, specs, cfg, out, on_step=sigterm_at_5)
    assert json.loads((out / "train_state" / "latest.json").read_text())["step"] == 5
    with pytest.raises(Crash):
        train(store, specs, cfg, out, resume=True, on_step=crash_at_19)
    state = out / "train_state"
    assert json.loads((state / "latest.json").read_text())["step"] == 18
    assert json.loads((state / "step-000000018" / "state.json").read_text())["positions"][SITE_A]["epoch"] == 1
    (state / ".step-000000019.123.tmp").mkdir()  # debris of a kill mid-checkpoint
    train(store, specs, cfg, out, resume=True)
    for s in specs:
        a, b = weights(ref / s.name), weights(out / s.name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (s.name, k)
        # the log of the resumed run is the log of the uninterrupted one: nothing lost or doubled
        assert records(out / s.name) == records(ref / s.name)
    assert not (state / ".step-000000019.123.tmp").exists()
    assert len([p for p in (out / "train_state").iterdir() if p.name.startswith("step-")]) == cfg.keep_checkpoints
    # resuming a finished run changes nothing
    train(store, specs, cfg, out, resume=True)
    assert torch.equal(weights(out / specs[0].name)["W_dec_FD"], weights(ref / specs[0].name)["W_dec_FD"])


# ---- errors -------------------------------------------------------------------------------------


def test_clear_errors(store, tmp_path):
    spec = DictSpec(name="a", arch="topk", site="nope:img", width=8, k=2)
    with pytest.raises(DifflensError, match=r"'nope:img'.*available sites: blocks.1:img, blocks.2:img"):
        train(store, [spec], small_cfg(), tmp_path / "x")
    with pytest.raises(DifflensError, match="no activation store"):
        train(tmp_path / "missing", [spec], small_cfg(), tmp_path / "x")
    with pytest.raises(DifflensError, match="unknown option.*bogus"):
        train(store, [DictSpec(name="a", arch="topk", site=SITE_A, width=8, k=2, options={"bogus": 1})], small_cfg(), tmp_path / "y")

    good = [DictSpec(name="a", arch="topk", site=SITE_A, width=8, k=2)]
    out = tmp_path / "run"
    train(store, good, small_cfg(steps=2, checkpoint_every=1), out)
    with pytest.raises(DifflensError, match="already holds a training run.*--resume"):
        train(store, good, small_cfg(steps=2), out)
    with pytest.raises(DifflensError, match=r"different configuration.*lr: 0.01 -> 0.001"):
        train(store, good, small_cfg(steps=2, lr=1e-3), out, resume=True)
    other = [DictSpec(name="a", arch="topk", site=SITE_A, width=8, k=4)]
    with pytest.raises(DifflensError, match="list of dictionaries"):
        train(store, other, small_cfg(steps=2), out, resume=True)
    # changing only how often we look is allowed
    train(store, good, small_cfg(steps=2, eval_every=1, log_every=1), out, resume=True)
    with pytest.raises(DifflensError, match="fewer rows .* than one batch"):
        train(store, good, small_cfg(steps=2, batch_size=4096, init_tokens=64), tmp_path / "big")


def test_width_lr_scaling_spares_tides_timestep_mlp(store, tmp_path):
    """lr ∝ 1/√(width/2^14) is for the dictionary matrices; TIDE's MLP (width-independent) keeps lr."""
    from difflens.train.trainer import Trainer

    cfg = small_cfg(steps=1, warmup_steps=0, scale_lr=True, eval_tokens=0, checkpoint_every=0)
    spec = DictSpec(name="tide", arch="tide", site=SITE_A, width=64, k=2)
    tr = Trainer(store, [spec], cfg, tmp_path / "run")
    members = tr.run()
    groups = members[0].opt.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-2 * (2**14 / 64) ** 0.5, 1e-2])
    film = {id(p) for p in members[0].module.film.parameters()}
    assert {id(p) for p in groups[1]["params"]} == film and not film & {id(p) for p in groups[0]["params"]}
    assert records(tmp_path / "run" / "tide")[0]["lr"] == pytest.approx(groups[0]["lr"])
