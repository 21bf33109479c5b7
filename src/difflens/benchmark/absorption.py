"""Feature absorption for parent/child concepts of a ground-truth world (after SAEBench's metric).

A parent concept (a digit, a shape, an object of any colour) contains children (seven, triangle,
red). A dictionary *absorbs* the parent into a child when the latent that stands for the parent
stops firing on the child's tokens while a child-specific latent fires there instead, so the
parent feature is silently incomplete. Per child c of parent P:

    parent latent p  = the latent with the best token MCC with P
    child latent  q  = the best token MCC with c among the other latents
    absorption(c)    = share of c's tokens where p is silent and q fires
    parent recall(c) = share of c's tokens where p fires

A parent's absorption is the mean over its children that occur (>= `min_tokens` tokens). The
parents are the world's fine concept types (`ConceptVocabulary.fine_types`; the toy world's:
digit, shape, color), each the union of its concepts.
"""

from __future__ import annotations

import numpy as np

from difflens.interpret.oracle import mcc


def hierarchy(vocab) -> dict[str, list[str]]:
    """Parent -> its children, from a `groundtruth.ConceptVocabulary`: each fine concept type is
    the parent of the concepts of that type (toy world: digit > seven, shape > triangle, color > red)."""
    out = {t: [c for c in vocab.names if vocab.type_of(c) == t] for t in vocab.fine_types}
    return {t: cs for t, cs in out.items() if len(cs) > 1}


def parent_mask(concepts_NC: np.ndarray, children: list[str], index: dict[str, int]) -> np.ndarray:
    return concepts_NC[:, [index[c] for c in children]].any(1)


def token_mcc(active_NF: np.ndarray, y_N: np.ndarray) -> np.ndarray:
    """MCC of every latent's activity with one boolean label, [F]."""
    a = active_NF.astype(np.float64)
    y = np.asarray(y_N, np.float64)
    return mcc(y @ a, a.sum(0), y.sum(), len(y))


def absorption(active_NF: np.ndarray, concepts_NC: np.ndarray, vocab, *, min_tokens: int = 20) -> dict:
    """Per parent of `vocab`'s hierarchy (columns of `concepts_NC` are `vocab.names`): its latent,
    its MCC, the children's absorption and recall, and the mean absorption."""
    out = {}
    for parent, children in hierarchy(vocab).items():
        yp = parent_mask(concepts_NC, children, vocab.index)
        if yp.sum() < min_tokens:
            out[parent] = {"skipped": f"{int(yp.sum())} parent tokens (< {min_tokens})"}
            continue
        m = token_mcc(active_NF, yp)
        p = int(np.argmax(m))
        rows = {}
        for c in children:
            yc = concepts_NC[:, vocab.index[c]]
            if yc.sum() < min_tokens:
                continue
            mc = token_mcc(active_NF, yc)
            mc[p] = -np.inf
            q = int(np.argmax(mc))
            on_c = active_NF[yc]
            rows[c] = {"tokens": int(yc.sum()), "child_latent": q, "child_mcc": round(float(mc[q]), 4),
                       "absorption": round(float((~on_c[:, p] & on_c[:, q]).mean()), 4),
                       "parent_recall": round(float(on_c[:, p].mean()), 4)}
        ab = [r["absorption"] for r in rows.values()]
        out[parent] = {"parent_latent": p, "parent_mcc": round(float(m[p]), 4), "children": rows,
                       "mean_absorption": round(float(np.mean(ab)), 4) if ab else None,
                       "max_absorption": round(float(np.max(ab)), 4) if ab else None}
    return out
