"""Small synthetic activation stores for the trainer and evaluation tests (+ a check of them).

Rows are sparse combinations of a few ground-truth directions plus a timestep-dependent offset,
so a small SAE can actually learn them and the numbers move in the expected direction.
"""

from __future__ import annotations

import numpy as np

from difflens.store import Store, StoreWriter

SITE_A, SITE_B = "blocks.1:img", "blocks.2:img"
TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)


def make_store(path, *, sites=(SITE_A, SITE_B), d=8, units=4, samples_per_unit=4, tokens=16, seed=0) -> Store:
    """units × samples × steps × tokens rows per site (default 4·4·4·16 = 1024)."""
    rng = np.random.default_rng(seed)
    atoms = {s: rng.normal(size=(3 * d, d)).astype(np.float32) for s in sites}
    offsets = {s: rng.normal(size=(len(TIMESTEPS), d)).astype(np.float32) for s in sites}
    w = StoreWriter.open(path, model="toy", sites={s: d for s in sites}, dtype="fp32", harvest_config={"synthetic": seed})
    for u in range(units):
        cols = {k: [] for k in ("sample_id", "prompt_id", "seed", "step", "timestep", "token", "h", "w", "stream")}
        for si in range(samples_per_unit):
            sid = u * samples_per_unit + si
            for step, t in enumerate(TIMESTEPS):
                for tok in range(tokens):
                    cols["sample_id"].append(sid)
                    cols["prompt_id"].append(sid)
                    cols["seed"].append(sid)
                    cols["step"].append(step)
                    cols["timestep"].append(t)
                    cols["token"].append(tok)
                    cols["h"].append(tok // 4)
                    cols["w"].append(tok % 4)
                    cols["stream"].append(0)
        n = len(cols["sample_id"])
        meta = {
            "sample_id": np.asarray(cols["sample_id"], np.int64),
            "prompt_id": np.asarray(cols["prompt_id"], np.int64),
            "seed": np.asarray(cols["seed"], np.int64),
            "step": np.asarray(cols["step"], np.int32),
            "timestep": np.asarray(cols["timestep"], np.float32),
            "token": np.asarray(cols["token"], np.int32),
            "h": np.asarray(cols["h"], np.int16),
            "w": np.asarray(cols["w"], np.int16),
            "stream": np.asarray(cols["stream"], np.int8),
        }
        rows = {}
        for s in sites:
            codes = rng.exponential(size=(n, 3 * d)).astype(np.float32) * (rng.random((n, 3 * d)) < 0.1)
            acts = codes @ atoms[s] + offsets[s][meta["step"]] + 0.01 * rng.normal(size=(n, d)).astype(np.float32)
            rows[s] = (acts.astype(np.float32), meta)
        w.write_unit(f"u{u:03d}", rows)
    w.finalize()
    return Store(path)


def test_fixture_store(tmp_path):
    store = make_store(tmp_path / "s")
    assert store.sites == [SITE_A, SITE_B]
    assert store.num_rows(SITE_A) == 1024 and store.d(SITE_A) == 8
    meta = store.meta(SITE_A, ["sample_id", "step"])
    assert len(np.unique(meta["sample_id"])) == 16
    batch = next(iter(store.batches(SITE_A, 32, columns=("acts", "timestep", "sample_id", "step", "token"))))
    assert batch["acts"].shape == (32, 8) and set(batch) == {"acts", "timestep", "sample_id", "step", "token"}
