"""Optimizer state without pickle: tensors to safetensors, everything else to JSON.

`torch.save` would pickle; a state_dict is tensors (per-parameter moments, step counts) plus
plain hyperparameters, so the split is lossless.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from difflens.errors import DifflensError
from difflens.utils import atomic_write_bytes, write_json


def _file(stem: Path, suffix: str) -> Path:
    """`stem` + suffix (names may contain dots, so no with_suffix)."""
    return stem.parent / (stem.name + suffix)


def save_optimizer(opt: torch.optim.Optimizer, stem: str | Path) -> None:
    """Write `<stem>.safetensors` (state tensors) and `<stem>.json` (groups, non-tensor state)."""
    stem = Path(stem)
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    atomic_write_bytes(_file(stem, ".safetensors"), st_save(tensors))
    write_json(_file(stem, ".json"), {"param_groups": groups, "scalars": scalars, "tensor_keys": sorted(tensors)})


def load_optimizer(opt: torch.optim.Optimizer, stem: str | Path) -> None:
    """Inverse of `save_optimizer`; refuses a state written for different parameters."""
    stem = Path(stem)
    try:
        meta = json.loads(_file(stem, ".json").read_text(encoding="utf-8"))
        tensors = st_load(_file(stem, ".safetensors").read_bytes())
    except (OSError, ValueError) as e:
        raise DifflensError(f"optimizer state {stem}.* is unreadable ({e}); delete train_state/ and start over") from e
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    current = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in current] != [len(g["params"]) for g in groups]:
        if sum(len(g["params"]) for g in current) != sum(len(g["params"]) for g in groups):
            raise DifflensError(f"optimizer state {stem}.* was written for different parameters; the run config changed")
        # same parameters, split into groups differently (a TIDE run saved before its timestep MLP
        # got its own group): state is indexed by parameter, so keep it and take today's groups
        groups = [{**groups[0], "params": g["params"]} for g in current]
    for g, cur in zip(groups, current):  # the lr multipliers are today's (older states lack them)
        if "lr_scale" in cur:
            g["lr_scale"] = cur["lr_scale"]
    opt.load_state_dict({"state": state, "param_groups": groups})
