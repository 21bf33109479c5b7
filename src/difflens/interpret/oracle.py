"""The offline oracle for the toy world: an explainer and a judge that read ground-truth labels.

Explainer: names the concept whose labels best match where (token level) or whether (image
level) the feature is active, on the explain split only. Token level: per step, F1 between
"token active" (activation > thr_f) and "token has concept c", best step kept. Image level: F1
between "image qualifies" and "image has concept c". The token reading is preferred unless the
image reading is clearly better (token F1 < `token_preference` x image F1), because it also says
where. With evidence="top" it instead reads only the same top images a VLM explainer would see.

Judge: image level, s = 1 if the held-out image has the concept, else 0. Token level (graded),
s = the share of the shown heatmap's active tokens that carry the concept, i.e. whether the
feature fires *where* the concept is.
"""

from __future__ import annotations

import numpy as np

from difflens.interpret.cache import FeatureCache
from difflens.interpret.concepts import CONCEPT_INDEX, CONCEPT_NAMES, explanation_text
from difflens.interpret.scoring import Explanation, Task, Truth, active_tokens


def _f1(tp, a, p):
    den = a + p
    return np.where(den > 0, 2.0 * tp / np.maximum(den, 1e-12), 0.0)


def concept_f1(cache: FeatureCache, f: int, split: int = 0) -> dict[str, np.ndarray]:
    """Token-level F1 per (step, concept) and image-level F1 per concept of feature f on one split."""
    if not cache.has_concepts:
        raise ValueError("this cache has no concept statistics (samples without toy-world labels)")
    tp = cache["concept_tp"][split, :, f, :]  # [S, C]
    a = cache["concept_active"][split, :, f]  # [S]
    p = cache["concept_count"][split]  # [S, C]
    tok = _f1(tp, a[:, None], p)
    in_split = cache.split == split
    q = cache["sample_qualifies"][in_split, f]
    img = cache["image_concepts"][in_split]  # [n_split, C]
    tp_img = (q[:, None] & img).sum(0).astype(np.float64)
    img_f1 = _f1(tp_img, float(q.sum()), img.sum(0).astype(np.float64))
    return {"token": tok, "image": img_f1}


class OracleExplainer:
    """Names the best-matching ground-truth concept (see the module docstring)."""

    name = "oracle"

    def __init__(self, truth: Truth | None = None, *, evidence: str = "split", token_preference: float = 0.9):
        if evidence not in ("split", "top"):
            raise ValueError("evidence must be 'split' (all explain-split images) or 'top' (the explainer's images)")
        if evidence == "top" and truth is None:
            raise ValueError("evidence='top' needs the ground truth (Truth)")
        self.truth, self.evidence, self.token_preference = truth, evidence, token_preference

    def explain(self, cache: FeatureCache, task: Task) -> Explanation:
        if self.evidence == "split":
            m = concept_f1(cache, task.feature, 0)
            tok_SC, img_C = m["token"], m["image"]
            tok_C = tok_SC.max(0)
            tok_step = tok_SC.argmax(0)
        else:
            tok_C, img_C, tok_step = self._from_top(task)
        ct, ci = int(np.argmax(tok_C)), int(np.argmax(img_C))
        if tok_C[ct] <= 0 and img_C[ci] <= 0:
            return Explanation("", ok=False, error="the feature matches no concept")
        if tok_C[ct] >= self.token_preference * img_C[ci]:
            c, level, f1 = ct, "token", float(tok_C[ct])
        else:
            c, level, f1 = ci, "image", float(img_C[ci])
        concept = CONCEPT_NAMES[c]
        order = np.argsort(-tok_C)[:3]
        meta = {
            "f1": f1,
            "token_f1": float(tok_C[ct]),
            "image_f1": float(img_C[ci]),
            "best_step": int(tok_step[c]) if level == "token" else None,
            "runner_up": [{"concept": CONCEPT_NAMES[i], "token_f1": float(tok_C[i])} for i in order],
            "evidence": self.evidence,
        }
        return Explanation(explanation_text(concept, level), concept=concept, level=level, meta=meta)

    def _from_top(self, task: Task):
        """Token IoU of each shown heatmap with each concept mask, and concept presence, averaged."""
        C = len(CONCEPT_NAMES)
        tok = np.zeros(C)
        img = np.zeros(C)
        n = 0
        for e in task.explain:
            cm = self.truth.tokens(e.sample_id)
            if cm is None:
                continue
            a = active_tokens(e.map, e.threshold)
            inter = (a[:, None] & cm).sum(0)
            union = (a[:, None] | cm).sum(0)
            tok += np.where(union > 0, inter / np.maximum(union, 1), 0.0)
            img += cm.any(0)
            n += 1
        n = max(n, 1)
        return tok / n, img / n, np.zeros(C, int)

    def explain_many(self, cache, tasks):
        return {t.feature: self.explain(cache, t) for t in tasks}


class OracleJudge:
    """Scores a held-out image against a concept explanation from ground truth."""

    name = "oracle"

    def __init__(self, truth: Truth):
        self.truth = truth

    def judge(self, expl: Explanation, example) -> float | None:
        cm = self.truth.tokens(example.sample_id)
        if cm is None or expl.concept not in CONCEPT_INDEX:
            return None
        c = CONCEPT_INDEX[expl.concept]
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
