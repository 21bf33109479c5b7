"""What a "feature" is for the interpretation pipeline: dictionary latents, MLP neurons, random directions.

Every source turns raw activations [N, D] (+ their timesteps) into feature activations [N, F].
Dictionaries (SAE, TIDE, ITDA) use their own `encode`; the two baselines of Shabalin et al.
(2025) are the MLP hidden units of the same block (a neuron site such as
`transformer_blocks.1.ff.net.0:img`, whose activations *are* the features) and random unit
directions (a pseudo-dictionary with a fixed seed), so all five are scored by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from difflens.dictionaries.base import family
from difflens.errors import DifflensError

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary


@dataclass
class FeatureSource:
    """Base: a named map from activations at `site` to `num_features` feature activations."""

    name: str
    site: str
    num_features: int
    kind: str = "dictionary"
    details: dict = field(default_factory=dict)

    def __call__(self, x_ND: torch.Tensor, t_N: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "site": self.site, "num_features": self.num_features, **self.details}

    def fingerprint(self) -> str:
        """What the features are, independent of their display name: equal fingerprints encode
        every activation the same (a saved top-k cache is checked against it before use)."""
        import hashlib
        import json

        desc = {k: v for k, v in self.describe().items() if k != "name"}
        h = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode())
        for key, t in self._weights():
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{t.dtype}:{t.numel()}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:20]

    def _weights(self) -> list[tuple[str, torch.Tensor]]:
        return []


class DictionaryFeatures(FeatureSource):
    """Latents of a trained dictionary (any architecture implementing `Dictionary.encode`)."""

    def __init__(self, dictionary: Dictionary, name: str | None = None, site: str | None = None):
        cfg = getattr(dictionary, "cfg", None)
        if cfg is None or not hasattr(dictionary, "encode"):
            raise DifflensError(
                f"{type(dictionary).__name__} is not a difflens Dictionary: pass one loaded with difflens.load(path)"
            )
        arch = str(getattr(cfg, "arch", "?"))
        site = site or str(getattr(cfg, "site", "") or "")
        if not site:
            raise DifflensError("the dictionary's cfg names no site: pass site=... (the site it was trained on)")
        super().__init__(
            name=name or arch,
            site=site,
            num_features=int(dictionary.num_latents),
            kind=family(arch),  # from the registry: every SAE variant reports as "sae"
            details={"arch": arch, "k": getattr(cfg, "k", None), "width": int(dictionary.num_latents),
                     "normalization": getattr(cfg, "normalization", None)},
        )
        self.dictionary = dictionary.eval()

    def _weights(self):
        return sorted(self.dictionary.state_dict().items())

    @torch.no_grad()
    def __call__(self, x_ND, t_N=None):
        p = next(iter(self.dictionary.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        x = x_ND.to(dev, torch.float32)
        t = None if t_N is None else t_N.to(dev, torch.float32)
        return self.dictionary.encode(x, t).float().cpu()


class NeuronFeatures(FeatureSource):
    """The MLP baseline: each hidden unit of a neuron site is one feature (post-activation values)."""

    def __init__(self, site: str, width: int, name: str = "neurons"):
        super().__init__(name=name, site=site, num_features=int(width), kind="neurons", details={"width": int(width)})

    def __call__(self, x_ND, t_N=None):
        if x_ND.shape[1] != self.num_features:
            raise DifflensError(
                f"neuron site {self.site} has {self.num_features} units but activations have width {x_ND.shape[1]}"
            )
        return x_ND.float()


class RandomDirections(FeatureSource):
    """The random baseline: projections of (centred) activations on fixed random unit vectors.

    A pseudo-dictionary: `decoder_directions()` and `decode` exist so steering code can use it
    like a real dictionary; the seed makes every run see the same directions.
    """

    def __init__(self, site: str, d_in: int, width: int, *, seed: int = 0, center: torch.Tensor | None = None,
                 name: str = "random"):
        super().__init__(name=name, site=site, num_features=int(width), kind="random",
                         details={"width": int(width), "seed": int(seed), "centered": center is not None})
        g = torch.Generator().manual_seed(int(seed))
        W = torch.randn(int(width), int(d_in), generator=g)
        self.W_FD = W / W.norm(dim=1, keepdim=True)
        self.center_D = torch.zeros(int(d_in)) if center is None else torch.as_tensor(center, dtype=torch.float32).reshape(-1)
        if self.center_D.shape[0] != d_in:
            raise DifflensError(f"center has width {self.center_D.shape[0]}, expected d_in={d_in}")
        self.d_in = int(d_in)

    @property
    def num_latents(self) -> int:
        return self.num_features

    def _weights(self):
        return [("W", self.W_FD), ("center", self.center_D)]

    def encode(self, x_ND, t_N=None):
        if x_ND.shape[1] != self.d_in:
            raise DifflensError(f"activations have width {x_ND.shape[1]}; these random directions live in d={self.d_in}")
        return (x_ND.float() - self.center_D) @ self.W_FD.T

    __call__ = encode

    def decode(self, codes_NF, t_N=None):
        return codes_NF.float() @ self.W_FD + self.center_D

    def decoder_directions(self) -> torch.Tensor:
        return self.W_FD.clone()


def neuron_site_for(site: str, sites: list[str]) -> str | None:
    """The MLP-hidden site of the block a residual site belongs to (`transformer_blocks.1:img` ->
    `transformer_blocks.1.ff.net.0:img`), if the store/model has it."""
    module, _, stream = site.partition(":")
    stream = stream or "img"
    for cand in (f"{module}.ff.net.0:{stream}", f"{module}.act_mlp:{stream}"):
        if cand in sites:
            return cand
    return None


def as_feature_source(obj, name: str | None = None) -> FeatureSource:
    """Accept a FeatureSource, a Dictionary, or a checkpoint folder path."""
    if isinstance(obj, FeatureSource):
        if name:
            obj.name = name
        return obj
    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        import difflens

        obj = difflens.load(obj)
    return DictionaryFeatures(obj, name=name)


def sample_live_features(frequency_F: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """A fixed-seed random subset of the live features (the paper scores a random sample, not the best)."""
    live = np.flatnonzero(np.asarray(frequency_F) > 0)
    if n is None or n >= len(live):
        return live
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(live, size=n, replace=False))
