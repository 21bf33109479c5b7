"""The training configuration: one `TrainConfig` for the loop, one `DictSpec` per dictionary.

Defaults follow the Flux SAE paper (docs/training.md): 1,024 tokens a step, Adam lr 2e-4 with
β = (0, 0.99), grad-norm clip 10. The lr is multiplied by each dictionary's ``lr_scale()``
(∝ 1/√(width/2¹⁴)) unless ``scale_lr`` is off.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from difflens.errors import DifflensError

DECAYS = ("none", "linear", "cosine")

# Fields that only change how often we look or save; a resumed run may change them freely.
RESUMABLE_FIELDS = ("eval_every", "checkpoint_every", "log_every", "keep_checkpoints", "progress", "log")
LOGS = ("jsonl", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    """How to train; everything that changes the result is here, so resume can compare it."""

    batch_size: int = 1024  # tokens per optimizer step, global across DDP ranks
    steps: int | None = None  # optimizer steps; or give `tokens`
    tokens: int | None = None  # total training tokens (→ steps = ceil(tokens / batch_size))
    lr: float = 2e-4  # base Adam learning rate, times each dictionary's lr_scale() unless scale_lr is off
    scale_lr: bool = True  # multiply lr by each dictionary's lr_scale()
    beta1: float = 0.0  # Adam beta1 (0: no momentum, as in the Flux SAE paper)
    beta2: float = 0.99  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    warmup_steps: int = 100  # linear warm-up from 0
    decay: str = "none"  # "none" | "linear" | "cosine" (to 0 over the last decay_fraction)
    decay_fraction: float = 0.2  # share of the steps the lr decay spans
    grad_clip: float = 10.0  # max global grad norm per dictionary; 0 disables
    auxk: bool = True  # dead-latent auxiliary loss (dictionaries that support it)
    dead_after_tokens: int = 10_000_000  # a latent silent this long counts as dead (not below live latents' silences; docs/training.md)
    seed: int = 0  # data order and initialisation seed
    timestep_range: tuple[float, float] | None = None  # train only on t in [lo, hi]
    denoise_steps: list[int] | None = None  # train only on these denoising step indices
    init_tokens: int = 16384  # rows for data-dependent init (normalisation stats, b_dec); PCA wants > 2·d
    eval_tokens: int = 8192  # held-out tokens (whole samples) per site, never trained on
    eval_every: int = 500  # steps between held-out evaluations (0 = only at the end)
    checkpoint_every: int = 1000  # steps between checkpoints (0 = only at the end)
    log_every: int = 10  # steps between training-loss records
    keep_checkpoints: int = 2  # resumable checkpoints kept under train_state/
    progress: bool = True  # progress bar (the CLI's -q turns it off)
    log: str = "jsonl"  # "jsonl" (metrics.jsonl/csv only) | "tensorboard" | "wandb" (also written, when installed)

    def __post_init__(self) -> None:
        if self.timestep_range is not None:
            self.timestep_range = tuple(float(v) for v in self.timestep_range)
        if self.denoise_steps is not None:
            self.denoise_steps = [int(s) for s in self.denoise_steps]
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> DifflensError:
            return DifflensError(f"training config: {msg}")

        if self.batch_size <= 0:
            raise bad(f"batch_size must be positive (got {self.batch_size})")
        if self.steps is not None and self.tokens is not None:
            raise bad("give either steps or tokens, not both")
        if self.steps is not None and self.steps <= 0:
            raise bad(f"steps must be positive (got {self.steps})")
        if self.tokens is not None and self.tokens <= 0:
            raise bad(f"tokens must be positive (got {self.tokens})")
        if not self.lr > 0:
            raise bad(f"lr must be positive (got {self.lr})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise bad(f"Adam betas must be in [0, 1) (got {self.beta1}, {self.beta2})")
        if self.log not in LOGS:
            raise bad(f"log {self.log!r} is unknown; use one of {', '.join(LOGS)}")
        if self.decay not in DECAYS:
            raise bad(f"decay {self.decay!r} is unknown; use one of {', '.join(DECAYS)}")
        if not 0 < self.decay_fraction <= 1:
            raise bad(f"decay_fraction must be in (0, 1] (got {self.decay_fraction})")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "eval_tokens", "grad_clip"):
            if getattr(self, name) < 0:
                raise bad(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.init_tokens <= 0:
            raise bad(f"init_tokens must be positive (got {self.init_tokens})")
        if self.log_every <= 0 or self.keep_checkpoints <= 0 or self.dead_after_tokens <= 0:
            raise bad("log_every, keep_checkpoints and dead_after_tokens must be positive")
        if self.timestep_range is not None:
            if len(self.timestep_range) != 2 or self.timestep_range[0] > self.timestep_range[1]:
                raise bad(f"timestep_range must be [lo, hi] with lo <= hi (got {self.timestep_range})")

    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return math.ceil(self.tokens / self.batch_size)
        raise DifflensError("training length missing: pass --train-steps N or --tokens T")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["timestep_range"] is not None:
            d["timestep_range"] = list(d["timestep_range"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DifflensError(
                f"training config: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**d)


@dataclass
class DictSpec:
    """One dictionary to train: a name (its folder under --out) plus its DictConfig fields."""

    name: str
    arch: str
    site: str
    width: int  # latents; for ITDA the atom cap (0 = the default cap)
    k: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # other DictConfig fields

    def __post_init__(self) -> None:
        from difflens.dictionaries import config_class  # the registry is the one list of architectures

        try:
            cls = config_class(self.arch)
        except DifflensError as e:
            raise DifflensError(f"dictionary {self.name!r}: {e}") from None
        if not isinstance(self.width, int) or self.width < 0 or (self.width == 0 and not cls.width_optional):
            raise DifflensError(f"dictionary {self.name!r}: width must be a positive integer (got {self.width!r})")
        if self.k is not None:
            if not isinstance(self.k, int) or self.k <= 0:
                raise DifflensError(f"dictionary {self.name!r}: k must be a positive integer (got {self.k!r})")
            if self.k > self.width and not cls.width_optional:
                raise DifflensError(
                    f"dictionary {self.name!r}: k={self.k} is larger than width={self.width}; "
                    "choose k <= width (k is the number of active latents per token)"
                )
        elif cls.needs_k:
            raise DifflensError(f"dictionary {self.name!r}: arch {self.arch} needs k; pass --k K")
        if not _NAME.match(self.name):
            raise DifflensError(
                f"dictionary name {self.name!r} is not a usable folder name; use letters, digits, '.', '_' or '-'"
            )

    def to_dict(self) -> dict:
        return {"name": self.name, "arch": self.arch, "site": self.site, "width": self.width, "k": self.k, **self.options}


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SPEC_KEYS = ("name", "arch", "site", "width", "k")


def _width_optional(arch: str) -> bool:
    from difflens.dictionaries.config import CONFIGS  # importing the package registers every architecture

    cls = CONFIGS.get(arch)
    return bool(cls is not None and cls.width_optional)


def default_name(spec: dict, varying: set[str]) -> str:
    """A readable folder name: site (when several), arch, width, k, then any other field that varies."""
    parts = []
    if "site" in varying:
        parts.append(str(spec["site"]).replace(":", "-"))
    parts.append(str(spec.get("arch")))
    for key in ("width", "k"):
        if spec.get(key):
            parts.append(f"{key[0]}{spec[key]}")
    for key in sorted(varying - {"site", "arch", "width", "k"}):
        if key in spec:
            parts.append(f"{key}{spec[key]}")
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(parts))


def expand_specs(entries: list[dict], defaults: dict | None = None) -> list[DictSpec]:
    """Turn config entries (each possibly with list values = a grid) into named DictSpecs.

    A list value in an entry is a grid axis: ``{"arch": "topk", "k": [16, 32]}`` is two
    dictionaries. Names are derived from what varies unless given.
    """
    defaults = dict(defaults or {})
    flat: list[dict] = []
    for entry in entries:
        merged = {**defaults, **entry}
        axes = [(k, v) for k, v in merged.items() if isinstance(v, list) and k != "timestep_range"]
        combos = [dict(merged)]
        for key, values in axes:
            if not values:
                raise DifflensError(f"dictionary config: {key!r} is an empty list; give at least one value")
            combos = [{**c, key: v} for c in combos for v in values]
        flat.extend(combos)
    # a key is in the generated names when the entries that set it disagree on its value
    varying = {
        k for k in {k for spec in flat for k in spec if k != "name"} if len({repr(s[k]) for s in flat if k in s}) > 1
    }
    specs = []
    for spec in flat:
        if spec.get("arch") is not None and _width_optional(spec["arch"]):
            spec.setdefault("width", 0)
        missing = [k for k in ("arch", "site", "width") if spec.get(k) is None]
        if missing:
            raise DifflensError(
                f"dictionary config {spec}: missing {', '.join(missing)}; give them per entry, under "
                "'defaults', or as --arch/--site/--width"
            )
        name = spec.get("name") or default_name(spec, varying)
        options = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
        specs.append(
            DictSpec(name=name, arch=spec["arch"], site=spec["site"], width=spec["width"], k=spec.get("k"), options=options)
        )
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DifflensError(f"dictionary names must be unique, {', '.join(dupes)} repeats; set 'name' per entry")
    return specs
