"""`DictConfig`: every hyperparameter of every dictionary, in one typed, JSON-friendly dataclass.

One flat config (rather than one class per architecture) keeps the checkpoint format and the
trainer's option handling uniform; fields an architecture does not use are simply ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from difflens.errors import DifflensError

SCHEMA_VERSION = 1
ARCHS = ("topk", "batchtopk", "relu", "tide", "itda")
NORMALIZATIONS = ("none", "scalar", "per-timestep", "pca-whiten")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
ITDA_INFERENCE = ("gp", "mp")
ITDA_DEFAULT_CAP = 50_000


@dataclass
class DictConfig:
    """What a dictionary is; saved verbatim in cfg.json (unknown keys from newer versions are kept)."""

    arch: str = "topk"
    d_in: int = 0
    width: int = 0  # latents; for ITDA the cap on atoms (0 -> 50,000); `num_latents` is the current count
    k: int | None = 32  # active latents per token (TopK, BatchTopK mean, TIDE; ITDA's L0)
    site: str = ""
    model: str | None = None
    normalization: str = "scalar"
    schema_version: int = SCHEMA_VERSION
    # --- SAE training ---
    b_dec_init: str = "geometric_median"
    l1_coeff: float = 5.0  # ReLU SAE: weight of sum_f |z_f| * ||W_dec_f||
    normalize_decoder: bool | None = None  # None -> True except for ReLU (whose L1 uses decoder norms)
    auxk: bool = True  # AuxK dead-latent loss (TopK, BatchTopK, TIDE)
    k_aux: int | None = None  # None -> d_in // 2
    auxk_coef: float = 1 / 32
    dead_after_tokens: int = 10_000_000  # a latent silent for this many tokens counts as dead
    batchtopk_threshold_momentum: float = 0.01  # EMA of the batch's smallest selected activation
    init_seed: int = 0
    # --- normalisation ---
    timestep_buckets: int = 32  # per-timestep: at most this many buckets
    pca_min_var_ratio: float = 1e-4  # pca-whiten: floor on a component's variance, relative to the mean
    # --- TIDE ---
    tide_embed_dim: int = 64
    tide_hidden: int = 256
    tide_max_scale: float = 0.9  # |scale(t)| < this, so 1 + scale(t) >= 0.1 and the FiLM stays invertible
    # --- ITDA ---
    itda_tau: float = 0.3
    itda_prune_cosine: float | None = None  # skip/prune atoms whose cosine to an existing one exceeds this
    itda_inference: str = "gp"
    # keys written by a newer difflens that this version does not know; kept for a faithful re-save
    unknown: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived values ---------------------------------------------------------------------
    @property
    def k_aux_eff(self) -> int:
        return int(self.k_aux) if self.k_aux is not None else max(1, self.d_in // 2)

    @property
    def itda_cap(self) -> int:
        return self.width if self.width > 0 else ITDA_DEFAULT_CAP

    @property
    def decoder_unit_norm(self) -> bool:
        if self.normalize_decoder is not None:
            return bool(self.normalize_decoder)
        return self.arch != "relu"

    def validate(self) -> None:
        def bad(msg: str) -> DifflensError:
            return DifflensError(f"dictionary config: {msg}")

        if self.arch not in ARCHS:
            raise bad(f"arch {self.arch!r} is unknown; use one of {', '.join(ARCHS)}")
        if self.normalization not in NORMALIZATIONS:
            raise bad(f"normalization {self.normalization!r} is unknown; use one of {', '.join(NORMALIZATIONS)}")
        if not isinstance(self.d_in, int) or self.d_in <= 0:
            raise bad(f"d_in must be a positive integer (got {self.d_in!r}); it is the activation width at the site")
        if not isinstance(self.width, int) or self.width < 0 or (self.width == 0 and self.arch != "itda"):
            raise bad(f"width must be a positive integer (got {self.width!r})")
        if self.arch in ("topk", "batchtopk", "tide", "itda"):
            if self.k is None or int(self.k) <= 0:
                raise bad(f"arch {self.arch} needs a positive k (got {self.k!r})")
            if self.arch != "itda" and self.k > self.width:
                raise bad(f"k={self.k} exceeds width={self.width}; choose k <= width")
        if self.b_dec_init not in B_DEC_INITS:
            raise bad(f"b_dec_init {self.b_dec_init!r} is unknown; use one of {', '.join(B_DEC_INITS)}")
        if self.itda_inference not in ITDA_INFERENCE:
            raise bad(f"itda_inference {self.itda_inference!r} is unknown; use 'gp' (gradient pursuit) or 'mp'")
        if self.k_aux is not None and self.k_aux <= 0:
            raise bad(f"k_aux must be positive (got {self.k_aux})")
        if self.dead_after_tokens <= 0:
            raise bad(f"dead_after_tokens must be positive (got {self.dead_after_tokens})")
        if not 0 < self.tide_max_scale < 1:
            raise bad(f"tide_max_scale must be in (0, 1) so the FiLM stays invertible (got {self.tide_max_scale})")
        if self.itda_prune_cosine is not None and not 0 < self.itda_prune_cosine <= 1:
            raise bad(f"itda_prune_cosine must be in (0, 1] or null (got {self.itda_prune_cosine})")
        if self.timestep_buckets <= 0:
            raise bad(f"timestep_buckets must be positive (got {self.timestep_buckets})")

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unknown"}
        d.update(self.unknown)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DictConfig:
        """Build from a dict; keys this version does not know are kept aside, not rejected."""
        if not isinstance(d, dict):
            raise DifflensError(f"dictionary config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"unknown"}
        kwargs = {k: v for k, v in d.items() if k in known}
        unknown = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kwargs, unknown=unknown)
        except TypeError as e:  # pragma: no cover - only on malformed values
            raise DifflensError(f"dictionary config is malformed: {e}") from e

    def replace(self, **changes: Any) -> DictConfig:
        return dataclasses.replace(self, **changes)
