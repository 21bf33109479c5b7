"""DDP: `torchrun --nproc-per-node 2 -m difflens train` (gloo, CPU) equals one process.

Each step's global batch is the whole (tiny) store, so both runs see the same rows per step and
must agree up to float summation order: this checks gradient all-reduce and loss weighting,
gathered data-dependent init, dead-latent counters (AuxK is active: dead_after_tokens is tiny)
and ITDA fitting on the gathered batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file
from test_train_fixtures import make_store

from difflens.cli import main

CONFIG = {
    "train": {
        "steps": 3, "batch_size": 256, "lr": 1e-3, "warmup_steps": 0, "eval_tokens": 0,
        "dead_after_tokens": 300, "scale_lr": False, "log_every": 1, "progress": False,
    },
    "defaults": {"site": "blocks.1:img", "width": 16, "k": 2},
    # wide TopK with k=1: most latents never fire, so they turn dead after 2 steps and AuxK trains them
    "dictionaries": [
        {"arch": "topk", "width": 256, "k": 1}, {"arch": "tide"}, {"arch": "itda", "width": 0, "itda_tau": 0.3},
        {"arch": "batchtopk", "width": 64, "k": 2},  # selects over the global batch (all-gathered candidates)
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_provenance(w: dict) -> torch.Tensor:
    """ITDA atoms ordered by where they came from (rank order may interleave equal-loss rows)."""
    key = w["prov_sample_id"] * 10**6 + w["prov_step"] * 10**3 + w["prov_token"]
    return w["atoms_AD"][key.argsort()]


def test_two_processes_match_one(tmp_path):
    store = make_store(tmp_path / "store", units=2, samples_per_unit=2)  # 256 rows
    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps(CONFIG))
    args = ["train", "--data", str(store.root), "--config", str(cfg), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFLENS_QUIET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in sys.path if p])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "difflens", *args, "--out", str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["world_size"] == 2
    for name in ("topk-w256-k1", "tide-w16-k2", "batchtopk-w64-k2"):
        one, two = load_file(str(tmp_path / "one" / name / "weights.safetensors")), load_file(
            str(tmp_path / "two" / name / "weights.safetensors")
        )
        assert one.keys() == two.keys()
        for k in one:
            assert torch.allclose(one[k].double(), two[k].double(), rtol=1e-4, atol=1e-5), (name, k)
        # the logged global-batch loss agrees too
        logs = [
            [json.loads(x)["loss"] for x in (tmp_path / r / name / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
            for r in ("one", "two")
        ]
        assert len(logs[0]) == 3 and torch.allclose(torch.tensor(logs[0]), torch.tensor(logs[1]), rtol=1e-4)
    topk = load_file(str(tmp_path / "two" / "topk-w256-k1" / "weights.safetensors"))
    assert bool((topk["tokens_since_fired_F"] >= 512).any())  # counted in global tokens on both ranks
    last = json.loads((tmp_path / "two" / "topk-w256-k1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["kind"] == "train" and last["loss_auxk"] > 0  # dead latents were trained by AuxK
    one, two = (load_file(str(tmp_path / r / "itda-k2" / "weights.safetensors")) for r in ("one", "two"))
    assert one["atoms_AD"].shape == two["atoms_AD"].shape and one["atoms_AD"].shape[0] > 0
    assert torch.allclose(_by_provenance(one), _by_provenance(two), atol=1e-5)


def test_ranks_share_one_out_folder_check(tmp_path):
    """Rank 0 alone claims --out and tells the others: a folder with someone else's file is refused
    on every rank with the same message (no hang, nothing written), and a fresh folder is claimed
    once (rank 1 never sees rank 0's half-written marker as a foreign file)."""
    store = make_store(tmp_path / "store", units=2, samples_per_unit=2)
    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps({**CONFIG, "train": {**CONFIG["train"], "steps": 1},
                               "dictionaries": [{"arch": "topk", "width": 16, "k": 2}]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFLENS_QUIET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in sys.path if p])

    def run(out):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "difflens", "train", "--data", str(store.root),
               "--config", str(cfg), "--quiet", "--out", str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    proc = run(busy)
    assert proc.returncode != 0
    assert proc.stderr.count("already holds files that `difflens train` did not write (notes.txt)") == 2
    assert sorted(os.listdir(busy)) == ["notes.txt"]
    proc = run(tmp_path / "fresh")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "fresh" / ".difflens-out.json").is_file()


def _batchtopk_rank(rank: int, init: str, out: str, x: torch.Tensor) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from difflens.dictionaries import DictConfig, build
    from difflens.train.distributed import BatchComm, DistEnv

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        sae = build(DictConfig(arch="batchtopk", d_in=x.shape[1], width=32, k=3, normalization="none"))
        sae.set_batch_comm(BatchComm(DistEnv(rank, 2)))
        sae.train()
        half = x.shape[0] // 2
        out_ = sae(x[rank * half : (rank + 1) * half])
        save_file({"codes": out_.codes.detach().contiguous(), "threshold": sae.threshold.reshape(1)}, f"{out}/rank{rank}.st")
    finally:
        dist.destroy_process_group()


def test_batchtopk_under_ddp_selects_the_global_top_k_times_b(tmp_path):
    """Two gloo ranks with different halves of a batch select exactly what one process selects on
    the whole batch (the second half is 3x larger, so per-rank top-k·B_local would differ)."""
    import torch.multiprocessing as mp

    from difflens.dictionaries import DictConfig, build

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    x[32:] *= 3.0
    mp.spawn(_batchtopk_rank, args=(f"file://{tmp_path}/pg", str(tmp_path), x), nprocs=2, join=True)
    codes = torch.cat([load_file(str(tmp_path / f"rank{r}.st"))["codes"] for r in (0, 1)])
    thr = [load_file(str(tmp_path / f"rank{r}.st"))["threshold"] for r in (0, 1)]

    one = build(DictConfig(arch="batchtopk", d_in=8, width=32, k=3, normalization="none"))
    one.train()
    ref = one(x).codes.detach()
    assert int((ref != 0).sum()) == 3 * 64
    assert torch.equal(codes != 0, ref != 0)
    torch.testing.assert_close(codes, ref)
    assert torch.equal(thr[0], thr[1]) and float(thr[0]) == float(one.threshold)
    # an independent count: the global cut is the 192nd largest pre-activation of the whole batch
    pre = x @ one.W_enc_FD.detach().T
    assert float(one.threshold) == float(pre.reshape(-1).topk(192).values.min())
    per_rank = [(pre[h * 32 : (h + 1) * 32] >= pre[h * 32 : (h + 1) * 32].reshape(-1).topk(96).values.min()).sum()
                for h in (0, 1)]
    assert per_rank != [int((ref[:32] != 0).sum()), int((ref[32:] != 0).sum())]  # the old per-rank rule differs
