"""Evaluation: the metric definitions (`metrics`, the one place they live), reconstruction
evaluation of dictionaries on a store (`reconstruction`), reports (`report`); splice evaluation
(`splice`) when installed. See docs/training.md.

    from difflens.evaluate import evaluate, text_table
    result = evaluate(["runs/dicts/topk-w256-k8"], "runs/store")   # what `difflens evaluate` computes
    print(text_table(result))
"""

from __future__ import annotations


def evaluate(dicts, data, **kwargs) -> dict:
    """Reconstruction metrics (FVU, cosine, L0, dead %, per timestep) of dictionaries on a store,
    the same numbers as `difflens evaluate` (a JSON-ready dict; `text_table` prints it).

    dicts: a dictionary folder, a training run folder, an ``hf:`` reference or a loaded dictionary,
    or a list of them, or a {name: folder-or-dictionary} mapping. Folders trained on this store are
    evaluated on their held-out samples only; an in-memory dictionary has no training record, so it
    is evaluated on every row. data: a store folder or a `Store`. Keyword arguments go to
    `difflens.evaluate.reconstruction.evaluate` (max_tokens, split, filters, batch_size, show_progress)."""
    from pathlib import Path

    import torch

    from difflens.errors import DifflensError
    from difflens.dictionaries.io import expand_dict_paths
    from difflens.evaluate.reconstruction import Evaluated, evaluate as _evaluate, load_items
    from difflens.train.trainer import open_store

    store = open_store(data)
    named = dicts.items() if isinstance(dicts, dict) else [(None, d) for d in (dicts if isinstance(dicts, (list, tuple)) else [dicts])]
    items: list[Evaluated] = []
    for name, d in named:
        if isinstance(d, torch.nn.Module):
            items.append(Evaluated(name=name or f"{d.cfg.arch}-{len(items)}", module=d))
        elif isinstance(d, (str, Path)):
            loaded = load_items(expand_dict_paths([str(d)]))
            if name is not None and len(loaded) == 1:
                loaded[0].name = name
            items.extend(loaded)
        else:
            raise DifflensError(f"cannot evaluate {type(d).__name__}: pass a dictionary folder, an hf: reference or a loaded dictionary")
    if not items:
        raise DifflensError("nothing to evaluate: pass at least one dictionary")
    return _evaluate(items, store, **kwargs)


def text_table(result: dict) -> str:
    """The plain-text comparison table `difflens evaluate` prints."""
    from difflens.evaluate.report import text_table as _table

    return _table(result)


__all__ = ["evaluate", "text_table"]
