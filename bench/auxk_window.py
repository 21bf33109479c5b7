"""What AuxK does to latents a short dead window calls dead (docs/training.md, the AuxK paragraph).

    python bench/auxk_window.py --data runs/demo/store --out /tmp/auxk \\
        off:off:8192 on8k:on:8192 on64k:on:65536 on8k_kaux16:on:8192:16
    python bench/auxk_window.py --data runs/demo/store --out /tmp/auxk_dec --aux-decoder-only off:off:8192 on8k:on:8192

Each positional argument is one TopK SAE, ``name:on|off:window[:k_aux]`` (AuxK on or off, the dead
window in tokens, optionally k_aux); all train in lockstep on the same batches with the library's
trainer (`difflens.train.trainer.Trainer`). Per dictionary it prints the held-out FVU, the share of
latents silent on the held-out rows (no non-zero code, the trainer's ``eval_dead_fraction``), the
tracker's dead share, the share of latents ever counted dead and of those that fired again, and,
while AuxK runs, per-step traces (every 100 steps): dead count, ‖ê‖/‖e‖, mean cos(ê, e), and the
share of dead latents with an AuxK pick whose b_enc gradient is positive (Adam then LOWERS their
pre-activation). Everything also goes to OUT/auxk_window.json.

``--aux-decoder-only`` is a diagnostic, not a training option: it zeroes the AuxK gradient of the
dead latents' pre-activations (so AuxK moves only their decoder rows; this also removes AuxK's
share of the shared ``b_dec`` gradient, which flows through those pre-activations), to test
whether the encoder-side gradient is what silences them. ``--aux-no-bdec`` removes only AuxK's
share of the ``b_dec`` gradient (the dead rows keep their encoder gradient), separating the two.
Both hook library internals (`kernels.sddmm`, `kernels.SparseSAEFunction.backward`, and `sae`
methods for the traces) and apply to every AuxK dictionary of the run.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("DIFFLENS_QUIET", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--site", default="transformer_blocks.1:img")
    ap.add_argument("--out", required=True, help="new folder for the run and auxk_window.json")
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--aux-decoder-only", action="store_true")
    ap.add_argument("--aux-no-bdec", action="store_true")
    ap.add_argument("variants", nargs="+", help="name:on|off:window[:k_aux]")
    args = ap.parse_args()

    import torch

    from difflens.dictionaries import kernels
    from difflens.dictionaries import sae as S
    from difflens.train import DictSpec, TrainConfig
    from difflens.train.trainer import Trainer

    names, specs = {}, []
    for v in args.variants:
        parts = v.split(":")
        if len(parts) not in (3, 4) or parts[1] not in ("on", "off"):
            raise SystemExit(f"variant {v!r}: write name:on|off:window[:k_aux]")
        opts = {"auxk": parts[1] == "on", "dead_after_tokens": int(parts[2])}
        if len(parts) == 4:
            opts["k_aux"] = int(parts[3])
        names[(opts["auxk"], opts["dead_after_tokens"], opts.get("k_aux"))] = parts[0]
        specs.append(DictSpec(name=parts[0], arch="topk", site=args.site, width=args.width, k=args.k, options=opts))

    def name_of(m):
        return None if m is None else names.get((bool(m.cfg.auxk), int(m.cfg.dead_after_tokens), m.cfg.k_aux))

    traces = defaultdict(lambda: defaultdict(list))
    first_dead, ever_fired, fired_after_dead = {}, {}, {}
    current = {}
    orig_select, orig_loss = S._SparseSAE._aux_select, S.auxk_loss
    orig_before, orig_track, orig_sddmm = S.SAE.before_optimizer_step, S.SAE._track, kernels.sddmm

    def aux_select(self, pre):
        current["m"] = self
        return orig_select(self, pre)

    def auxk_loss(e_hat, e, ratio, coef):
        n = name_of(current.get("m"))
        if n:
            with torch.no_grad():
                traces[n]["ehat_over_e"].append(float(e_hat.norm() / e.norm()))
                traces[n]["cos"].append(float(torch.nn.functional.cosine_similarity(e_hat, e, dim=1).mean()))
        return orig_loss(e_hat, e, ratio, coef)

    def before(self):
        n = name_of(self)
        if n:
            dead = self.dead_mask()
            traces[n]["n_dead"].append(int(dead.sum()))
            g = self.b_enc_F.grad
            if g is not None and dead.any():
                gd = g[dead]
                gd = gd[gd != 0]
                traces[n]["pushed_down"].append(float((gd > 0).float().mean()) if gd.numel() else float("nan"))
        return orig_before(self)

    def track(self, fired, n_rows):
        orig_track(self, fired, n_rows)
        n = name_of(self)
        if n and self.training:
            fd = first_dead.setdefault(n, torch.zeros_like(fired))
            ef = ever_fired.setdefault(n, torch.zeros_like(fired))
            fa = fired_after_dead.setdefault(n, torch.zeros_like(fired))
            fa |= fired & fd
            fd |= self.dead_mask()
            ef |= fired

    def sddmm(G, W, pat):  # the AuxK call gets the dead rows only: W has fewer rows than the width
        out = orig_sddmm(G, W, pat)
        return out * 0 if W.shape[0] != args.width else out

    S._SparseSAE._aux_select, S.auxk_loss, S.SAE.before_optimizer_step, S.SAE._track = aux_select, auxk_loss, before, track
    if args.aux_decoder_only:
        kernels.sddmm = sddmm
    if args.aux_no_bdec:
        orig_backward = kernels.SparseSAEFunction.backward

        def backward(ctx, g, g_aux=None):  # b_dec's gradient from the main term alone
            full = orig_backward(ctx, g, g_aux)
            if g_aux is None:
                return full
            return (full[0], orig_backward(ctx, g, None)[1], *full[2:])

        kernels.SparseSAEFunction.backward = staticmethod(backward)

    out = Path(args.out)
    cfg = TrainConfig(steps=args.train_steps, batch_size=1024, eval_every=0, checkpoint_every=0, progress=False)
    members = Trainer(args.data, specs, cfg, out / "run").run()

    res = {"args": vars(args), "dictionaries": {}}
    rows = ["| dictionary | held-out FVU | silent on held-out | tracker dead | ever dead | fired again after dead |",
            "|---|---:|---:|---:|---:|---:|"]
    for m in members:
        final = next(r for r in reversed(m.log.records()) if r.get("kind") == "final")
        n = m.name
        r = {"heldout_fvu": final["fvu"], "heldout_silent": final["eval_dead_fraction"], "tracker_dead": final.get("dead_fraction"),
             "ever_dead": float(first_dead[n].float().mean()), "fired_again_after_dead": float(fired_after_dead[n].float().mean()),
             "traces_every_100": {k: v[::100] for k, v in traces[n].items()}}
        res["dictionaries"][n] = r
        rows.append(f"| {n} | {r['heldout_fvu']:.4f} | {r['heldout_silent']:.1%} | {r['tracker_dead']:.1%} | "
                    f"{r['ever_dead']:.1%} | {r['fired_again_after_dead']:.1%} |")
    (out / "auxk_window.json").write_text(json.dumps(res, indent=1))
    print("\n".join(rows))
    for n, r in res["dictionaries"].items():
        for k, v in r["traces_every_100"].items():
            print(f"{n} {k} (every 100 steps): " + ", ".join(f"{x:.3g}" for x in v))


if __name__ == "__main__":
    main()
