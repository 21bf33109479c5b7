"""The object edit on a text stream: shift each token's codes from the source object's context to
the target's.

Why not a few features: a bidirectional text encoder (T5, the toy model's) spreads the object
word into every later token of the prompt, and the image stream reads the object from all of
them (patching only the word's token at `context_embedder:txt` moves 19% of objects; the word and
every later token, 81%; docs/intervene.md). A sparse dictionary carries that spread as shifts of
the features already active at each token, which no few "object" features can clamp. So the edit
adds, at the object word and every token after it, the difference of the dictionary's mean codes
of that token in store prompts naming the target and the source object: per token, the
`n_features` features where the difference is largest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from difflens.errors import DifflensError
from difflens.hooks import Site
from difflens.intervene.truth import concept_ids, store_truth

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary
    from difflens.models.base import Adapter

WORD = -1  # key of the concept's own word (its token id varies with the value)


def _words(truth, prompt: str, tokenizer, factor: str, cid: dict) -> dict[str, int]:
    """{concept: index of its first word token} for the factor's values named in the prompt."""
    lab = truth.text_labels(prompt, tokenizer)
    out = {}
    for c, i in cid.items():
        if c.startswith(factor + "="):
            hit = np.flatnonzero((lab >> i) & 1)
            if hit.size:
                out[c] = int(hit[0])
    return out


def context_code_means(dictionary: Dictionary, store, factor: str, tokenizer, *, truth=None, batch: int = 4096,
                       word_only: bool = False) -> dict:
    """{(token id or WORD, concept): mean code [F]} over the store's text rows at the dictionary's
    site, from prompts naming exactly one value of `factor`, at its word and every later token
    (`word_only`: at the word only, a small share of the rows to encode)."""
    truth = store_truth(store, truth)
    site = dictionary.cfg.site
    if Site.parse(site).stream != "txt":
        raise DifflensError(f"the object shift edits a text stream; {site} is not one: use a dictionary at a ':txt' site")
    if site not in store.sites:
        raise DifflensError(f"store {store.root} has no site {site!r} (the dictionary's): harvest it first")
    cid = {c: i for c, i in concept_ids(truth).items() if c.startswith(factor + "=")}
    meta = store.meta(site, ["sample_id", "token", "timestep"])
    first: dict[int, tuple[str, int, list[int]]] = {}
    for s in store.samples():
        named = _words(truth, s["prompt"], tokenizer, factor, cid)
        if len(named) == 1:
            (c, w), = named.items()
            first[int(s["sample_id"])] = (c, w, tokenizer([s["prompt"]])[0][0].tolist())
    keys, rows = [], []
    for r, (sid, t) in enumerate(zip(meta["sample_id"].tolist(), meta["token"].tolist())):
        if sid in first and (t == first[sid][1] if word_only else t >= first[sid][1]):
            c, w, ids = first[sid]
            keys.append((WORD if t == w else ids[t], c))
            rows.append(r)
    if not rows:
        raise DifflensError(f"store {store.root} has no prompt naming one {factor} at {site}: harvest prompts of the world")
    sums: dict = {}
    dictionary.eval()
    for a in range(0, len(rows), batch):
        idx = np.asarray(rows[a : a + batch])
        x = store.read_rows(site, idx).to(dictionary.device, dictionary.param_dtype)
        t = torch.from_numpy(meta["timestep"][idx]).float().to(dictionary.device)
        with torch.no_grad():
            codes = dictionary.encode(x, t).float().cpu()
        for k, code in zip(keys[a : a + batch], codes):
            s = sums.setdefault(k, [torch.zeros_like(code), 0])
            s[0] += code
            s[1] += 1
    return {k: v[0] / v[1] for k, v in sums.items()}


def shift_delta(means: dict, prompt: str, source: str, target: str, tokenizer, *, truth,
                n_features: int = 8, scale: float = 1.0) -> torch.Tensor | None:
    """[text tokens, F] code shift moving `prompt`'s tokens from concept `source` to `target` (None when
    the prompt does not name `source` or the store lacks either concept)."""
    factor = source.split("=", 1)[0]
    word = _words(truth, prompt, tokenizer, factor, {source: concept_ids(truth)[source]}).get(source)
    if word is None or (WORD, source) not in means or (WORD, target) not in means:
        return None
    ids = tokenizer([prompt])[0][0].tolist()
    width = next(iter(means.values())).shape[0]
    out = torch.zeros(len(ids), width)
    for t in range(word, len(ids)):
        key = WORD if t == word else ids[t]
        if (key, source) in means and (key, target) in means:
            d = means[(key, target)] - means[(key, source)]
            top = torch.topk(d.abs(), min(n_features, width)).indices
            out[t, top] = scale * d[top]
    return out


def shift_ready(adapter: Adapter, dictionary: Dictionary) -> object | None:
    """The tokenizer the shift needs (the model's own), or None: a text-stream dictionary on a
    model whose tokenizer the world's `text_labels` reads."""
    tok = adapter.text_tokenizer()
    return tok if tok is not None and Site.parse(dictionary.cfg.site).stream == "txt" else None


__all__: Sequence[str] = ("context_code_means", "shift_delta", "shift_ready", "WORD")
