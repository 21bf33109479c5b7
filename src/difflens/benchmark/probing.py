"""Sparse probing (as in SAEBench, on token-level concept labels): can a linear probe on the best
k latents of a source read a concept?

Per concept: latents are ranked on the training rows by the difference of their mean activation
on concept tokens and on the rest; a logistic regression on the top k (standardised, class
weights balanced) is fitted on the training rows and scored on held-out rows (other prompts):
F1 at probability 0.5 and ROC AUC. The same probe on MLP neurons and on the raw activations (all d
dimensions) are the references.
"""

from __future__ import annotations

import warnings

import numpy as np


def rank_latents(codes_NF: np.ndarray, y_N: np.ndarray) -> np.ndarray:
    """Latents by decreasing mean(z | y) - mean(z | not y)."""
    y = np.asarray(y_N, bool)
    diff = codes_NF[y].mean(0) - codes_NF[~y].mean(0)
    return np.argsort(-diff, kind="stable")


def probe(x_train, y_train, x_test, y_test) -> dict:
    """Logistic regression fitted on train, F1 and AUC on test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, roc_auc_score
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=300, class_weight="balanced")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(sc.transform(x_train), y_train)
        p = clf.predict_proba(sc.transform(x_test))[:, 1]
    return {"f1": float(f1_score(y_test, p >= 0.5, zero_division=0)), "auc": float(roc_auc_score(y_test, p))}


def sparse_probe(codes_train, codes_test, y_train, y_test, ks=(1, 4, 16)) -> dict:
    """{k: {"f1", "auc", "latents"}} for one concept."""
    order = rank_latents(codes_train, y_train)
    out = {}
    for k in ks:
        sel = np.sort(order[: min(k, codes_train.shape[1])])
        r = probe(codes_train[:, sel], y_train, codes_test[:, sel], y_test)
        out[k] = {**r, "latents": [int(i) for i in sel]}
    return out
