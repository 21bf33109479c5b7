"""Sparse autoencoders: TopK, BatchTopK and ReLU + L1, sharing one set of parameters and hooks.

    pre = W_enc (x_n − b_dec) + b_enc            x_n: normalised input (see normalize.py)
    z   = TopK(pre) then ReLU                    BatchTopK: top k·B over the batch; ReLU: relu(pre)
    x̂_n = W_dec z + b_dec                        x̂ = invert_normalisation(x̂_n)

Losses are computed in the normalised space (that is what normalisation is for):
    mse   = mean over rows and dims of (x_n − x̂_n)²
    auxk  = auxk_coef · ‖ê − e‖² / ‖e − ē‖² · v   (Gao et al.'s normalised AuxK, see `auxk_loss`)
            e = (x_n − x̂_n) detached, ê = W_dec z_aux (no b_dec), z_aux = the top k_aux
            pre-activations among DEAD latents (ReLU'd); v = the batch's per-element variance of
            x_n, the factor between our `mse` and the reference's normalised main loss.
    dead  = no non-zero code for `dead_after_tokens` training tokens (a latent selected with
            pre ≤ 0 does not count as firing).
    l1    = l1_coeff / D · mean over rows of Σ_f z_f ‖W_dec_f‖   (ReLU only; /D matches the usual
            sum-over-dims MSE convention, so l1_coeff ≈ 5 is a sensible start)

Parameters are stored as W_enc_FD [F, D] (row f = encoder direction of latent f, so pre =
x @ W_enc_FDᵀ) and W_dec_FD [F, D]; at init both are the same unit-norm matrix, i.e. the
encoder is the decoder's transpose. TopK and BatchTopK train through `kernels.py` (decode and
backprop only through the selected entries) unless built with ``fast=False``, the plain dense
reference kept for tests and the benchmark.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflens.dictionaries.base import Dictionary, DictOutput, as_timesteps, register
from difflens.dictionaries.config import BatchTopKConfig, ReLUConfig, SAEConfig, TopKConfig
from difflens.dictionaries.kernels import AuxSelection, Pattern, SparseSAEFunction, topk_rows
from difflens.errors import DifflensError


def geometric_median(x_ND: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distances (robust b_dec init)."""
    x = x_ND.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = float((new - m).norm()) <= tol * max(float(m.norm()), 1e-12)
        m = new
        if done:
            break
    return m.to(x_ND.dtype)


def compute_dtype(param_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """bf16 when autocast asks for it (the fast path casts explicitly), else the parameter dtype."""
    dev = device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return param_dtype


def fired_latents(pat: Pattern, pre_N: Tensor, num_latents: int) -> Tensor:
    """[F] bool: latents with a NON-ZERO code in the batch. A latent TopK selected with pre ≤ 0 has
    code 0 after the ReLU: it did not fire, so it stays on its way to dead (and AuxK can revive it)."""
    fired = torch.zeros(num_latents, dtype=torch.bool, device=pre_N.device)
    fired[pat.indices_N[pre_N.detach() > 0]] = True
    return fired


def auxk_loss(e_hat_BD: Tensor, e_BD: Tensor, ratio: Tensor, coef: float) -> Tensor:
    """AuxK as in Gao et al., expressed on the scale of our main loss.

    The reference: main = ‖x − x̂‖² / ‖x − x̄‖² (normalised MSE) and aux = coef · ‖ê − e‖² / ‖e − ē‖².
    Our main loss is the plain per-element MSE = v · (normalised MSE), v = ‖x − x̄‖² / (B·D), so we
    return v · aux = coef · (‖x − x̄‖² / ‖e − ē‖²) · mean (ê − e)², with `ratio` = ‖x − x̄‖² / ‖e − ē‖²
    (no gradient; summed over the global batch under DDP). The aux-to-main ratio, hence the
    gradients' direction, is the reference's exactly, and Adam is invariant to the common factor v.
    Keeping the main loss an MSE keeps ReLU's L1 and JumpReLU's L0 coefficients and the logged
    `loss_mse` meaning what they did."""
    return coef * ratio * F.mse_loss(e_hat_BD, e_BD)


class BatchComm(Protocol):
    """What a sparse SAE needs from a data-parallel group (train/distributed.py implements it):
    BatchTopK selects over the global batch, AuxK normalises by global-batch variances."""

    def sum_(self, t: Tensor) -> Tensor: ...

    def gather(self, t_N: Tensor) -> Tensor: ...


class SAE(Dictionary):
    """Shared by all SAE flavours: parameters, init, decoder-norm hooks, dead-latent tracker."""

    family = "sae"
    has_fast_path = True

    def __init__(self, cfg: SAEConfig, *, fast: bool = True):
        super().__init__(cfg)
        f, d = cfg.width, cfg.d_in
        gen = torch.Generator().manual_seed(cfg.init_seed)
        W = torch.randn(f, d, generator=gen)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec_FD = nn.Parameter(W)
        self.W_enc_FD = nn.Parameter(W.clone())  # W_enc = W_decᵀ at init
        self.b_enc_F = nn.Parameter(torch.zeros(f))
        self.b_dec_D = nn.Parameter(torch.zeros(d))
        self.register_buffer("tokens_since_fired_F", torch.zeros(f, dtype=torch.long))
        self.fast = fast

    # ---- space hooks (identity here; TIDE modulates by timestep) ------------------------------------
    def _film(self, t_B: Tensor | None):
        """Per-row modulation context (TIDE's scale and shift); None for a plain SAE."""
        return None

    def _to_sae_space(self, xn_BD: Tensor, film) -> Tensor:
        return xn_BD

    def _from_sae_space(self, y_BD: Tensor, film) -> Tensor:
        return y_BD

    def _from_sae_space_linear(self, y_BD: Tensor, film) -> Tensor:
        return y_BD

    # ---- init and optimiser hooks -------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor, t_B=None) -> None:
        """Fit normalisation, then b_dec = geometric median (or mean) of the first batch."""
        super().init_from_data(x_BD, t_B)
        x, t = self._inputs(x_BD, t_B)
        x_in = self._to_sae_space(self.norm.apply(x, t), self._film(t))
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec_D.copy_(geometric_median(x_in))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec_D.copy_(x_in.mean(0))
        else:
            self.b_dec_D.zero_()

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the decoder-gradient component parallel to each decoder row (keeps ‖W_dec_f‖ = 1
        to first order, so Adam does not spend its step on a norm the next renorm undoes)."""
        g = self.W_dec_FD.grad
        if g is None or not self.cfg.decoder_unit_norm:
            return
        W = self.W_dec_FD
        dots = torch.einsum("fd,fd->f", g, W)  # (no [F, D] temporary, unlike (g * W).sum(1))
        coef = dots / torch.linalg.vector_norm(W, dim=1).square().clamp_min(1e-12)
        g.addcmul_(coef[:, None], W, value=-1.0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise decoder rows to unit norm."""
        if self.cfg.decoder_unit_norm:
            W = self.W_dec_FD
            W.div_(torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(1e-12))

    # ---- dead latents -------------------------------------------------------------------------------
    @torch.no_grad()
    def _track(self, fired_F: Tensor, n_rows: int) -> None:
        if self.training:
            self.tokens_since_fired_F.add_(n_rows).masked_fill_(fired_F, 0)

    def dead_mask(self) -> Tensor:
        """Latents that have not fired in the last `dead_after_tokens` training tokens."""
        return self.tokens_since_fired_F >= self.cfg.dead_after_tokens

    # ---- shared encode/decode pieces ----------------------------------------------------------------
    def _pre(self, x_in_BD: Tensor) -> Tensor:
        return torch.addmm(self.b_enc_F, x_in_BD - self.b_dec_D, self.W_enc_FD.T)

    def _activate(self, pre_BF: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x_BD: Tensor, t_B=None) -> Tensor:
        x, t = self._inputs(x_BD, t_B)
        x_in = self._to_sae_space(self.norm.apply(x, t), self._film(t))
        return self._activate(self._pre(x_in))

    def decode(self, codes_BF: Tensor, t_B=None) -> Tensor:
        if codes_BF.ndim != 2 or codes_BF.shape[1] != self.num_latents:
            raise DifflensError(f"codes must have shape [batch, {self.num_latents}], got {tuple(codes_BF.shape)}")
        t = as_timesteps(t_B, codes_BF.shape[0], codes_BF.device)
        y = codes_BF.to(self.W_dec_FD.dtype) @ self.W_dec_FD + self.b_dec_D
        return self.norm.invert(self._from_sae_space(y, self._film(t)), t)

    def decoder_directions(self) -> Tensor:
        with torch.no_grad():
            d = self.norm.invert_linear(self.W_dec_FD.detach())
            return d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _output(self, t, xn_hat, losses, **kw) -> DictOutput:
        loss = sum(losses.values()) if losses else xn_hat.new_zeros(())
        return DictOutput(x_hat=self.norm.invert(xn_hat, t), loss=loss, losses=losses, num_latents=self.num_latents, **kw)


class _SparseSAE(SAE):
    """TopK-style SAEs: a sparse pattern per batch, trained through `kernels.SparseSAEFunction`."""

    def _select(self, pre_BF: Tensor) -> tuple[Pattern, Tensor]:
        """(pattern, selected pre-activations [N]) for a batch."""
        raise NotImplementedError

    batch_comm: BatchComm | None = None  # set by a data-parallel trainer (`set_batch_comm`)

    def set_batch_comm(self, comm: BatchComm | None) -> None:
        """Data-parallel training: batch-level statistics (BatchTopK's selection, AuxK's variance
        normalisation) are taken over the GLOBAL batch through `comm`, as one process would."""
        self.batch_comm = comm

    def _aux_active(self) -> bool:
        """AuxK applies this step (the same answer on every rank: dead counters are synced)."""
        return bool(self.training and self.cfg.auxk and self.cfg.auxk_coef > 0 and self.dead_mask().any())

    @torch.no_grad()
    def _variance_ratio(self, xn_BD: Tensor, e_BD: Tensor) -> Tensor:
        """‖x − x̄‖² / ‖e − ē‖² over the (global) batch, from sums so ranks can add them up."""
        d = xn_BD.shape[1]
        x, e = xn_BD.double(), e_BD.double()
        stats = torch.cat([x.new_tensor([x.shape[0], x.pow(2).sum(), e.pow(2).sum()]), x.sum(0), e.sum(0)])
        if self.batch_comm is not None:
            stats = self.batch_comm.sum_(stats)
        n = stats[0].clamp_min(1)
        s_x = stats[1] - stats[3 : 3 + d].pow(2).sum() / n
        s_e = stats[2] - stats[3 + d :].pow(2).sum() / n
        return (s_x / s_e.clamp_min(1e-12)).float()

    @torch.no_grad()
    def join_without_rows(self) -> None:
        """Data-parallel step on a rank with no rows: take part in the step's collectives."""
        if self.batch_comm is not None and self._aux_active():
            z = self.b_dec_D.new_zeros(0, self.d_in)
            self._variance_ratio(z, z)

    def _aux_select(self, pre_BF: Tensor) -> AuxSelection | None:
        """Top k_aux pre-activations per row among dead latents (training with AuxK only)."""
        if not self._aux_active():
            return None
        dead_ids = self.dead_mask().nonzero().squeeze(1)
        if dead_ids.numel() == 0:
            return None
        k_aux = min(self.cfg.k_aux_eff, dead_ids.numel())
        pre_dead = pre_BF.index_select(1, dead_ids)
        vals, idx = topk_rows(pre_dead, k_aux)
        keep = vals > 0
        if bool(keep.all()):
            return AuxSelection(vals.reshape(-1).float(), Pattern.from_rows(idx, dead_ids.numel()), dead_ids)
        # Selected entries with pre <= 0 have code 0 after the ReLU: they add nothing to ê and get no
        # gradient, so drop them (dead latents' pre-activations are mostly negative in practice).
        flat = keep.reshape(-1).nonzero().squeeze(1)
        if flat.numel() == 0:
            return None
        offsets = torch.zeros(keep.shape[0] + 1, dtype=torch.long, device=keep.device)
        offsets[1:] = keep.sum(1).cumsum(0)
        pat = Pattern(idx.reshape(-1).index_select(0, flat), offsets, dead_ids.numel())
        return AuxSelection(vals.reshape(-1).index_select(0, flat).float(), pat, dead_ids)

    def forward(self, x_BD: Tensor, t_B=None) -> DictOutput:
        x, t = self._inputs(x_BD, t_B)
        xn = self.norm.apply(x, t)
        film = self._film(t)
        x_in = self._to_sae_space(xn, film)
        if self.fast:
            y_hat, aux_hat, pat, pre_N = self._core_fast(x_in)
        else:
            y_hat, aux_hat, pat, pre_N = self._core_dense(x_in)
        xn_hat = self._from_sae_space(y_hat, film)
        losses = {"mse": F.mse_loss(xn_hat, xn)}
        if self._aux_active():  # every rank computes the global ratio, even without aux picks
            e = (xn - xn_hat).detach()
            ratio = self._variance_ratio(xn, e)
            if aux_hat is not None:
                losses["auxk"] = auxk_loss(self._from_sae_space_linear(aux_hat, film), e, ratio, self.cfg.auxk_coef)
        self._track(fired_latents(pat, pre_N, self.num_latents), x.shape[0])  # after the AuxK decision
        vals, idx = self._padded(pat, pre_N.detach().relu())
        l0 = (pre_N.detach() > 0).sum().float() / x.shape[0]
        return self._output(t, xn_hat, losses, values=vals, indices=idx, l0=l0)

    def _core_fast(self, x_in: Tensor):
        cd = compute_dtype(self.W_enc_FD.dtype, x_in.device)
        with torch.no_grad(), torch.autocast(x_in.device.type, enabled=False):
            x_c = (x_in - self.b_dec_D).to(cd)
            pre = torch.addmm(self.b_enc_F.to(cd), x_c, self.W_enc_FD.to(cd).T, out=self._workspace(x_c, cd))
            del x_c
            pat, pre_N = self._select(pre)
            aux = self._aux_select(pre)
            del pre
            pre_N = pre_N.float()
        out = SparseSAEFunction.apply(x_in, self.b_dec_D, self.W_enc_FD, self.b_enc_F, self.W_dec_FD, pre_N, pat, aux, cd)
        return out[0], (out[1] if aux is not None else None), pat, pre_N

    def _workspace(self, x_c: Tensor, cd: torch.dtype) -> Tensor:
        """The [B, F] pre-activation buffer, reused across training steps: a fresh 200+ MB tensor per
        step costs ~5% of the step in page faults. Inference allocates per call (no memory kept)."""
        shape = (x_c.shape[0], self.num_latents)
        if not self.training:
            return torch.empty(shape, dtype=cd, device=x_c.device)
        ws = getattr(self, "_ws", None)
        if ws is None or ws.shape != shape or ws.dtype != cd or ws.device != x_c.device:
            ws = self._ws = torch.empty(shape, dtype=cd, device=x_c.device)
        return ws

    def release_workspace(self) -> None:
        """Free the cached training buffer (it is rebuilt on the next training step)."""
        self._ws = None

    def train(self, mode: bool = True):
        if not mode:
            self.release_workspace()  # eval() gives the memory back
        return super().train(mode)

    def _core_dense(self, x_in: Tensor):
        """Reference: dense codes, autograd through everything (same maths as the fast path)."""
        pre = self._pre(x_in)
        pat, _ = self._select(pre.detach())
        pre_N = pre[pat.rows_N(), pat.indices_N]
        codes = torch.zeros_like(pre).index_put((pat.rows_N(), pat.indices_N), pre_N.relu())
        y_hat = codes @ self.W_dec_FD + self.b_dec_D
        aux_hat = None
        aux = self._aux_select(pre.detach())
        if aux is not None:
            rows, ids = aux.pattern.rows_N(), aux.dead_ids[aux.pattern.indices_N]
            aux_codes = torch.zeros_like(pre).index_put((rows, ids), pre[rows, ids].relu())
            aux_hat = aux_codes @ self.W_dec_FD
        return y_hat, aux_hat, pat, pre_N

    @staticmethod
    def _padded(pat: Pattern, vals_N: Tensor) -> tuple[Tensor, Tensor]:
        """Sparse codes as [B, K] (K = the longest row; short rows padded with value 0, index 0)."""
        counts = pat.offsets_B1[1:] - pat.offsets_B1[:-1]
        b = counts.shape[0]
        kmax = int(counts.max()) if b else 0
        if b and bool((counts == kmax).all()):
            return vals_N.view(b, kmax), pat.indices_N.view(b, kmax)
        kmax = max(kmax, 1)
        pos = torch.arange(vals_N.shape[0], device=vals_N.device) - pat.offsets_B1[:-1].repeat_interleave(counts)
        rows = pat.rows_N()
        v = vals_N.new_zeros(b, kmax).index_put_((rows, pos), vals_N)
        i = pat.indices_N.new_zeros(b, kmax).index_put_((rows, pos), pat.indices_N)
        return v, i

    def encode_sparse(self, x_BD: Tensor, t_B=None) -> tuple[Tensor, Tensor]:
        x, t = self._inputs(x_BD, t_B)
        x_in = self._to_sae_space(self.norm.apply(x, t), self._film(t))
        with torch.no_grad():
            pat, pre_N = self._select_inference(self._pre(x_in))
        return self._padded(pat, pre_N.relu())

    def _select_inference(self, pre_BF: Tensor) -> tuple[Pattern, Tensor]:
        return self._select(pre_BF)

    def _activate(self, pre_BF: Tensor) -> Tensor:
        pat, pre_N = self._select_inference(pre_BF.detach())
        rows, ids = pat.rows_N(), pat.indices_N
        return torch.zeros_like(pre_BF).index_put((rows, ids), pre_BF[rows, ids].relu())


@register("topk", TopKConfig)
class TopKSAE(_SparseSAE):
    """z = ReLU(TopK(pre)): exactly k active latents per row (fewer if some selected pre ≤ 0)."""

    def _select(self, pre_BF: Tensor) -> tuple[Pattern, Tensor]:
        vals, idx = topk_rows(pre_BF, int(self.cfg.k))
        return Pattern.from_rows(idx, self.num_latents), vals.reshape(-1)


@register("batchtopk", BatchTopKConfig)
class BatchTopKSAE(_SparseSAE):
    """Training: the top k·B pre-activations of the whole batch (rows get a varying number).
    Inference: a fixed threshold θ — the running average of the smallest selected activation —
    so a token's code does not depend on its batch. θ is a buffer, saved with the weights."""

    def __init__(self, cfg: SAEConfig, *, fast: bool = True):
        super().__init__(cfg, fast=fast)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_seen", torch.tensor(False))

    def _select(self, pre_BF: Tensor) -> tuple[Pattern, Tensor]:
        if not self.training:
            return self._select_inference(pre_BF)
        b, f = pre_BF.shape
        flat = pre_BF.reshape(-1)
        if self.batch_comm is None:
            vals, ids = topk_flat(flat, min(int(self.cfg.k) * b, flat.numel()))
        else:
            vals, ids = self._select_global(flat, b)
        pat = Pattern.from_flat(ids, b, f)
        rows = pat.rows_N()
        pre_N = pre_BF[rows, pat.indices_N]
        self._update_threshold(vals)
        return pat, pre_N

    def _select_global(self, flat: Tensor, b: int) -> tuple[Tensor, Tensor]:
        """(selected values of the whole global batch, this rank's selected flat ids).

        The global top n = k·B_global lies within the union of every rank's local top n, so each
        rank sends its top n candidates; the n-th largest of them is the global cut. Every rank
        then keeps its entries at or above the cut (ties at the cut may add a few)."""
        comm = self.batch_comm
        n = int(self.cfg.k) * int(comm.sum_(torch.tensor([float(b)], dtype=torch.float64)).item())
        cand = topk_flat(flat, min(n, flat.numel()))[0] if flat.numel() else flat
        every = comm.gather(cand.float())
        top = every.topk(min(n, every.numel()), sorted=False).values
        if top.numel() == 0:
            return top, torch.zeros(0, dtype=torch.long, device=flat.device)
        cut = top.min().to(flat.dtype)
        ids = (flat >= cut).nonzero().squeeze(1)
        return top, ids

    @torch.no_grad()
    def join_without_rows(self) -> None:
        """Data-parallel step on a rank with no rows: take part in the selection's collectives."""
        if self.batch_comm is None or not self.training:
            return
        self._update_threshold(self._select_global(self.b_enc_F.new_zeros(0), 0)[0])
        super().join_without_rows()

    @torch.no_grad()
    def _update_threshold(self, pre_N: Tensor) -> None:
        """EMA of the smallest positive selected pre-activation (of the global batch under DDP)."""
        pos = pre_N[pre_N > 0]
        if pos.numel() == 0:
            return
        lo = pos.min().float()
        if bool(self.threshold_seen):
            m = self.cfg.batchtopk_threshold_momentum
            self.threshold.mul_(1 - m).add_(m * lo)
        else:
            self.threshold.copy_(lo)
            self.threshold_seen.fill_(True)

    def _select_inference(self, pre_BF: Tensor) -> tuple[Pattern, Tensor]:
        b, f = pre_BF.shape
        if not bool(self.threshold_seen):  # untrained: fall back to per-row TopK
            vals, idx = topk_rows(pre_BF, int(self.cfg.k))
            return Pattern.from_rows(idx, f), vals.reshape(-1)
        ids = (pre_BF.reshape(-1) > self.threshold.to(pre_BF.dtype)).nonzero().squeeze(1)
        pat = Pattern.from_flat(ids, b, f)
        return pat, pre_BF[pat.rows_N(), pat.indices_N]


def topk_flat(x_N: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Exact top-n of a long vector, faster than torch.topk for large n: estimate a threshold from
    a sample, keep everything above it, top-n among those; if fewer than n pass, use torch.topk."""
    total = x_N.numel()
    if total <= 8 * n or x_N.device.type != "cpu":
        return x_N.topk(n, sorted=False)
    s = min(total, 1 << 16)
    gen = torch.Generator().manual_seed(total ^ n)
    sample = x_N[torch.randint(0, total, (s,), generator=gen)]
    q = n / total
    r = min(s, int(s * q * 1.2 + 4 * (s * q) ** 0.5 + 16))
    thr = sample.topk(r, sorted=False).values.min()
    cand = (x_N >= thr).nonzero().squeeze(1)
    if cand.numel() < n:
        return x_N.topk(n, sorted=False)
    v, i = x_N[cand].topk(n, sorted=False)
    return v, cand[i]


@register("relu", ReLUConfig)
class ReLUSAE(SAE):
    """z = ReLU(pre), trained with MSE + L1 weighted by decoder norms (dense: codes are not k-sparse).
    Decoder rows are not renormalised by default: the norm-weighted L1 already removes the
    shrink-codes/grow-decoder escape, and renormalising would make the weighting moot."""

    def _activate(self, pre_BF: Tensor) -> Tensor:
        return pre_BF.relu()

    def forward(self, x_BD: Tensor, t_B=None) -> DictOutput:
        x, t = self._inputs(x_BD, t_B)
        xn = self.norm.apply(x, t)
        z = self._pre(xn).relu()
        xn_hat = z @ self.W_dec_FD + self.b_dec_D
        active = z.detach() > 0
        self._track(active.any(0), x.shape[0])
        dec_norm_F = self.W_dec_FD.norm(dim=1)
        losses = {
            "mse": F.mse_loss(xn_hat, xn),
            "l1": self.cfg.l1_coeff / self.d_in * (z @ dec_norm_F).mean(),
        }
        l0 = active.sum().float() / x.shape[0]
        return self._output(t, xn_hat, losses, dense_codes=z, l0=l0)
