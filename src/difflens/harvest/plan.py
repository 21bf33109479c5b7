"""`harvest --dry-run`: rows and bytes a harvest would write, and the free disk, before anything runs.

The formula (docs/adapters.md uses it for the FLUX recipe): per site, rows = images x recorded
steps x tokens kept per image, images = prompts x seeds (x2 with --both-branches), and bytes =
rows x (d x activation bytes + metadata bytes per row), the metadata being the store's columns
(`difflens.store.format.COLUMNS`). Generated images (PNG, at most h x w x 3 bytes) come on top.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from difflens.errors import DifflensError

ACT_BYTES = {"fp32": 4, "bf16": 2}


def metadata_bytes(with_labels: bool) -> int:
    """Bytes of the per-row metadata columns a shard stores next to the activations."""
    from difflens.store.format import COLUMNS, OPTIONAL_COLUMNS

    return sum(dt.itemsize for name, dt in COLUMNS.items() if name not in OPTIONAL_COLUMNS or (with_labels and name == "labels"))


def tokens_kept(n: int, tokens_per_image: int | None, token_fraction: float | None) -> int:
    if tokens_per_image is not None:
        return min(n, tokens_per_image)
    if token_fraction is not None:
        return max(1, round(n * token_fraction))
    return n


@dataclass
class HarvestPlan:
    model_id: str
    height: int
    width: int
    steps: int
    recorded_steps: int
    images: int
    store_dtype: str
    sites: dict[str, dict] = field(default_factory=dict)  # site -> {d, tokens, rows, bytes}
    rows: int = 0
    activation_bytes: int = 0
    image_bytes_max: int = 0
    free_bytes: int | None = None
    out: str = ""

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.image_bytes_max

    def to_json(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}

    def text(self) -> str:
        lines = [f"harvest plan for {self.model_id}: {self.images:,} images of {self.height}x{self.width}, "
                 f"{self.recorded_steps} of {self.steps} steps recorded, activations stored as {self.store_dtype}"]
        for site, s in self.sites.items():
            lines.append(f"  {site:<40} d={s['d']:<6} {s['tokens']:>5} tokens/image/step  "
                         f"{s['rows']:>14,} rows  {human(s['bytes']):>10}")
        lines.append(f"  total: {self.rows:,} rows, {human(self.activation_bytes)} of shards "
                     f"+ up to {human(self.image_bytes_max)} of images = {human(self.total_bytes)}")
        if self.free_bytes is not None:
            verdict = "fits" if self.total_bytes <= self.free_bytes else "DOES NOT FIT"
            lines.append(f"  free disk at {self.out}: {human(self.free_bytes)} ({verdict})")
        return "\n".join(lines)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_disk(path: str | Path) -> int:
    """Free bytes on the file system that will hold `path` (its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def plan(model, *, sites: list[str], n_prompts: int, seeds: int, steps: int, record_steps: list[int] | None,
         tokens_per_image: int | None, token_fraction: float | None, both_branches: bool, store_dtype: str,
         out: str | None = None) -> HarvestPlan:
    """The plan of a harvest of `model` (a `difflens.models.describe_model` result) with these settings."""
    if store_dtype not in ACT_BYTES:
        raise DifflensError(f"--store-dtype must be fp32 or bf16, got {store_dtype!r}")
    if record_steps is not None and any(not 0 <= s < steps for s in record_steps):
        raise DifflensError(f"--step-window {record_steps} outside 0..{steps - 1} (step indices of a {steps}-step run)")
    n_steps = steps if record_steps is None else len(record_steps)
    images = n_prompts * seeds * (2 if both_branches else 1)
    meta = metadata_bytes(model.has_labels)
    p = HarvestPlan(model.model_id, model.height, model.width, steps, n_steps, n_prompts * seeds, store_dtype, out=out or "")
    for site in sites:
        d = model.sites[site]
        n = model.text_tokens if site.endswith(":txt") else model.image_tokens
        k = tokens_kept(n, tokens_per_image, token_fraction)
        rows = images * n_steps * k
        nbytes = rows * (d * ACT_BYTES[store_dtype] + meta)
        p.sites[site] = {"d": d, "tokens": k, "rows": rows, "bytes": nbytes}
        p.rows += rows
        p.activation_bytes += nbytes
    p.image_bytes_max = n_prompts * seeds * model.height * model.width * 3
    if out:
        p.free_bytes = free_disk(out)
    return p


def plan_harvest(args, *, n_prompts: int, seeds: list[int], record_steps: list[int] | None) -> HarvestPlan:
    """The plan the `harvest` flags describe (reads configs, never weights)."""
    from difflens.hooks import expand_sites
    from difflens.models import describe_model

    model = describe_model(args.model, height=args.height, width=args.width, max_text_length=args.max_text_length)
    patterns = args.sites or model.default_site
    if args.stream:
        patterns = ",".join(p if ":" in p else f"{p}:{args.stream}" for p in patterns.split(","))
    sites = expand_sites(patterns, list(model.sites))
    return plan(model, sites=[str(s) for s in sites], n_prompts=n_prompts, seeds=len(seeds),
                steps=args.steps or model.default_steps, record_steps=record_steps,
                tokens_per_image=args.tokens_per_image, token_fraction=args.token_fraction,
                both_branches=args.both_branches, store_dtype=args.store_dtype, out=args.out)
