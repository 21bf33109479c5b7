"""The `Dictionary` interface every architecture implements, its output type, and the registry.

Callers (trainer, evaluation, feature cache, steering) only use this interface, always in RAW
activation space: normalisation happens inside. ``t`` is the scheduler timestep value (float,
e.g. 0..1000) of each row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from difflens.dictionaries.config import CONFIGS, DictConfig, register_config
from difflens.dictionaries.normalize import Normalizer
from difflens.errors import DifflensError

ARCHITECTURES: dict[str, type[Dictionary]] = {}


def register(name: str, config_cls: type[DictConfig]):
    """Class decorator: the one place an architecture is declared. Binds the name to the module
    class and to its config class (so `DictConfig(arch=name)`, `build` and `load` find both)."""

    def deco(cls):
        if name in ARCHITECTURES and ARCHITECTURES[name] is not cls:
            raise TypeError(f"architecture {name!r} is already registered to {ARCHITECTURES[name].__name__}")
        if not getattr(cls, "family", ""):
            raise TypeError(
                f"{cls.__name__} declares no report family: give it a class attribute family = 'sae' (or the "
                f"family reports should group {name!r} under) or subclass one that has it"
            )
        cls.arch = name
        cls.config_class = config_cls
        ARCHITECTURES[name] = cls
        register_config(name, config_cls)
        return cls

    return deco


def family(arch: str) -> str:
    """The family of a registered architecture (its class's `family`, else the name itself)."""
    cls = ARCHITECTURES.get(arch)
    return (cls.family or arch) if cls is not None else arch


def architecture(name: str) -> type[Dictionary]:
    """The module class registered under `name`, or a clear error listing the known ones."""
    cls = ARCHITECTURES.get(name)
    if cls is None or name not in CONFIGS:
        raise DifflensError(f"architecture {name!r} is unknown; this difflens knows {', '.join(sorted(ARCHITECTURES))}")
    return cls


@dataclass
class DictOutput:
    """What `forward` returns. Sparse dictionaries keep codes as (values, indices) and only
    build the dense [B, F] matrix if `.codes` is read (it is large: 4096 x 65536 fp32 = 1 GB)."""

    x_hat: Tensor  # [B, D] raw activation space
    loss: Tensor  # scalar: sum of `losses` (0 for dictionaries without gradients)
    losses: dict[str, Tensor]  # components, in the normalised space the dictionary trains in
    num_latents: int
    values: Tensor | None = None  # [B, K] code values (TopK-style); zeros pad short rows
    indices: Tensor | None = None  # [B, K] latent ids
    dense_codes: Tensor | None = None  # [B, F] when the architecture computes them anyway
    l0: Tensor | None = None  # mean number of non-zero latents per row (detached)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def codes(self) -> Tensor:
        """Dense codes [B, F] (zeros where inactive); built on first access from the sparse form."""
        if self.dense_codes is None:
            if self.values is None or self.indices is None:
                raise DifflensError("this output carries no codes")
            b = self.values.shape[0]
            z = torch.zeros(b, self.num_latents, dtype=self.values.dtype, device=self.values.device)
            self.dense_codes = z.scatter_add_(1, self.indices, self.values)
        return self.dense_codes


def as_timesteps(t, n: int, device) -> Tensor | None:
    """Accept None, a float, or a tensor of n timesteps; return a float32 [n] tensor or None."""
    if t is None:
        return None
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(n)
    t = t.reshape(-1)
    if t.shape[0] != n:
        raise DifflensError(f"got {t.shape[0]} timesteps for {n} activation rows; pass one timestep per row")
    return t.float()


class Dictionary(nn.Module):
    """Base class: normalisation plumbing, input checks, dead-latent bookkeeping, lr scaling."""

    arch: ClassVar[str] = ""
    # The family reports group architectures by ("sae", "tide", "itda"): set on each class that
    # starts a family, inherited by its variants (JumpReLU and Matryoshka are SAEs, TIDE is not).
    family: ClassVar[str] = ""
    config_class: ClassVar[type[DictConfig]] = DictConfig
    trainable: ClassVar[bool] = True
    # The constructor takes `fast=` (False selects a dense reference path, for tests and checks).
    has_fast_path: ClassVar[bool] = False

    def __init__(self, cfg: DictConfig):
        super().__init__()
        if ARCHITECTURES.get(cfg.arch) is not type(self) or not isinstance(cfg, self.config_class):
            raise DifflensError(
                f"config {type(cfg).__name__}(arch={cfg.arch!r}) does not match class {type(self).__name__}; "
                "build the config with DictConfig(arch=...)"
            )
        self.cfg = cfg
        self.norm = Normalizer(
            cfg.normalization,
            cfg.d_in,
            timestep_buckets=cfg.timestep_buckets,
            pca_min_var_ratio=cfg.pca_min_var_ratio,
        )

    # ---- the interface ----------------------------------------------------------------------------
    def encode(self, x_BD: Tensor, t_B=None) -> Tensor:
        """Dense codes [B, F], zeros where inactive."""
        raise NotImplementedError

    def decode(self, codes_BF: Tensor, t_B=None) -> Tensor:
        """Raw-space reconstruction [B, D] from dense codes."""
        raise NotImplementedError

    def forward(self, x_BD: Tensor, t_B=None) -> DictOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def decoder_directions(self) -> Tensor:
        """[F, D] unit directions in raw activation space (what adding latent f moves x along)."""
        raise NotImplementedError

    def encode_sparse(self, x_BD: Tensor, t_B=None) -> tuple[Tensor, Tensor]:
        """(values [B, K], indices [B, K]); default: the non-zeros of `encode`, padded with zeros."""
        codes = self.encode(x_BD, t_B)
        kmax = max(int((codes != 0).sum(1).max()) if codes.numel() else 0, 1)
        vals, idx = codes.abs().topk(kmax, dim=1)
        return codes.gather(1, idx), idx

    # ---- training hooks (no-ops for non-gradient dictionaries) -------------------------------------
    def init_from_data(self, x_BD: Tensor, t_B=None) -> None:
        self.norm.fit(self._check_x(x_BD), as_timesteps(t_B, x_BD.shape[0], x_BD.device))

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self) -> None:
        pass

    def dead_mask(self) -> Tensor:
        return torch.zeros(self.num_latents, dtype=torch.bool)

    def dead_fraction(self) -> float:
        m = self.dead_mask()
        return float(m.float().mean()) if m.numel() else 0.0

    def lr_scale(self) -> float:
        """Suggested lr multiplier for the dictionary matrices: lr ∝ 1/sqrt(width / 2^14) (Gao et al.'s
        fit; 1.0 at 16,384 latents, 0.5 at 65,536 — see docs/training.md for the Flux paper's 2e-4)."""
        return 1.0 / math.sqrt(max(self.num_latents, 1) / 2**14)

    def param_groups(self) -> list[dict]:
        """Optimizer groups, each with an ``lr_scale`` multiplier used when the trainer scales lrs.
        Default: every parameter at `lr_scale()`; parts whose size does not grow with the width
        (TIDE's timestep MLP) override this to keep the base lr."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr_scale": self.lr_scale()}] if params else []

    # ---- helpers ------------------------------------------------------------------------------------
    @property
    def num_latents(self) -> int:
        return int(self.cfg.width)

    @property
    def d_in(self) -> int:
        return int(self.cfg.d_in)

    @property
    def param_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        for b in self.buffers():
            if b.is_floating_point():
                return b.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def _check_x(self, x_BD: Tensor) -> Tensor:
        if not isinstance(x_BD, Tensor) or x_BD.ndim != 2:
            shape = tuple(x_BD.shape) if isinstance(x_BD, Tensor) else type(x_BD).__name__
            raise DifflensError(f"expected activations of shape [batch, {self.d_in}], got {shape}")
        if x_BD.shape[1] != self.d_in:
            raise DifflensError(
                f"activations have width {x_BD.shape[1]} but this {self.arch} dictionary has d_in={self.d_in} "
                f"(site {self.cfg.site or '?'}); use a dictionary trained on this site"
            )
        dt = self.param_dtype
        return x_BD if x_BD.dtype == dt else x_BD.to(dt)

    def _inputs(self, x_BD: Tensor, t_B) -> tuple[Tensor, Tensor | None]:
        x = self._check_x(x_BD)
        return x, as_timesteps(t_B, x.shape[0], x.device)

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Load checkpoint tensors (architectures with data-dependent shapes override this)."""
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise DifflensError(
                f"checkpoint tensors do not match a {self.arch} dictionary: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; the weights file belongs to a different architecture or is damaged"
            )
        for name, v in tensors.items():
            if name in own and own[name].shape != v.shape and not name.startswith("norm."):
                raise DifflensError(
                    f"checkpoint tensor {name} has shape {tuple(v.shape)}, expected {tuple(own[name].shape)} "
                    "from cfg.json; cfg.json and weights.safetensors disagree"
                )
        self.load_state_dict(tensors, strict=True)
