"""Training-throughput benchmark for TopK SAEs (and BatchTopK, JumpReLU, Matryoshka), and ITDA build time vs SAE training time.

    python bench/train.py            # d=768, width=12288, k=32, batch 4096 (the reference config)
    python bench/train.py --quick    # d=256, width=4096, k=16, batch 1024
    python bench/train.py --threads 1 --repeats 5 --no-itda

One step = forward + backward + before_optimizer_step + Adam (fused) + after_optimizer_step.
The floor is the one GEMM a step cannot avoid, x @ W_encᵀ ([B, d] @ [d, width]) into a
preallocated output, timed alone in the same precision; "% of floor" = floor time / step time. Every number in a table comes from
the same run, interleaved round-robin (each repeat times every variant once) and reported as
the minimum over repeats, so a background job slows all variants alike; absolute numbers on a
shared machine are pessimistic, the ratios are the result.

``--clock cpu`` (implies ``--threads 1``) times with the thread's CPU time instead of the wall
clock: on a machine where another job takes most of the CPU, wall times mostly measure waiting,
while single-thread CPU time still measures the work (cache contention aside).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from difflens.dictionaries import DictConfig, build
from difflens.dictionaries.itda import ITDA


@dataclass
class Shape:
    d: int
    width: int
    k: int
    batch: int


FULL = Shape(768, 12288, 32, 4096)
QUICK = Shape(256, 4096, 16, 1024)


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class Variant:
    """A dictionary + fused Adam + data; `step()` runs one full training step."""

    def __init__(
        self, name, shape: Shape, *, fast: bool, auxk: bool, dead_frac: float, bf16: bool, adam: str = "fused", arch: str = "topk"
    ):
        self.name, self.bf16, self.auxk = name, bf16, auxk
        cfg = DictConfig(
            arch=arch, d_in=shape.d, width=shape.width, k=shape.k, normalization="scalar",
            auxk=auxk, dead_after_tokens=1_000_000_000,
        )
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(shape.batch, shape.d, generator=gen) * 2.0 + 0.5
        self.sae = build(cfg, fast=fast)
        self.sae.init_from_data(self.x)
        self.sae.train()
        n_dead = int(dead_frac * shape.width)
        self.dead_ids = torch.randperm(shape.width, generator=gen)[:n_dead]
        kw = {"fused": True} if adam == "fused" else {"foreach": adam == "foreach"}
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=1e-4, betas=(0.0, 0.99), **kw)
        self.aux_loss_seen = False

    def step(self):
        sae = self.sae
        if self.dead_ids.numel():  # pin the dead set (training would otherwise revive them)
            sae.tokens_since_fired_F.index_fill_(0, self.dead_ids, 2_000_000_000)
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.bf16):
            out = sae(self.x)
        out.loss.backward()
        self.aux_loss_seen |= "auxk" in out.losses
        sae.before_optimizer_step()
        self.opt.step()
        sae.after_optimizer_step()


def floor_fn(shape: Shape, bf16: bool):
    gen = torch.Generator().manual_seed(1)
    dt = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(shape.batch, shape.d, generator=gen).to(dt)
    W = torch.randn(shape.width, shape.d, generator=gen).to(dt)
    out = torch.empty(shape.batch, shape.width, dtype=dt)  # preallocated, like the SAE's workspace
    return lambda: torch.mm(x, W.T, out=out)


CLOCK = time.perf_counter


def timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def bench_sae(shape: Shape, repeats: int, skip_dense: bool) -> list[tuple[str, float, str]]:
    variants = []
    if not skip_dense:
        variants.append(Variant("(a) dense reference, fp32", shape, fast=False, auxk=False, dead_frac=0, bf16=False))
    variants += [
        Variant("(b) fast, AuxK off, fp32", shape, fast=True, auxk=False, dead_frac=0, bf16=False),
        Variant("(c) fast, AuxK on, 25% dead, fp32", shape, fast=True, auxk=True, dead_frac=0.25, bf16=False),
    ]
    if not skip_dense:
        variants.append(Variant("(d) dense reference, bf16 autocast", shape, fast=False, auxk=False, dead_frac=0, bf16=True))
    variants += [
        Variant("(d) fast, AuxK off, bf16 autocast", shape, fast=True, auxk=False, dead_frac=0, bf16=True),
        Variant("(d) fast, AuxK on, 25% dead, bf16 autocast", shape, fast=True, auxk=True, dead_frac=0.25, bf16=True),
    ]
    variants += [  # the other architectures, AuxK off, fp32: compare with (b)
        Variant("(e) BatchTopK, fast, fp32", shape, fast=True, auxk=False, dead_frac=0, bf16=False, arch="batchtopk"),
        Variant("(e) JumpReLU (dense codes), fp32", shape, fast=True, auxk=False, dead_frac=0, bf16=False, arch="jumprelu"),
        Variant("(e) Matryoshka BatchTopK (dense, 4 prefixes), fp32", shape, fast=True, auxk=False, dead_frac=0, bf16=False,
                arch="matryoshka"),
    ]
    floors = {False: floor_fn(shape, False), True: floor_fn(shape, True)}
    best = {v.name: math.inf for v in variants}
    best_floor = {False: math.inf, True: math.inf}
    for v in variants:  # warm-up (allocator, Adam state, oneDNN primitives)
        v.step()
    for f in floors.values():
        f()
    for r in range(repeats):
        for bf16, f in floors.items():
            best_floor[bf16] = min(best_floor[bf16], timed(f))
        for v in variants:
            best[v.name] = min(best[v.name], timed(v.step))
        print(f"  repeat {r + 1}/{repeats} done", file=sys.stderr)
    for v in variants:
        if v.auxk and not v.aux_loss_seen:
            raise RuntimeError(f"{v.name}: AuxK loss was never computed; the benchmark is wrong")
    rows = [("GEMM floor x @ W_encᵀ, fp32", best_floor[False], "fp32"), ("GEMM floor x @ W_encᵀ, bf16", best_floor[True], "bf16")]
    rows += [(v.name, best[v.name], "bf16" if v.bf16 else "fp32") for v in variants]
    return rows, best_floor


def print_sae_table(shape: Shape, rows, floors) -> None:
    print(f"\n### SAE training step: d={shape.d}, width={shape.width}, k={shape.k}, batch={shape.batch}\n")
    print("| variant | activations/s | ms/step | % of floor (same precision) | % of fp32 floor |")
    print("|---|---:|---:|---:|---:|")
    for name, sec, prec in rows:
        fl = floors[prec == "bf16"]
        print(
            f"| {name} | {shape.batch / sec:,.0f} | {sec * 1e3:.1f} | {100 * fl / sec:.0f}% | {100 * floors[False] / sec:.0f}% |"
        )


def bench_adam(shape: Shape, repeats: int) -> None:
    """Adam's share of a step: fused vs foreach vs the per-parameter loop, on the SAE's tensors."""
    print(f"\n### Adam step on the SAE's parameters ({2 * shape.width * shape.d / 1e6:.1f}M in the two matrices)\n")
    print("| implementation | ms/step |")
    print("|---|---:|")
    params = [torch.nn.Parameter(torch.randn(shape.width, shape.d)) for _ in range(2)]
    params += [torch.nn.Parameter(torch.randn(shape.width)), torch.nn.Parameter(torch.randn(shape.d))]
    for p in params:
        p.grad = torch.randn_like(p)
    for kind, kw in (("fused=True", {"fused": True}), ("foreach=True", {"foreach": True}), ("for-loop", {"foreach": False})):
        opt = torch.optim.Adam(params, lr=1e-4, betas=(0.0, 0.99), **kw)
        opt.step()
        t = min(timed(opt.step) for _ in range(repeats))
        print(f"| {kind} | {t * 1e3:.1f} |")


# ---- ITDA vs SAE: time to a target FVU -----------------------------------------------------------------
def synthetic(n: int, d: int, n_feat: int, k: int, seed: int) -> torch.Tensor:
    """Sparse non-negative combinations of k of n_feat planted unit directions, plus a little noise."""
    gen = torch.Generator().manual_seed(0)  # the same planted dictionary for every split
    D = torch.randn(n_feat, d, generator=gen)
    D /= D.norm(dim=1, keepdim=True)
    gen.manual_seed(seed + 1)
    idx = torch.randint(0, n_feat, (n, k), generator=gen)
    vals = torch.rand(n, k, generator=gen) * 2 + 0.5
    x = torch.nn.functional.embedding_bag(idx, D, mode="sum", per_sample_weights=vals)
    return x + 0.02 * torch.randn(n, d, generator=gen)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def bench_itda(targets: list[float], d: int = 64, n_feat: int = 512, k: int = 8, batch: int = 512, max_seconds: float = 60) -> None:
    """Time (clock as chosen; evaluation excluded) until the held-out FVU first drops below each target."""
    train = synthetic(100_000, d, n_feat, k, seed=1)
    held = synthetic(4096, d, n_feat, k, seed=2)
    targets = sorted(targets, reverse=True)
    print(
        f"\n### ITDA build vs TopK SAE training: time to held-out FVU targets "
        f"(synthetic: d={d}, {n_feat} planted features, {k} active, batch {batch}, budget {max_seconds:.0f} s each; "
        f"L0 = {k} for both)\n"
    )
    print("| method | " + " | ".join(f"s to FVU ≤ {t}" for t in targets) + " | tokens seen | final FVU | size |")
    print("|---|" + "---:|" * (len(targets) + 3))

    def run(name, step, evaluate, size, data_passes: int | None):
        hits: dict[float, float] = {}
        seen, spent, f, t0 = 0, 0.0, 1.0, CLOCK()
        while spent < max_seconds and len(hits) < len(targets):
            if data_passes is not None and seen >= data_passes * train.shape[0]:
                break
            lo = seen % train.shape[0]
            step(train[lo : lo + batch], lo)
            seen += batch
            spent = CLOCK() - t0
            if seen % (batch * 8) == 0:  # evaluation is not timed
                f = evaluate()
                hits.update({t: spent for t in targets if f <= t and t not in hits})
                t0 = CLOCK() - spent
        f = evaluate()
        cells = " | ".join(_fmt(hits.get(t)) for t in targets)
        print(f"| {name} | {cells} | {seen:,} | {f:.3f} | {size()} |")

    for tau in (0.1, 0.3):
        itda = build(DictConfig(arch="itda", d_in=d, width=20_000, k=k, normalization="none", itda_tau=tau))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the cap warning; the table shows the size
            run(
                f"ITDA τ={tau} (gradient pursuit)",
                lambda xb, lo, m=itda: m.partial_fit(xb, None, {"row": torch.arange(lo, lo + xb.shape[0])}),
                lambda m=itda: fvu(held, m(held).x_hat),
                lambda m=itda: f"{m.num_latents:,} atoms",
                data_passes=1,
            )
    width = 4 * n_feat
    sae = build(DictConfig(arch="topk", d_in=d, width=width, k=k, normalization="scalar", dead_after_tokens=50_000))
    sae.init_from_data(train[:4096])
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3, betas=(0.0, 0.99), fused=True)

    def sae_step(xb, lo):
        sae.train()
        opt.zero_grad(set_to_none=True)
        sae(xb).loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()

    def sae_eval():
        sae.eval()
        with torch.no_grad():
            return fvu(held, sae(held).x_hat)

    run("TopK SAE (fast path, Adam lr 2e-3, AuxK)", sae_step, sae_eval, lambda: f"{width:,} latents", data_passes=None)


def _fmt(sec):
    return "not reached" if sec is None else f"{sec:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small config (d=256, width=4096, k=16, batch 1024)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (min is reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall clock, or this thread's CPU time")
    ap.add_argument("--itda-seconds", type=float, default=60.0, help="time budget per method in the ITDA comparison")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference variants (slow)")
    ap.add_argument("--no-itda", action="store_true", help="skip the ITDA vs SAE comparison")
    ap.add_argument("--no-sae", action="store_true", help="skip the SAE step benchmark and the Adam table")
    ap.add_argument("--itda-targets", type=float, nargs="+", default=[0.5, 0.3, 0.2], help="held-out FVU targets")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.thread_time
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, load average {load:.1f} at start, "
        f"clock: {'CPU time of the (single) compute thread' if args.clock == 'cpu' else 'wall'}"
    )
    if not args.no_sae:
        rows, floors = bench_sae(shape, args.repeats, args.no_dense)
        print_sae_table(shape, rows, floors)
        gc.collect()
        bench_adam(shape, args.repeats)
    if not args.no_itda:
        bench_itda(args.itda_targets, max_seconds=args.itda_seconds)


if __name__ == "__main__":
    main()
