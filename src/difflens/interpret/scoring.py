"""The autointerp protocol, shared by the VLM and the oracle: tasks, score arithmetic, chance, localisation.

Per feature (Shabalin et al. 2025): the explainer sees its top `n_explain` images (explain
split); the judge sees one image at a time with the explanation and returns s in [0, 1]. The
test set is `n_pos` positives (the feature's top images of the held-out split) and `n_neg`
negatives (the best held-out image of `n_neg` other features that is not already in the test
set and, where possible, does not qualify for the evaluated feature),
each shown with the evaluated feature's own activation on it (by default; see `build_tasks`).

    raw = mean( mean_{positives} s , mean_{negatives} (1 - s) )

The raw score's chance level is not 0.5 for sparse features: a judge that reads the heatmap
gives s = 0 to a map with no active token, and a sparse feature is silent on most negatives,
so it earns 1 - s = 1 there whatever its explanation. The chance level is therefore measured
per feature by a permutation baseline: the same judge, the same explanation, each shown map
laid over the *other* test images (their pixels and labels). If the explanation says nothing
about where the feature fires, pairing a map with its own image is no better than with another,
so E[raw] = chance. The reported score is the chance-corrected (kappa-style) score

    score = 0.5 + 0.5 * (raw - chance) / (1 - chance)

which is 0.5 in expectation for an unrelated explanation (sparse or dense features alike), 1 for
a perfect one, and can go below 0 when the explanation is worse than chance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from difflens.interpret.cache import Example, FeatureCache
from difflens.groundtruth import ConceptVocabulary


@dataclass
class Explanation:
    text: str
    ok: bool = True
    concept: str | None = None  # the oracle's concept ("color=red"), or the one(s) a text names
    level: str | None = None  # "token" | "image" (oracle)
    error: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class TestItem:
    example: Example  # the image and the map shown to the judge
    positive: bool
    from_feature: int  # whose top image it is (the feature itself for positives)


@dataclass
class Task:
    feature: int
    explain: list[Example]
    test: list[TestItem]


def feature_score(s_pos, s_neg) -> float | None:
    """mean(mean s on positives, mean (1 - s) on negatives); failed judgements (None) are left out."""
    p = [float(s) for s in s_pos if s is not None]
    n = [float(s) for s in s_neg if s is not None]
    if not p or not n:
        return None
    return 0.5 * (float(np.mean(p)) + float(np.mean([1.0 - s for s in n])))


def calibrated_score(raw: float | None, chance: float | None, *, max_chance: float = 0.95) -> float | None:
    """0.5 + 0.5 (raw - chance) / (1 - chance): chance maps to 0.5, a perfect raw score to 1.

    None when either is missing or chance >= max_chance (the test set cannot tell this
    explanation from a shuffled one: every pairing already scores almost 1).
    """
    if raw is None or chance is None or chance >= max_chance:
        return None
    return 0.5 + 0.5 * (float(raw) - float(chance)) / (1.0 - float(chance))


def control_items(task: Task, per_item: int | str = "all", seed: int = 0) -> list[TestItem]:
    """The permutation baseline's items: each test item's shown map laid over other test images.

    per_item="all": every (map, image) pair of the test set, own image included (the exact mean
    over all permutations; cheap for the oracle). An int k: k other images per map, drawn with
    `seed` (one extra judgement per item and k for a VLM). The item keeps the *map's* polarity.
    """
    test = task.test
    n = len(test)
    if per_item == "all":
        pairs = [(i, j) for i in range(n) for j in range(n)]
    else:
        k = int(per_item)
        if k < 1:
            raise ValueError("per_item must be 'all' or a positive number of controls per test item")
        rng = np.random.default_rng([seed, task.feature, 7])
        pairs = []
        for i in range(n):
            others = [j for j in range(n) if j != i]
            pairs += [(i, int(j)) for j in rng.choice(others, size=min(k, len(others)), replace=False)]
    out = []
    for i, j in pairs:
        m, img = test[i].example, test[j].example
        shown = Example(m.feature, img.sample_id, m.value, m.step, img.split, m.maps_ST, m.threshold)
        out.append(TestItem(shown, test[i].positive, test[j].from_feature))
    return out


def build_tasks(cache: FeatureCache, features, *, n_explain: int = 5, n_pos: int = 5, n_neg: int = 5,
                seed: int = 0, pool=None, feature_fn=None, source=None, negative_overlay: str = "feature",
                rows_per_batch: int = 8192) -> tuple[list[Task], dict[int, str]]:
    """Tasks for `features`; a feature without enough qualifying images is skipped with the reason.

    Negatives are the best held-out images of other features drawn from `pool` (default: every
    feature with token maps), preferring images on which the evaluated feature does not qualify
    (in a small world the top image of another feature often shows this feature's concept too;
    such an image is no negative). Only a feature that qualifies nearly everywhere gets
    negatives it fires on. negative_overlay="feature" (default) shows on them the *evaluated*
    feature's own activation, computed with `feature_fn` over `source` in one extra pass, so a
    feature whose activation says nothing about the image scores 0.5 whatever it is called;
    "other" shows the other feature's map instead (no extra pass).
    """
    if negative_overlay not in ("feature", "other"):
        raise ValueError("negative_overlay must be 'feature' or 'other'")
    if negative_overlay == "feature" and (feature_fn is None or source is None):
        raise ValueError("negative_overlay='feature' needs feature_fn and source to compute the maps")
    pool = cache.map_features if pool is None else pool
    pool = [int(g) for g in pool if cache.has_maps(int(g)) and int(cache["top_sample"][int(g), 1, 0]) >= 0]
    plans, skipped = [], {}
    for f in (int(x) for x in features):
        if not cache.has_maps(f):
            skipped[f] = "no token maps in the cache"
            continue
        col = cache["sample_qualifies"][:, f]

        def qualifies(sid: int, col=col) -> bool:
            return bool(col[int(np.searchsorted(cache.sample_ids, sid))])

        explain = cache.top_examples(f, 0)[:n_explain]
        pos = cache.top_examples(f, 1)[:n_pos]
        if len(explain) < n_explain or len(pos) < n_pos:
            skipped[f] = f"only {len(explain)} explain / {len(pos)} held-out qualifying images (need {n_explain} / {n_pos})"
            continue
        used = {e.sample_id for e in pos}
        rng = np.random.default_rng([seed, f])
        negs: list[Example] = []
        spare: list[list[Example]] = []
        order = [g for g in rng.permutation(pool).tolist() if g != f]
        for g in order:
            # the other feature's best held-out image not in the test set on which f does not qualify
            cands = [x for x in cache.top_examples(g, 1) if x.sample_id not in used]
            e = next((x for x in cands if not qualifies(x.sample_id)), None)
            if e is None:
                spare.append(cands)
                continue
            used.add(e.sample_id)
            negs.append(e)
            if len(negs) == n_neg:
                break
        for cands in spare:  # f fires almost everywhere: take such images rather than none
            if len(negs) == n_neg:
                break
            e = next((x for x in cands if x.sample_id not in used), None)
            if e is not None:
                used.add(e.sample_id)
                negs.append(e)
        if len(negs) < n_neg:
            skipped[f] = f"only {len(negs)} negatives available from other features (need {n_neg})"
            continue
        plans.append((f, explain, pos, negs))
    if negative_overlay == "feature" and plans:
        from difflens.interpret.cache_passes import feature_maps

        want: dict[int, set[int]] = {}
        for f, _, _, negs in plans:
            for e in negs:
                want.setdefault(e.sample_id, set()).add(f)
        maps = feature_maps(feature_fn, source, want, rows_per_batch=rows_per_batch)
        thr = cache["threshold"]
        for i, (f, explain, pos, negs) in enumerate(plans):
            own = []
            for e in negs:
                m = maps[(f, e.sample_id)]
                step = int(m.max(1).argmax()) if m.max() > 0 else pos[0].step
                own.append(Example(f, e.sample_id, float(m[step].max()), step, e.split, m, float(thr[f])))
            plans[i] = (f, explain, pos, list(zip(own, negs)))
    else:
        plans = [(f, ex, pos, [(e, e) for e in negs]) for f, ex, pos, negs in plans]
    tasks = [Task(f, explain, [TestItem(e, True, f) for e in pos] + [TestItem(shown, False, other.feature) for shown, other in negs])
             for f, explain, pos, negs in plans]
    return tasks, skipped


def active_tokens(map_T: np.ndarray, threshold: float) -> np.ndarray:
    """The thresholded heatmap (tokens above the feature's threshold)."""
    return np.asarray(map_T, np.float32).reshape(-1) > threshold


class Truth:
    """Ground-truth concept masks per sample, from the source's token labels read with the
    vocabulary of the source's world (`SampleSource.vocabulary()`)."""

    def __init__(self, source, vocabulary: ConceptVocabulary | None = None):
        self.source = source
        self.vocab: ConceptVocabulary = vocabulary if vocabulary is not None else source.vocabulary()
        self._cache: dict[int, np.ndarray] = {}

    def tokens(self, sid: int) -> np.ndarray | None:
        """bool [T, C] or None when the sample has no labels."""
        sid = int(sid)
        if sid not in self._cache:
            lab = self.source.record(sid).get("token_labels")
            self._cache[sid] = None if lab is None else self.vocab.matrix(np.asarray(lab, np.int64))
        return self._cache[sid]

    def image(self, sid: int) -> np.ndarray | None:
        t = self.tokens(sid)
        return None if t is None else t.any(0)


def concept_mask_of(expl: Explanation, cm_TC: np.ndarray, vocab: ConceptVocabulary) -> np.ndarray | None:
    """bool [T]: the tokens of the concept an explanation names (by concept, or parsed from its text)."""
    if expl.concept in vocab.index:
        return cm_TC[:, vocab.index[expl.concept]]
    named = vocab.in_text(expl.text or "")
    return vocab.mask_for(cm_TC, named) if named else None


def localisation(expl: Explanation, examples: list[Example], truth: Truth | None) -> float | None:
    """Mean IoU between each positive's thresholded heatmap and the explained concept's token mask."""
    if truth is None or not expl.ok:
        return None
    ious = []
    for e in examples:
        cm = truth.tokens(e.sample_id)
        if cm is None:
            continue
        c = concept_mask_of(expl, cm, truth.vocab)
        if c is None:
            return None
        a = active_tokens(e.map, e.threshold)
        union = (a | c).sum()
        ious.append(float((a & c).sum() / union) if union else 0.0)
    return float(np.mean(ious)) if ious else None


def score_features(cache: FeatureCache, tasks: list[Task], explainer, judge, *, truth: Truth | None = None,
                   chance: int | str | None = "all", seed: int = 0) -> list[dict]:
    """Explain every task's feature, judge its test set (and the permutation controls that measure
    its chance level, see the module docstring), and return one result dict per feature.

    chance: "all" pairs (oracle), k controls per test item (VLM), or None (no baseline: the raw
    score is reported, as before the correction; only for comparisons).
    """
    explanations = explainer.explain_many(cache, tasks)
    judged = judge.judge_many(cache, tasks, explanations)
    controls = {t.feature: control_items(t, chance, seed) for t in tasks} if chance is not None else {}
    judged_c = judge.judge_many(cache, [Task(t.feature, t.explain, controls[t.feature]) for t in tasks],
                                explanations) if controls else {}
    out = []
    for t in tasks:
        ex = explanations[t.feature]
        s = judged.get(t.feature) or [None] * len(t.test)
        s_pos = [v for v, it in zip(s, t.test) if it.positive]
        s_neg = [v for v, it in zip(s, t.test) if not it.positive]
        raw = feature_score(s_pos, s_neg) if ex.ok else None
        ch = None
        if controls and ex.ok:
            c_items, c_s = controls[t.feature], judged_c.get(t.feature) or []
            ch = feature_score([v for v, it in zip(c_s, c_items) if it.positive],
                               [v for v, it in zip(c_s, c_items) if not it.positive])
        score = calibrated_score(raw, ch) if controls else raw
        out.append({
            "feature": t.feature,
            "explanation": ex.text,
            "explanation_ok": ex.ok,
            "explanation_error": ex.error,
            "concept": ex.concept,
            "level": ex.level,
            "explanation_meta": ex.meta,
            "explain_samples": [e.sample_id for e in t.explain],
            "test": [{"sample_id": it.example.sample_id, "positive": it.positive, "from_feature": it.from_feature,
                      "shown_feature": it.example.feature, "step": it.example.step, "s": v} for it, v in zip(t.test, s)],
            "s_pos": s_pos,
            "s_neg": s_neg,
            "judge_failures": int(sum(v is None for v in s)) if ex.ok else len(t.test),
            "raw_score": raw,
            "chance": ch,
            "chance_controls": (None if not controls else
                                {"per_item": chance, "n": len(controls[t.feature]),
                                 "failures": int(sum(v is None for v in (judged_c.get(t.feature) or [])))}),
            "score": score,
            "localisation": localisation(ex, [it.example for it in t.test if it.positive], truth),
        })
    return out


__all__ = ["Explanation", "Task", "TestItem", "Truth", "build_tasks", "calibrated_score", "control_items", "feature_score",
           "localisation", "score_features", "active_tokens"]
