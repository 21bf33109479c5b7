"""Which text tokens carry the object (or the colour), and at which site (docs/intervene.md, "The
object edit" and "Colour steering: the sweep").

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/object_tokens.py --cases 40
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/object_tokens.py --cases 40 --factor color

The concept study's cases (`make_cases`, seed 0): each prompt is generated once with its object
(`--factor`) changed to the case's target (recording the sites), then again with the target
prompt's activations copied into some of the prompt's text tokens, in the conditional rows only
(the unconditional prompt is empty), at every step: all tokens, the word's token, every token but
the word, the word and every token after it, the tokens before it, the word and the next token,
the word and every later token but the background's words (its colour and kind). Prints, per site
and token set, how often the factor then reads as the target (of the cases whose clean image
reads the prompted value) and how often the other factors are kept, as the study's `score` counts them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from difflens.hooks import HookSet
from difflens.intervene.study_concepts import _Readings, make_cases, score, with_value
from difflens.intervene.study_items import study_classifier
from difflens.intervene.truth import concept_ids, truth_of
from difflens.models import load_adapter

TOKEN_SETS = ("all", "word", "not word", "word and after", "before word", "word and next",
              "word and after, not background")


def token_mask(kind: str, words: list[int], length: int, background: list[list[int]] | None = None) -> torch.Tensor:
    """[cases, length] the token set `kind` around each case's word (`background`: each case's
    background-word tokens, for the set that leaves them out)."""
    m = torch.zeros(len(words), length, dtype=torch.bool)
    for i, w in enumerate(words):
        if kind == "all":
            m[i] = True
        elif kind == "word":
            m[i, w] = True
        elif kind == "not word":
            m[i] = True
            m[i, w] = False
        elif kind == "word and after":
            m[i, w:] = True
        elif kind == "word and next":
            m[i, w : w + 2] = True
        elif kind == "word and after, not background":
            m[i, w:] = True
            m[i, [t for t in (background or [[]] * len(words))[i] if t < length]] = False
        else:
            m[i, :w] = True
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--sites", default="context_embedder:txt,transformer_blocks.0:txt")
    p.add_argument("--model", default="toy")
    p.add_argument("--factor", default="object", choices=("object", "color"), help="the factor moved to the case's target")
    args = p.parse_args()
    adapter = load_adapter(args.model)
    truth = truth_of(adapter)
    tok = adapter.model.tokenizer
    cases = make_cases(args.cases, 0, truth=truth)
    read = _Readings(study_classifier(None, truth), cases, truth)
    prompts, seeds = [c.prompt for c in cases], [c.seed for c in cases]
    cid = concept_ids(truth)
    f = args.factor
    labels = [truth.text_labels(c.prompt, tok) for c in cases]
    words = [int(np.flatnonzero((lab >> cid[f"{f}={getattr(c, f)}"]) & 1)[0]) for c, lab in zip(cases, labels)]
    bg = [i for c, i in cid.items() if c.startswith(("bgcolor=", "bg="))]
    background = [np.flatnonzero(np.bitwise_or.reduce([(lab >> i) & 1 for i in bg])).tolist() for lab in labels]
    sites = args.sites.split(",")
    t0 = time.time()
    clean = read(adapter.generate(prompts, seeds).images)
    rec: dict = {s: {} for s in sites}
    hooks = HookSet()
    for s in sites:
        hooks.add(s, lambda x, ctx, s=s: rec[s].__setitem__((ctx.step, ctx.call_index), x.detach().clone()))
    target = adapter.generate([with_value(c, f, getattr(c, "to_" + f), truth=truth) for c in cases], seeds, hooks=hooks)
    rows = [("(none: the prompt itself names the target)", "-", score(cases, clean, read(target.images), f))]
    n_images = 2 * len(cases)
    for s in sites:
        for kind in TOKEN_SETS:
            mask = None

            def patch(x, ctx, s=s, kind=kind):
                nonlocal mask
                if mask is None:
                    mask = token_mask(kind, words, x.shape[1], background)
                m = mask[ctx.sample_index][:, :, None] & ctx.is_cond[:, None, None]
                return torch.where(m, rec[s][(ctx.step, ctx.call_index)], x)

            e = score(cases, clean, read(adapter.generate(prompts, seeds, hooks=HookSet().add(s, patch)).images), f)
            rows.append((s, kind, e))
            n_images += len(cases)
    print(f"| site | text tokens patched (conditional rows) | {f} reads the target (of n) | kept |")
    print("|---|---|---|---|")
    for s, kind, e in rows:
        print(f"| {s if s.startswith('(') else f'`{s}`'} | {kind} | {100 * e['success_rate']:.0f}% ({e['successes']}/{e['eligible']}) | {100 * e['kept_rate']:.0f}% |")
    print(f"\n{n_images} images in {time.time() - t0:.0f} s ({n_images / (time.time() - t0):.2f} images/s)")


if __name__ == "__main__":
    main()
