"""The passes that fill a feature cache (`difflens.interpret.cache` holds its format).

A. `calibrate`: each feature's max over `calib_samples` images (all by default) fixes its
   threshold thr_f = max(abs_threshold, rel_threshold * max_f);
B. `statistics` over all images: frequency, log-binned activation histogram, timestep profiles,
   per (image, feature) the max over tokens and steps, and whether the image *qualifies*: at
   some step >= `min_tokens` tokens exceed thr_f. With token concept labels it also counts
   (`ConceptCounts`), per step and split, how often "token active" coincides with "token has
   concept c" (what the oracle explainer reads);
   `select_examples` then picks top-N qualifying images per split and quantile images, and
   `choose_map_features` the features that get token maps;
C. `token_maps`: [steps, tokens] of the chosen images of those features, stored sparsely.

`CacheRun` is what the passes share: the features, the images, the config, the sample ids
and their explain/judge split. It keeps the last pass's codes when they are sparse (a dictionary's
are: L0 of 16 among ~1,000 features), so a pass over the same images replays them instead of
encoding again (the same batches, bit-identical codes; ITDA's pursuit is most of its interpretation
time). `feature_maps` re-encodes chosen (feature, image) pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from difflens.errors import DifflensError
from difflens.interpret.cache import CacheConfig, SparseMaps
from difflens.groundtruth import ConceptVocabulary
from difflens.interpret.features import FeatureSource
from difflens.interpret.sources import SampleSource
from difflens.utils import progress


def encode(features: FeatureSource, acts_bSTD: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    b, S, T, D = acts_bSTD.shape
    t_rows = timesteps.repeat_interleave(T).repeat(b)
    codes = features(acts_bSTD.reshape(-1, D), t_rows)
    if codes.shape != (b * S * T, features.num_features):
        raise DifflensError(f"{features.name} returned codes of shape {tuple(codes.shape)}, expected [{b * S * T}, {features.num_features}]")
    return codes.float().reshape(b, S, T, -1)


@dataclass
class CacheRun:
    """What every pass of one cache build shares."""

    features: FeatureSource
    src: SampleSource
    cfg: CacheConfig
    sids: np.ndarray  # sorted sample ids
    ts: torch.Tensor  # the source's timesteps
    split: np.ndarray  # per sample: 0 explain, 1 judge
    memo_max_nonzeros: int = 64_000_000  # codes kept for the next pass over the same images (~0.5 GB)
    _memo: dict = field(default_factory=dict, repr=False)  # the last pass: its sample ids -> [(batch ids, packed)]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(samples n, steps S, tokens T, features F)."""
        return len(self.sids), len(self.src.steps), self.src.num_tokens, self.features.num_features

    def batches(self, sids, desc: str):
        """(sample ids, codes [b, S, T, F]) over `sids`, with a progress bar; replayed from the
        previous pass when it covered the same sample ids and its codes were sparse enough to keep."""
        key = tuple(int(s) for s in sids)
        bar = progress(total=len(sids), desc=f"{self.features.name}: {desc}", unit="img")
        if key in self._memo:
            for b_sids, packed in self._memo[key]:
                yield b_sids, _unpack(packed)
                bar.update(len(b_sids))
            bar.close()
            return
        kept: list | None = []
        room = self.memo_max_nonzeros
        for b_sids, acts in self.src.iter_acts(self.features.site, sids, self.cfg.rows_per_batch):
            codes = encode(self.features, acts, self.ts)
            if kept is not None:
                packed = _pack(codes, room)
                if packed is None:  # dense codes (neurons, random directions): encoding again is cheaper than keeping
                    kept = None
                else:
                    kept.append((b_sids, packed))
                    room -= packed[2].numel()
            yield b_sids, codes
            bar.update(len(b_sids))
        bar.close()
        self._memo = {} if kept is None else {key: kept}


def _pack(codes: torch.Tensor, room: int):
    """Sparse copy of codes [b, S, T, F] (None when over 1 in 8 entries are non-zero or over `room`)."""
    flat = codes.reshape(-1, codes.shape[-1])
    nz = flat.nonzero()
    if nz.shape[0] > min(room, flat.numel() // 8):
        return None
    return tuple(codes.shape), nz.to(torch.int32), flat[nz[:, 0], nz[:, 1]].clone()


def _unpack(packed) -> torch.Tensor:
    shape, nz, vals = packed
    flat = torch.zeros(math.prod(shape[:-1]), shape[-1], dtype=vals.dtype)
    flat[nz[:, 0].long(), nz[:, 1].long()] = vals
    return flat.reshape(shape)


def calibrate(run: CacheRun, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass A: each feature's max over the calibration images fixes its threshold; (thr, max)."""
    cfg, sids, F = run.cfg, run.sids, run.shape[3]
    calib = sids
    if cfg.calib_samples is not None and cfg.calib_samples < len(sids):
        calib = np.sort(np.random.default_rng(seed).choice(sids, size=cfg.calib_samples, replace=False))
    gmax = torch.full((F,), -math.inf)
    for _, codes in run.batches(calib, "calibrate"):
        gmax = torch.maximum(gmax, codes.amax((0, 1, 2)))
    return thresholds(cfg, gmax), gmax


def thresholds(cfg: CacheConfig, gmax: torch.Tensor) -> torch.Tensor:
    """thr_f = max(abs_threshold, rel_threshold * max_f) for a feature that fires, else abs_threshold."""
    return torch.where(gmax > 0, torch.clamp(cfg.rel_threshold * gmax, min=cfg.abs_threshold), torch.tensor(float(cfg.abs_threshold)))


class ConceptCounts:
    """Per step and split, how often "token active" coincides with "token has concept c"."""

    def __init__(self, labels: np.ndarray, S: int, F: int, vocabulary: ConceptVocabulary):
        self.cm_all = vocabulary.matrix(labels)  # [n, T, C]
        C = self.cm_all.shape[-1]
        self.tp = torch.zeros(2, S, F, C, dtype=torch.float64)
        self.act_cnt = torch.zeros(2, S, F, dtype=torch.float64)
        self.con_cnt = torch.zeros(2, S, C, dtype=torch.float64)

    def add(self, rows: np.ndarray, split: np.ndarray, act: torch.Tensor) -> None:
        b, S, T, F = act.shape
        C = self.cm_all.shape[-1]
        L = torch.from_numpy(self.cm_all[rows].reshape(b * T, C)).float()  # [bT, C]
        row_split = torch.from_numpy(np.repeat(split[rows], T).astype(np.int64))
        act_SnF = act.permute(1, 0, 2, 3).reshape(S, b * T, F)
        if float(act.float().mean()) < 0.05:  # sparse features (SAE, ITDA): add label rows per active entry
            s_i, n_i, f_i = act_SnF.nonzero(as_tuple=True)
            slot = (row_split[n_i] * S + s_i) * F + f_i
            self.tp.view(-1, C).index_add_(0, slot, L[n_i].double())
            self.act_cnt.view(-1).index_add_(0, slot, torch.ones(len(slot), dtype=torch.float64))
        else:  # dense features (neurons, random directions): matrix products
            A = act_SnF.float()  # [S, bT, F]
            for k in (0, 1):
                mk = (row_split == k).float()
                if mk.any():
                    self.tp[k] += torch.einsum("snf,nc->sfc", A, L * mk[:, None]).double()
                    self.act_cnt[k] += (A * mk[None, :, None]).sum(1).double()
        for k in (0, 1):
            self.con_cnt[k] += L[row_split == k].sum(0).double()[None, :]

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "concept_tp": self.tp.float().numpy(),  # [2, S, F, C]
            "concept_active": self.act_cnt.float().numpy(),  # [2, S, F]
            "concept_count": self.con_cnt.float().numpy(),  # [2, S, C]
            "image_concepts": self.cm_all.any(1),  # [n, C]
        }


def statistics(run: CacheRun, thr: torch.Tensor, labels: np.ndarray | None,
               vocabulary: ConceptVocabulary | None = None) -> dict[str, np.ndarray]:
    """Pass B over all images: frequency, histogram, profiles, per-image scores (and concept counts)."""
    cfg = run.cfg
    n, S, T, F = run.shape
    pos_of = {int(s): i for i, s in enumerate(run.sids)}
    edges_lo, bpo = cfg.hist_log2_min, cfg.hist_bins_per_octave
    B = (cfg.hist_log2_max - cfg.hist_log2_min) * bpo
    n_pos = torch.zeros(F, dtype=torch.float64)
    n_act = torch.zeros(F, dtype=torch.float64)
    sum_SF = torch.zeros(S, F, dtype=torch.float64)
    maxsum_SF = torch.zeros(S, F, dtype=torch.float64)
    hist = torch.zeros(F * B, dtype=torch.int64)
    nonpos = torch.zeros(F, dtype=torch.int64)
    gmax_all = torch.full((F,), -math.inf)
    s_score = np.zeros((n, F), np.float32)
    s_step = np.zeros((n, F), np.int16)
    s_qual = np.zeros((n, F), bool)
    s_max = np.zeros((n, F), np.float32)
    s_max_step = np.zeros((n, F), np.int16)
    if labels is not None and vocabulary is None:
        raise DifflensError("token labels need the concept vocabulary of their world to be counted")
    concepts = ConceptCounts(labels, S, F, vocabulary) if labels is not None else None
    for b_sids, codes in run.batches(run.sids, "statistics"):  # codes [b, S, T, F]
        rows = np.array([pos_of[int(s)] for s in b_sids])
        gmax_all = torch.maximum(gmax_all, codes.amax((0, 1, 2)))
        pos = codes > cfg.abs_threshold
        act = codes > thr
        n_pos += pos.sum((0, 1, 2)).double()
        n_act += act.sum((0, 1, 2)).double()
        sum_SF += codes.sum((0, 2)).double()
        stepmax = codes.amax(2)  # [b, S, F]
        maxsum_SF += stepmax.sum(0).double()
        qual = act.sum(2) >= cfg.min_tokens  # [b, S, F]
        score, sstep = torch.where(qual, stepmax, torch.tensor(-math.inf)).max(1)
        q_any = qual.any(1)
        mx, mstep = stepmax.max(1)
        s_score[rows] = torch.where(q_any, score, torch.zeros(())).numpy()
        s_step[rows] = sstep.numpy()
        s_qual[rows] = q_any.numpy()
        s_max[rows] = mx.numpy()
        s_max_step[rows] = mstep.numpy()
        flat = codes.reshape(-1, F)
        nz = (flat > 0).nonzero()
        if nz.numel():
            v = flat[nz[:, 0], nz[:, 1]]
            bins = torch.floor((torch.log2(v) - edges_lo) * bpo).long().clamp_(0, B - 1)
            hist += torch.bincount(nz[:, 1] * B + bins, minlength=F * B)
        nonpos += (flat <= 0).sum(0)
        if concepts is not None:
            concepts.add(rows, run.split, act)

    total_tokens = float(n * S * T)
    arrays: dict[str, np.ndarray] = {
        "sample_ids": run.sids,
        "split": run.split,
        "threshold": thr.numpy().astype(np.float32),
        "max": gmax_all.numpy().astype(np.float32),
        "frequency": (n_pos / total_tokens).float().numpy(),
        "frequency_thr": (n_act / total_tokens).float().numpy(),
        "profile_mean": (sum_SF.T / (n * T)).float().numpy(),  # [F, S]
        "profile_max": (maxsum_SF.T / n).float().numpy(),  # [F, S]
        "hist_counts": hist.reshape(F, B).numpy(),
        "hist_nonpos": nonpos.numpy(),
        "sample_score": s_score,
        "sample_step": s_step,
        "sample_qualifies": s_qual,
        "sample_max": s_max,
        "sample_max_step": s_max_step,
    }
    if concepts is not None:
        arrays.update(concepts.arrays())
    return arrays


def select_examples(run: CacheRun, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Top-N qualifying images per split and images at evenly spaced quantiles of the per-image max."""
    cfg, sids, split = run.cfg, run.sids, run.split
    F = run.shape[3]
    s_score, s_step, s_qual = arrays["sample_score"], arrays["sample_step"], arrays["sample_qualifies"]
    s_max, s_max_step = arrays["sample_max"], arrays["sample_max_step"]
    N, Q = cfg.top_n, cfg.n_quantiles
    top_sample = np.full((F, 2, N), -1, np.int64)
    top_value = np.zeros((F, 2, N), np.float32)
    top_step = np.zeros((F, 2, N), np.int16)
    for k in (0, 1):
        masked = np.where(s_qual & (split[:, None] == k), s_score, -np.inf)  # [n, F]
        order = np.argsort(-masked, axis=0, kind="stable")[:N]  # [<=N, F]
        vals = np.take_along_axis(masked, order, 0)
        r = order.shape[0]
        ok = np.isfinite(vals)
        top_sample[:, k, :r] = np.where(ok, sids[order], -1).T
        top_value[:, k, :r] = np.where(ok, vals, 0).T
        top_step[:, k, :r] = np.where(ok, np.take_along_axis(s_step, order, 0), 0).T
    quant_sample = np.full((F, Q), -1, np.int64)
    quant_value = np.zeros((F, Q), np.float32)
    quant_step = np.zeros((F, Q), np.int16)
    if Q:
        thr_np = arrays["threshold"]
        for f in range(F):
            cand = np.flatnonzero(s_max[:, f] > thr_np[f])
            if cand.size == 0:
                continue
            cand = cand[np.argsort(s_max[cand, f], kind="stable")]
            picks = np.unique(np.minimum((np.arange(Q) + 0.5) / Q * cand.size, cand.size - 1).astype(int))
            chosen = cand[picks]
            quant_sample[f, : len(chosen)] = sids[chosen]
            quant_value[f, : len(chosen)] = s_max[chosen, f]
            quant_step[f, : len(chosen)] = s_max_step[chosen, f]
    return dict(top_sample=top_sample, top_value=top_value, top_step=top_step,
                quant_sample=quant_sample, quant_value=quant_value, quant_step=quant_step)


def choose_map_features(map_features, arrays: dict[str, np.ndarray], F: int) -> np.ndarray:
    """The feature ids that get token maps: given, chosen from the statistics, or every live one."""
    if callable(map_features):
        map_features = map_features(arrays)
    if map_features is None:
        mf = np.flatnonzero(arrays["frequency"] > 0)
    else:
        mf = np.unique(np.asarray(list(map_features), np.int64))
        if mf.size and (mf.min() < 0 or mf.max() >= F):
            raise DifflensError(f"map_features must be feature ids in [0, {F})")
    return mf.astype(np.int64)


def token_maps(run: CacheRun, arrays: dict[str, np.ndarray]) -> tuple[SparseMaps, SparseMaps]:
    """Pass C: token maps [steps, tokens] of the chosen images of the features that get maps."""
    _, S, T, _ = run.shape
    N, Q = run.cfg.top_n, run.cfg.n_quantiles
    mf, top_sample, quant_sample = arrays["map_features"], arrays["top_sample"], arrays["quant_sample"]
    top_maps = SparseMaps((len(mf), 2, N, S, T))
    quant_maps = SparseMaps((len(mf), Q, S, T))
    need: dict[int, list[tuple[int, int, int, int, int]]] = {}  # sid -> (which, row, a, r, feature)
    for m, f in enumerate(mf.tolist()):
        for k in (0, 1):
            for r in range(N):
                s = int(top_sample[f, k, r])
                if s >= 0:
                    need.setdefault(s, []).append((0, m, k, r, f))
        for q in range(Q):
            s = int(quant_sample[f, q])
            if s >= 0:
                need.setdefault(s, []).append((1, m, q, 0, f))
    if need:
        for b_sids, codes in run.batches(sorted(need), "token maps"):
            codes = codes.numpy()
            for i, s in enumerate(b_sids.tolist()):
                for which, m, a, r, f in need[s]:
                    if which == 0:
                        top_maps.put((m, a, r), codes[i, :, :, f])
                    else:
                        quant_maps.put((m, a), codes[i, :, :, f])
    return top_maps.finish(), quant_maps.finish()


def feature_maps(features: FeatureSource, data: SampleSource, want: dict[int, set[int] | list[int]], *,
                 rows_per_batch: int = 8192) -> dict[tuple[int, int], np.ndarray]:
    """{(feature, sample_id): [steps, tokens]} for the requested pairs, in one pass over those images
    (e.g. a feature's activation on the negatives of its test set)."""
    ts = torch.tensor(data.timesteps, dtype=torch.float32)
    out: dict[tuple[int, int], np.ndarray] = {}
    if not want:
        return out
    bar = progress(total=len(want), desc=f"{features.name}: maps of test images", unit="img")
    for b_sids, acts in data.iter_acts(features.site, sorted(want), rows_per_batch):
        codes = encode(features, acts, ts).numpy()
        for i, s in enumerate(b_sids.tolist()):
            for f in want[s]:
                out[(int(f), s)] = np.ascontiguousarray(codes[i, :, :, int(f)])
        bar.update(len(b_sids))
    bar.close()
    return out
