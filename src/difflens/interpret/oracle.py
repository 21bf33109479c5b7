"""The offline oracle for a ground-truth world (the toy world): an explainer and a judge that read
token labels through the world's concept vocabulary (`GroundTruth.vocabulary()`).

Explainer: names the concept whose labels best match where (token level) or whether (image
level) the feature is active, on the explain split only (regions only at token level: every
image has object and background pixels). Token level: per step, the Matthews correlation (MCC)
between "token active" (activation > thr_f) and "token has concept c", best step kept. Image
level: MCC between "image qualifies" and "image has concept c". MCC rather than F1/IoU because
those reward a feature that fires everywhere with the most common concept. The token reading
is preferred unless the image reading is clearly better (token MCC < `token_preference` x
image MCC), because it also says where. With evidence="top" it instead reads only the same top images a VLM explainer would see.

Judge: image level, s = 1 if the held-out image has the concept, else 0. Token level (graded),
s = the share of the shown heatmap's active tokens that carry the concept, i.e. whether the
feature fires *where* the concept is.
"""

from __future__ import annotations

import numpy as np

from difflens.groundtruth import ConceptVocabulary
from difflens.interpret.cache import FeatureCache
from difflens.interpret.scoring import Explanation, Task, Truth, active_tokens


def _f1(tp, a, p):
    den = a + p
    return np.where(den > 0, 2.0 * tp / np.maximum(den, 1e-12), 0.0)


def mcc(tp, a, p, n):
    """Matthews correlation between "active" (a positives) and "has concept" (p positives) over n items.

    Chance-corrected, unlike F1 or IoU: a feature active everywhere scores 0 with every concept,
    where F1 would favour whichever concept is most common (size=large is in ~60% of toy images).
    """
    tp, a, p, n = (np.asarray(x, np.float64) for x in (tp, a, p, n))
    fp, fn = a - tp, p - tp
    tn = n - a - p + tp
    den = np.sqrt(np.maximum(a * (n - a) * p * (n - p), 0.0))
    return np.where(den > 0, (tp * tn - fp * fn) / np.maximum(den, 1e-300), 0.0)


def concept_match(cache: FeatureCache, f: int, split: int = 0) -> dict[str, np.ndarray]:
    """How well feature f matches each concept on one split: token level per (step, concept) and
    image level per concept, as MCC (used to choose) and F1 (reported)."""
    if not cache.has_concepts:
        raise ValueError("this cache has no concept statistics (samples without ground-truth token labels)")
    T = cache.grid_hw[0] * cache.grid_hw[1]
    in_split = cache.split == split
    n_tok = float(in_split.sum()) * T
    tp = cache["concept_tp"][split, :, f, :]  # [S, C]
    a = cache["concept_active"][split, :, f][:, None]  # [S, 1]
    p = cache["concept_count"][split]  # [S, C]
    q = cache["sample_qualifies"][in_split, f]
    img = cache["image_concepts"][in_split]  # [n_split, C]
    tp_img = (q[:, None] & img).sum(0).astype(np.float64)
    q_n, img_n = float(q.sum()), img.sum(0).astype(np.float64)
    return {"token": mcc(tp, a, p, n_tok), "image": mcc(tp_img, q_n, img_n, float(in_split.sum())),
            "token_f1": _f1(tp, a, p), "image_f1": _f1(tp_img, q_n, img_n)}


class OracleExplainer:
    """Names the best-matching ground-truth concept (see the module docstring)."""

    name = "oracle"

    def __init__(self, truth: Truth | None = None, *, evidence: str = "split", token_preference: float = 0.9,
                 vocabulary: ConceptVocabulary | None = None):
        if evidence not in ("split", "top"):
            raise ValueError("evidence must be 'split' (all explain-split images) or 'top' (the explainer's images)")
        if evidence == "top" and truth is None:
            raise ValueError("evidence='top' needs the ground truth (Truth)")
        if truth is None and vocabulary is None:
            raise ValueError("the oracle names concepts of a ground-truth world: pass its Truth (or its vocabulary)")
        self.truth, self.evidence, self.token_preference = truth, evidence, token_preference
        self.vocab: ConceptVocabulary = vocabulary if vocabulary is not None else truth.vocab

    def explain(self, cache: FeatureCache, task: Task) -> Explanation:
        if self.evidence == "split":
            m = concept_match(cache, task.feature, 0)
            tok_SC, img_C = m["token"], m["image"]
            tok_C = tok_SC.max(0)
            tok_step = tok_SC.argmax(0)
        else:
            tok_C, img_C, tok_step = self._from_top(cache, task)
        img_C = np.where(self.vocab.image_level, img_C, 0.0)  # e.g. every image has object and background pixels
        ct, ci = int(np.argmax(tok_C)), int(np.argmax(img_C))
        if tok_C[ct] <= 0 and img_C[ci] <= 0:
            return Explanation("", ok=False, error="the feature matches no concept better than chance")
        if tok_C[ct] >= self.token_preference * img_C[ci]:
            c, level, score = ct, "token", float(tok_C[ct])
        else:
            c, level, score = ci, "image", float(img_C[ci])
        names = self.vocab.names
        concept = names[c]
        order = np.argsort(-tok_C)[:3]
        meta = {
            "match": score,  # MCC of the chosen reading (evidence "top": mean per-image MCC / presence lift)
            "token_match": float(tok_C[ct]),
            "image_match": float(img_C[ci]),
            "best_step": int(tok_step[c]) if level == "token" else None,
            "runner_up": [{"concept": names[i], "token_match": float(tok_C[i])} for i in order],
            "evidence": self.evidence,
        }
        if self.evidence == "split":
            meta["f1"] = float(m["token_f1"][tok_step[c], c] if level == "token" else m["image_f1"][c])
        return Explanation(self.vocab.explanation(concept, level), concept=concept, level=level, meta=meta)

    def _from_top(self, cache: FeatureCache, task: Task):
        """From the explainer's images only: per-image token MCC with each concept mask (averaged),
        and concept presence among them minus its base rate in the explain split."""
        C = len(self.vocab.names)
        tok = np.zeros(C)
        img = np.zeros(C)
        n = 0
        for e in task.explain:
            cm = self.truth.tokens(e.sample_id)
            if cm is None:
                continue
            a = active_tokens(e.map, e.threshold)
            tok += mcc((a[:, None] & cm).sum(0), a.sum(), cm.sum(0), len(a))
            img += cm.any(0)
            n += 1
        n = max(n, 1)
        base = cache["image_concepts"][cache.split == 0].mean(0) if cache.has_concepts else 0.0
        return tok / n, img / n - base, np.zeros(C, int)

    def explain_many(self, cache, tasks):
        return {t.feature: self.explain(cache, t) for t in tasks}


class OracleJudge:
    """Scores a held-out image against a concept explanation from ground truth."""

    name = "oracle"

    def __init__(self, truth: Truth):
        self.truth = truth

    def judge(self, expl: Explanation, example) -> float | None:
        cm = self.truth.tokens(example.sample_id)
        index = self.truth.vocab.index
        if cm is None or expl.concept not in index:
            return None
        c = index[expl.concept]
        if expl.level == "image":
            return float(cm[:, c].any())
        a = active_tokens(example.map, example.threshold)
        return float((a & cm[:, c]).sum() / a.sum()) if a.any() else 0.0

    def judge_many(self, cache, tasks, explanations):
        out = {}
        for t in tasks:
            ex = explanations[t.feature]
            out[t.feature] = [self.judge(ex, it.example) if ex.ok else None for it in t.test]
        return out
