"""ITDA: inference-time decomposition of activations — a dictionary made of real activations.

Building (`partial_fit`, one batch at a time; Shabalin et al. 2025 / Leask et al. 2025):
  1. normalise the batch (the dictionary's `Normalizer`, fitted on the first batch);
  2. decompose every row with the current atoms at L0 ≤ k (gradient pursuit; a row leaves the
     pursuit as soon as it is reconstructed within τ, and the atom scores are computed in bf16);
  3. normalised loss  ℓ(x) = ‖x − x̂‖² / mean_batch0 ‖x − mean(x)‖²  (the denominator is measured
     once, on the first batch or the trainer's init sample, so τ means the same for every batch);
  4. rows with ℓ > τ are admitted in rounds: of the first 32 candidates (in batch order), those
     that no earlier one of them reconstructs on its own become atoms x/‖x‖ with their provenance
     (sample id, step, token…); the other candidates are decomposed again against the grown
     dictionary and stay candidates only if still above τ. This mimics feeding rows one at a
     time, so the dictionary's size does not depend on the batch size (before, an empty
     dictionary took a whole first batch: 32 atoms at batch size 32, ~1,024 at 1,024).
     Optionally (``itda_prune_cosine``) a candidate whose cosine to an existing or already
     accepted atom exceeds the threshold is skipped;
  5. the dictionary is capped (cfg.width, default 50,000 atoms): at the cap nothing more is
     added (a warning says so once).
Inference: gradient pursuit (``itda_inference="gp"``) or matching pursuit ("mp") at L0 = k.
Codes are dense [B, n_atoms] with at most k non-zeros; ``num_latents`` is the current atom count.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from difflens.dictionaries.base import Dictionary, DictOutput, as_timesteps, register
from difflens.dictionaries.config import DictConfig, ITDAConfig
from difflens.dictionaries.pursuit import gradient_pursuit, matching_pursuit
from difflens.errors import DifflensError
from difflens.utils import progress

PROV_PREFIX = "prov_"


def greedy_dedupe(v_ND: Tensor, thr: float, existing_AD: Tensor | None = None, chunk: int = 1024) -> Tensor:
    """Keep-mask over unit rows: drop a row if its cosine to an existing row or to an earlier kept
    row exceeds thr (first come, first kept)."""
    n = v_ND.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=v_ND.device)
    if existing_AD is not None and existing_AD.shape[0]:
        for s in range(0, n, chunk):
            keep[s : s + chunk] &= (v_ND[s : s + chunk] @ existing_AD.T).amax(1) <= thr
    for s in range(0, n, chunk):
        blk = v_ND[s : s + chunk]
        if s:  # against kept rows of earlier chunks
            prev = v_ND[:s][keep[:s]]
            if prev.shape[0]:
                keep[s : s + chunk] &= (blk @ prev.T).amax(1) <= thr
        sim = blk @ blk.T
        kb = keep[s : s + chunk].clone()
        for i in range(blk.shape[0]):
            if kb[i]:
                kb[i + 1 :] &= sim[i, i + 1 :] <= thr
        keep[s : s + chunk] = kb
    return keep


@register("itda", ITDAConfig)
class ITDA(Dictionary):
    """Atoms are unit-norm copies of (normalised) real activations; no gradient training."""

    family = "itda"

    trainable = False
    admit_per_round = 32  # rows admitted per round of `partial_fit` (see `_choose`)
    admit_order = "batch"  # "batch": candidates in batch order (as if fed one by one); "loss": worst first
    build_scores_dtype = torch.bfloat16  # precision of the build's atom scores (argmax only)

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.register_buffer("atoms_AD", torch.zeros(0, cfg.d_in))
        self.register_buffer("var_ref", torch.zeros(()))  # τ's denominator, from the first batch
        self._warned_full = False
        self._scores_atoms: Tensor | None = None  # low-precision copy of the atoms for the build's argmax

    # ---- sizes ----------------------------------------------------------------------------------------
    @property
    def num_latents(self) -> int:
        return int(self.atoms_AD.shape[0])

    num_atoms = num_latents

    @property
    def cap(self) -> int:
        return self.cfg.itda_cap

    @property
    def provenance(self) -> dict[str, Tensor]:
        """Where each atom came from: {key: int64 [n_atoms]} (−1 = not recorded for that atom)."""
        return {n[len(PROV_PREFIX) :]: b for n, b in self._buffers.items() if n.startswith(PROV_PREFIX)}

    # ---- fitting --------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor, t_B=None) -> None:
        super().init_from_data(x_BD, t_B)
        x, t = self._inputs(x_BD, t_B)
        xn = self.norm.apply(x, t)
        self.var_ref.fill_(float((xn - xn.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)))

    @torch.no_grad()
    def normalized_loss(self, x_BD: Tensor, t_B=None) -> Tensor:
        """ℓ(x) per row (see module docstring); the quantity compared with τ."""
        x, t = self._inputs(x_BD, t_B)
        xn = self.norm.apply(x, t)
        return self._loss_n(xn)

    def _loss_n(self, xn: Tensor) -> Tensor:
        if self.num_atoms == 0:
            err = xn.pow(2).sum(1)
        else:
            vals, idx = self._pursuit(xn)
            err = (xn - self._decode_n(vals, idx)).pow(2).sum(1)
        return err / self.var_ref

    @torch.no_grad()
    def partial_fit(self, x_BD: Tensor, t_B=None, provenance: Mapping[str, Tensor] | None = None) -> dict:
        """Add the batch's badly reconstructed rows as atoms, in rounds (see `_admit`); returns counts."""
        x, t = self._inputs(x_BD, t_B)
        prov = self._check_provenance(provenance, x.shape[0])
        if float(self.var_ref) == 0.0:
            self.init_from_data(x, t)
        xn = self.norm.apply(x, t)
        norms = xn.norm(dim=1)
        rows = (norms > 1e-8).nonzero().squeeze(1)
        loss = self._screen(xn[rows])
        above = loss > self.cfg.itda_tau
        stats = {"candidates": int(above.sum()), "added": 0, "rounds": 0, "atoms": self.num_atoms}
        pending, p_loss = rows[above], loss[above]
        while pending.numel() and self.num_atoms < self.cap:
            if self.admit_order == "loss":
                pending = pending[p_loss.argsort(descending=True)]  # worst reconstructed first
            chosen, skipped = self._choose(xn[pending] / norms[pending, None], norms[pending])
            new_rows = pending[chosen]
            new = xn[new_rows] / norms[new_rows, None]
            if self.cfg.itda_prune_cosine is not None:
                keep = greedy_dedupe(new, self.cfg.itda_prune_cosine, self.atoms_AD)
                new_rows, new = new_rows[keep], new[keep]
            room = self.cap - self.num_atoms
            if new.shape[0] > room:
                self._warn_full()
                new_rows, new = new_rows[:room], new[:room]
            self._append(new, {k: v[new_rows] for k, v in prov.items()})
            stats["added"] += int(new.shape[0])
            stats["rounds"] += 1
            rest = pending[skipped]  # not chosen in this round: judge again against the new atoms
            loss = self._screen(xn[rest])
            pending, p_loss = rest[loss > self.cfg.itda_tau], loss[loss > self.cfg.itda_tau]
        if pending.numel() and self.num_atoms >= self.cap:
            self._warn_full()
        stats["atoms"] = self.num_atoms
        return stats

    def _screen(self, xn: Tensor) -> Tensor:
        """ℓ per row, with early exit: a row leaves the pursuit as soon as ℓ ≤ τ (all construction needs)."""
        if self.num_atoms == 0 or xn.shape[0] == 0:
            return xn.pow(2).sum(1) / self.var_ref
        if self._scores_atoms is None:
            self._scores_atoms = self.atoms_AD.to(self.build_scores_dtype)
        stop = float(self.cfg.itda_tau * self.var_ref)
        if self.cfg.itda_inference == "mp":
            vals, idx = matching_pursuit(xn, self.atoms_AD, int(self.cfg.k))
            err = (xn - self._decode_n(vals, idx)).pow(2).sum(1)
        else:
            *_, err = gradient_pursuit(xn, self.atoms_AD, int(self.cfg.k), scores_atoms=self._scores_atoms, stop_sq=stop,
                                       return_error=True)
        return err / self.var_ref

    def _choose(self, v_PD: Tensor, norm_P: Tensor) -> tuple[Tensor, Tensor]:
        """This round's atoms among pending rows (in `admit_order`): at most `admit_per_round`, taken
        in order, skipping a row that one already chosen atom reconstructs within τ on its own
        (non-negative coefficient: ℓ = ‖x‖²(1 − cos²)/var ≤ τ). Returns (chosen, skipped) index
        tensors into the pending rows; skipped ones are judged again against the grown dictionary.

        Admitting rows one at a time (batch size 1) would be the batch-size-free rule but costs a
        pursuit per atom; a round of m worst rows that cannot explain each other by one atom comes
        close to it (what remains is a row explained by a chosen atom *together* with older ones),
        and m does not depend on the batch size, so neither does the dictionary."""
        m = min(v_PD.shape[0], self.admit_per_round)
        cos = (v_PD[:m] @ v_PD[:m].T).clamp_min(0)
        # row i is explained by chosen atom s if cos² ≥ 1 − τ·var/‖x_i‖²
        need = (1 - self.cfg.itda_tau * self.var_ref / norm_P[:m].pow(2)).clamp_min(0)
        explains = (cos.pow(2) >= need[:, None]).cpu().numpy()  # [i, s]
        chosen: list[int] = []
        for i in range(m):
            if not explains[i, chosen].any():
                chosen.append(i)
        mask = torch.zeros(v_PD.shape[0], dtype=torch.bool, device=v_PD.device)
        mask[chosen] = True
        return mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)

    def _warn_full(self) -> None:
        if not self._warned_full:
            warnings.warn(
                f"ITDA dictionary reached its cap of {self.cap} atoms; further above-τ activations "
                "are not added (raise width to allow more)",
                stacklevel=4,  # the caller of partial_fit (through the no_grad wrapper)
            )
            self._warned_full = True

    def _check_provenance(self, provenance, n: int) -> dict[str, Tensor]:
        out = {}
        for key, v in (provenance or {}).items():
            v = torch.as_tensor(v)
            if v.ndim != 1 or v.shape[0] != n or v.is_floating_point():
                raise DifflensError(
                    f"ITDA provenance {key!r} must be an integer tensor with one entry per row ({n}), "
                    f"got {v.dtype} of shape {tuple(v.shape)}"
                )
            out[str(key)] = v.to(torch.long).to(self.atoms_AD.device)
        return out

    def _append(self, new_ND: Tensor, prov: dict[str, Tensor]) -> None:
        n_old, n_new = self.num_atoms, new_ND.shape[0]
        for key in set(prov) | set(self.provenance):
            name = PROV_PREFIX + key
            old = self._buffers.get(name)
            if old is None:  # a key first seen now: earlier atoms have no record
                old = torch.full((n_old,), -1, dtype=torch.long, device=self.atoms_AD.device)
            add = prov.get(key, torch.full((n_new,), -1, dtype=torch.long, device=self.atoms_AD.device))
            self.register_buffer(name, torch.cat([old, add]))
        self.atoms_AD = torch.cat([self.atoms_AD, new_ND.to(self.atoms_AD.dtype)])
        self._scores_atoms = None

    @torch.no_grad()
    def prune(self, cos_threshold: float) -> int:
        """Remove atoms whose cosine to an earlier kept atom exceeds the threshold; returns how many."""
        keep = greedy_dedupe(self.atoms_AD, cos_threshold)
        removed = int((~keep).sum())
        if removed:
            self.atoms_AD = self.atoms_AD[keep]
            self._scores_atoms = None
            for key, v in self.provenance.items():
                self.register_buffer(PROV_PREFIX + key, v[keep])
        return removed

    # ---- inference ------------------------------------------------------------------------------------
    def _pursuit(self, xn: Tensor) -> tuple[Tensor, Tensor]:
        k = int(self.cfg.k)
        if self.num_atoms == 0:
            return xn.new_zeros(xn.shape[0], 0), torch.zeros(xn.shape[0], 0, dtype=torch.long, device=xn.device)
        if self.cfg.itda_inference == "mp":
            return matching_pursuit(xn, self.atoms_AD, k)
        return gradient_pursuit(xn, self.atoms_AD, k)

    def _decode_n(self, vals_BL: Tensor, idx_BL: Tensor) -> Tensor:
        if idx_BL.shape[1] == 0:
            return vals_BL.new_zeros(vals_BL.shape[0], self.d_in)
        return torch.nn.functional.embedding_bag(idx_BL, self.atoms_AD, mode="sum", per_sample_weights=vals_BL)

    @torch.no_grad()
    def encode_sparse(self, x_BD: Tensor, t_B=None) -> tuple[Tensor, Tensor]:
        x, t = self._inputs(x_BD, t_B)
        return self._pursuit(self.norm.apply(x, t))

    @torch.no_grad()
    def encode(self, x_BD: Tensor, t_B=None) -> Tensor:
        vals, idx = self.encode_sparse(x_BD, t_B)
        return vals.new_zeros(vals.shape[0], self.num_atoms).scatter_add_(1, idx, vals)

    @torch.no_grad()
    def decode(self, codes_BF: Tensor, t_B=None) -> Tensor:
        if codes_BF.ndim != 2 or codes_BF.shape[1] != self.num_atoms:
            raise DifflensError(f"codes must have shape [batch, {self.num_atoms}] (one per atom), got {tuple(codes_BF.shape)}")
        t = as_timesteps(t_B, codes_BF.shape[0], codes_BF.device)
        return self.norm.invert(codes_BF.to(self.atoms_AD.dtype) @ self.atoms_AD, t)

    @torch.no_grad()
    def forward(self, x_BD: Tensor, t_B=None) -> DictOutput:
        x, t = self._inputs(x_BD, t_B)
        xn = self.norm.apply(x, t)
        vals, idx = self._pursuit(xn)
        xn_hat = self._decode_n(vals, idx)
        mse = torch.nn.functional.mse_loss(xn_hat, xn)
        return DictOutput(
            x_hat=self.norm.invert(xn_hat, t),
            loss=mse,
            losses={"mse": mse},
            num_latents=self.num_atoms,
            values=vals,
            indices=idx,
            l0=(vals > 0).sum().float() / max(x.shape[0], 1),
        )

    def decoder_directions(self) -> Tensor:
        with torch.no_grad():
            d = self.norm.invert_linear(self.atoms_AD)
            return d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def lr_scale(self) -> float:
        return 1.0

    # ---- checkpoints: shapes depend on the data ------------------------------------------------------
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "atoms_AD" not in tensors:
            raise DifflensError("ITDA checkpoint has no atoms_AD tensor; the weights file is damaged or not ITDA")
        tensors = dict(tensors)
        n = tensors["atoms_AD"].shape[0]
        if tensors["atoms_AD"].ndim != 2 or tensors["atoms_AD"].shape[1] != self.d_in:
            raise DifflensError(f"ITDA atoms have shape {tuple(tensors['atoms_AD'].shape)}, expected [n, {self.d_in}]")
        self.atoms_AD = torch.empty_like(tensors["atoms_AD"])
        self._scores_atoms = None
        for name in [k for k in tensors if k.startswith(PROV_PREFIX)]:
            v = tensors[name]
            if v.shape != (n,):
                raise DifflensError(f"ITDA provenance {name} has {tuple(v.shape)} entries for {n} atoms")
            self.register_buffer(name, torch.empty_like(v))
        super().load_tensors(tensors)


def _unpack(batch) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """Accept (x, t), (x, t, provenance) or a mapping with acts/x, timestep/t and provenance keys."""
    if isinstance(batch, Mapping):
        x = batch.get("acts", batch.get("x"))
        if x is None:
            raise DifflensError("an ITDA batch mapping needs the activations under 'acts' (or 'x')")
        t = batch.get("timestep", batch.get("t"))
        skip = {"acts", "x", "timestep", "t"}
        prov = {
            k: v for k, v in batch.items() if k not in skip and isinstance(v, Tensor) and v.ndim == 1 and not v.is_floating_point()
        }
        return x, t, prov
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else {}) or {}
    if isinstance(batch, Tensor):
        return batch, None, {}
    raise DifflensError("ITDA batches must be tensors, (x, t[, provenance]) tuples, or mappings with 'acts'")


def build(batches: Iterable, cfg: DictConfig, *, max_batches: int | None = None, show_progress: bool = True) -> ITDA:
    """Build an ITDA dictionary from an iterable of batches (see `_unpack` for accepted forms)."""
    if cfg.arch != "itda":
        raise DifflensError(f"itda.build needs arch='itda', got {cfg.arch!r}")
    itda = ITDA(cfg)
    bar = progress(batches, desc="itda", total=max_batches, **({} if show_progress else {"disable": True}))
    for i, batch in enumerate(bar):
        if max_batches is not None and i >= max_batches:
            break
        if itda.num_atoms >= itda.cap:
            bar.write(f"itda: the dictionary is full ({itda.cap} atoms); stopped after {i} batches")
            break
        x, t, prov = _unpack(batch)
        stats = itda.partial_fit(x, t, prov)
        bar.set_postfix(atoms=stats["atoms"], added=stats["added"], refresh=False)
    bar.close()
    return itda
