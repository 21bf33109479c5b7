"""Dictionary configs: one typed, JSON-friendly dataclass per architecture, found through the registry.

`DictConfig` holds what every dictionary has (arch, sizes, site, normalisation); each architecture
adds its own fields in a subclass and registers it together with its module class
(``@register("topk", TopKConfig)`` in base.py), so the registry is the only list of architectures.
``DictConfig(arch="topk", ...)`` and ``DictConfig.from_dict(d)`` return the architecture's class.

Checkpoints written when the config was one flat class (every architecture's fields in every
cfg.json) still load: `from_dict` drops fields that belong to another registered architecture and
keeps only keys no architecture knows (written by a newer difflens) aside, for a faithful re-save.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from difflens.errors import DifflensError

SCHEMA_VERSION = 1
NORMALIZATIONS = ("none", "scalar", "per-timestep", "pca-whiten")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
ITDA_INFERENCE = ("gp", "mp")
ITDA_DEFAULT_CAP = 50_000

# arch name -> config class; filled by `register_config` (called by base.register with the module class)
CONFIGS: dict[str, type[DictConfig]] = {}


def register_config(name: str, config_cls: type[DictConfig]) -> None:
    if not (isinstance(config_cls, type) and issubclass(config_cls, DictConfig)):
        raise TypeError(f"architecture {name!r}: config class must subclass DictConfig, got {config_cls!r}")
    CONFIGS[name] = config_cls


def config_class(arch: str) -> type[DictConfig]:
    """The config class registered for `arch`, or a clear error listing the known architectures."""
    cls = CONFIGS.get(arch)
    if cls is None:
        raise DifflensError(f"dictionary config: arch {arch!r} is unknown; use one of {', '.join(sorted(CONFIGS))}")
    return cls


def bad(msg: str) -> DifflensError:
    return DifflensError(f"dictionary config: {msg}")


@dataclass
class DictConfig:
    """Fields every architecture has; saved verbatim in cfg.json (unknown keys from newer versions are kept)."""

    # class-level facts the trainer and validation use (not saved)
    needs_k: ClassVar[bool] = True  # k is required (TopK-style, ITDA's L0)
    width_optional: ClassVar[bool] = False  # width 0 allowed (ITDA: the default atom cap)

    arch: str = "topk"
    d_in: int = 0
    width: int = 0  # latents; for ITDA the cap on atoms (0 -> 50,000); `num_latents` is the current count
    k: int | None = 32  # active latents per token (TopK, BatchTopK mean, TIDE; ITDA's L0)
    site: str = ""
    model: str | None = None
    normalization: str = "scalar"
    schema_version: int = SCHEMA_VERSION
    init_seed: int = 0
    timestep_buckets: int = 32  # per-timestep: at most this many buckets
    pca_min_var_ratio: float = 1e-4  # pca-whiten: floor on a component's variance, relative to the mean
    # keys written by a newer difflens that this version does not know; kept for a faithful re-save
    unknown: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __new__(cls, *args, **kwargs):
        """`DictConfig(arch=...)` builds the registered class of that architecture."""
        if cls is DictConfig:
            arch = kwargs.get("arch", args[0] if args else "topk")
            cls = config_class(arch)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if type(self) is DictConfig:  # pragma: no cover - __new__ always picks a subclass
            raise bad("use an architecture's config class")
        if CONFIGS.get(self.arch) is not type(self):
            raise bad(f"arch {self.arch!r} does not match {type(self).__name__}; build configs with DictConfig(arch=...)")
        self.validate()

    @classmethod
    def field_names(cls) -> set[str]:
        """The fields a user may set for this architecture."""
        return {f.name for f in dataclasses.fields(cls)} - {"unknown"}

    def validate(self) -> None:
        """Checks shared by every architecture; subclasses add theirs and call this first."""
        if self.normalization not in NORMALIZATIONS:
            raise bad(f"normalization {self.normalization!r} is unknown; use one of {', '.join(NORMALIZATIONS)}")
        if not isinstance(self.d_in, int) or self.d_in <= 0:
            raise bad(f"d_in must be a positive integer (got {self.d_in!r}); it is the activation width at the site")
        if not isinstance(self.width, int) or self.width < 0 or (self.width == 0 and not self.width_optional):
            raise bad(f"width must be a positive integer (got {self.width!r})")
        if self.needs_k:
            if self.k is None or int(self.k) <= 0:
                raise bad(f"arch {self.arch} needs a positive k (got {self.k!r})")
            if not self.width_optional and self.k > self.width:
                raise bad(f"k={self.k} exceeds width={self.width}; choose k <= width")
        if self.timestep_buckets <= 0:
            raise bad(f"timestep_buckets must be positive (got {self.timestep_buckets})")

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unknown"}
        d.update(self.unknown)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DictConfig:
        """Build the registered config of ``d["arch"]``; keys of other architectures are dropped,
        keys no architecture knows are kept aside, not rejected."""
        if not isinstance(d, dict):
            raise DifflensError(f"dictionary config must be a JSON object, got {type(d).__name__}")
        target = config_class(d.get("arch", "topk"))
        known = target.field_names()
        elsewhere = set().union(*(c.field_names() for c in CONFIGS.values()))
        kwargs = {k: v for k, v in d.items() if k in known}
        unknown = {k: v for k, v in d.items() if k not in known and k not in elsewhere}
        try:
            return target(**kwargs, unknown=unknown)
        except TypeError as e:  # pragma: no cover - only on malformed values
            raise DifflensError(f"dictionary config is malformed: {e}") from e

    def replace(self, **changes: Any) -> DictConfig:
        if "arch" in changes and changes["arch"] != self.arch:
            return DictConfig.from_dict({**self.to_dict(), **changes})
        return dataclasses.replace(self, **changes)


@dataclass
class SAEConfig(DictConfig):
    """Gradient-trained SAEs: init, decoder norm, dead-latent tracking and AuxK."""

    b_dec_init: str = "geometric_median"
    normalize_decoder: bool | None = None  # None -> the architecture's default (unit rows except ReLU)
    auxk: bool = True  # AuxK dead-latent loss (architectures with a TopK-style selection)
    k_aux: int | None = None  # None -> d_in // 2
    auxk_coef: float = 1 / 32
    dead_after_tokens: int = 10_000_000  # a latent with no non-zero code for this many tokens is dead

    unit_decoder_default: ClassVar[bool] = True

    @property
    def k_aux_eff(self) -> int:
        return int(self.k_aux) if self.k_aux is not None else max(1, self.d_in // 2)

    @property
    def decoder_unit_norm(self) -> bool:
        if self.normalize_decoder is not None:
            return bool(self.normalize_decoder)
        return self.unit_decoder_default

    def validate(self) -> None:
        super().validate()
        if self.b_dec_init not in B_DEC_INITS:
            raise bad(f"b_dec_init {self.b_dec_init!r} is unknown; use one of {', '.join(B_DEC_INITS)}")
        if self.k_aux is not None and self.k_aux <= 0:
            raise bad(f"k_aux must be positive (got {self.k_aux})")
        if self.dead_after_tokens <= 0:
            raise bad(f"dead_after_tokens must be positive (got {self.dead_after_tokens})")


@dataclass
class TopKConfig(SAEConfig):
    """TopK SAE: exactly k latents per token."""


@dataclass
class BatchTopKConfig(SAEConfig):
    """BatchTopK SAE: k·B latents per batch; a fixed threshold at inference."""

    batchtopk_threshold_momentum: float = 0.01  # EMA of the batch's smallest selected activation

    def validate(self) -> None:
        super().validate()
        if not 0 < self.batchtopk_threshold_momentum <= 1:
            raise bad(f"batchtopk_threshold_momentum must be in (0, 1] (got {self.batchtopk_threshold_momentum})")


@dataclass
class ReLUConfig(SAEConfig):
    """ReLU SAE with a decoder-norm-weighted L1 penalty (k unused)."""

    needs_k: ClassVar[bool] = False
    unit_decoder_default: ClassVar[bool] = False  # the norm-weighted L1 needs free decoder norms

    l1_coeff: float = 5.0  # weight of sum_f |z_f| * ||W_dec_f|| (divided by d_in)


@dataclass
class TIDEConfig(TopKConfig):
    """TIDE: a TopK SAE on a timestep-modulated input (FiLM from a sinusoidal embedding)."""

    tide_embed_dim: int = 64
    tide_hidden: int = 256
    tide_max_scale: float = 0.9  # |scale(t)| < this, so 1 + scale(t) >= 0.1 and the FiLM stays invertible

    def validate(self) -> None:
        super().validate()
        if not 0 < self.tide_max_scale < 1:
            raise bad(f"tide_max_scale must be in (0, 1) so the FiLM stays invertible (got {self.tide_max_scale})")


@dataclass
class ITDAConfig(DictConfig):
    """ITDA: atoms are real activations; k is the pursuit's L0, width the atom cap (0 = 50,000)."""

    width_optional: ClassVar[bool] = True

    itda_tau: float = 0.3
    itda_prune_cosine: float | None = None  # skip/prune atoms whose cosine to an existing one exceeds this
    itda_inference: str = "gp"

    @property
    def itda_cap(self) -> int:
        return self.width if self.width > 0 else ITDA_DEFAULT_CAP

    def validate(self) -> None:
        super().validate()
        if self.itda_inference not in ITDA_INFERENCE:
            raise bad(f"itda_inference {self.itda_inference!r} is unknown; use 'gp' (gradient pursuit) or 'mp'")
        if self.itda_prune_cosine is not None and not 0 < self.itda_prune_cosine <= 1:
            raise bad(f"itda_prune_cosine must be in (0, 1] or null (got {self.itda_prune_cosine})")
