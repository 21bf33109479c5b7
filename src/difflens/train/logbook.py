"""Per-dictionary training records: `metrics.jsonl` (source of truth), `metrics.csv`, and with `--log`
TensorBoard or Weights & Biases (optional packages; a clear error when the chosen one is missing).

The JSONL is appended line by line (flushed) so a crash loses at most the line being written;
the CSV is re-rendered atomically from it. On resume, records after the checkpoint step are
dropped so the redone steps are not logged twice.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from difflens.errors import DifflensError
from difflens.train.config import LOGS as LOG_BACKENDS
from difflens.utils import atomic_write_text

FIRST_COLUMNS = ["kind", "step", "tokens", "lr", "loss", "fvu", "explained_variance", "mse", "cosine", "l0", "dead_fraction"]


def _clean(v):
    """JSON has no NaN/inf; write them as null (at any depth, numpy/torch scalars too) so every line is strict JSON."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:  # numpy / torch scalars
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return v


def _line(record: dict) -> str:
    return json.dumps(_clean(record), allow_nan=False) + "\n"


class MetricsLog:
    def __init__(self, folder: str | Path, *, backend: str = "jsonl", run_name: str | None = None,
                 run_config: dict | None = None) -> None:
        """backend: "jsonl" (always written), "tensorboard" or "wandb" (written as well, when installed)."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.folder / "metrics.jsonl"
        self.csv = self.folder / "metrics.csv"
        self._tb = None
        self._wandb = None
        if backend == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise DifflensError("--log tensorboard needs the tensorboard package: pip install 'difflens[tensorboard]' "
                                    "(or pip install tensorboard), or log with --log jsonl") from None
            self._tb = SummaryWriter(log_dir=str(self.folder / "tensorboard"))
        elif backend == "wandb":
            try:
                import wandb
            except ImportError:
                raise DifflensError("--log wandb needs the wandb package: pip install 'difflens[wandb]' "
                                    "(or pip install wandb), or log with --log jsonl") from None
            # one run per dictionary; WANDB_PROJECT / WANDB_MODE (e.g. offline) are read by wandb itself
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "difflens"), name=run_name,
                                     dir=str(self.folder), config=_clean(run_config or {}), reinit="create_new")
        elif backend != "jsonl":
            raise DifflensError(f"--log {backend!r} is unknown; use one of {', '.join(LOG_BACKENDS)}")

    def records(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        out = []
        for line in self.jsonl.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        return out

    def truncate_after(self, step: int) -> None:
        """Keep only records up to `step` (the checkpoint a resumed run restarts from)."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        atomic_write_text(self.jsonl, "".join(_line(r) for r in kept))
        self.render_csv(kept)

    def append(self, record: dict) -> None:
        record = _clean(record)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(_line(record))
            f.flush()
        prefix = record.get("kind", "train")
        scalars = {f"{prefix}/{k}": v for k, v in record.items()
                   if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, record.get("step", 0))
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=int(record.get("step", 0)))

    def render_csv(self, records: list[dict] | None = None) -> None:
        records = self.records() if records is None else records
        keys = {k for r in records for k in r if not isinstance(r[k], (list, dict))}
        columns = [c for c in FIRST_COLUMNS if c in keys] + sorted(keys - set(FIRST_COLUMNS))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
        atomic_write_text(self.csv, buf.getvalue())

    def close(self) -> None:
        self.render_csv()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def heldout_summary(rows: list[tuple[str, str, int, dict | None]], *, heldout_samples: int, eval_tokens: int) -> str:
    """The table `difflens train` ends with: each dictionary's final held-out record, and what was held out.

    rows: (name, arch, width, the last `final` record of its metrics.jsonl or None).
    """
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = []
    if heldout_samples == 0:
        lines.append("no held-out evaluation (--eval-tokens 0): the numbers below are missing")
    else:
        n = next((r.get("eval_tokens") for *_a, r in rows if r and r.get("eval_tokens")), None)
        lines.append(f"held out: {num(n, ',')} tokens from {heldout_samples} image(s), the first in store order until "
                     f"--eval-tokens {eval_tokens:,} is reached (at most half the images), never trained on, so "
                     "FVU below is on unseen images; training-batch FVU (the progress bar) is lower")
    head = ["dictionary", "arch", "width", "held-out FVU", "expl. var", "cosine", "L0", "dead"]
    body = [[name, arch, str(width), num(r and r.get("fvu"), ".4f"), num(r and r.get("explained_variance"), ".4f"),
             num(r and r.get("cosine"), ".4f"), num(r and r.get("l0"), ".1f"),
             num(r and r.get("dead_fraction"), ".1%")] for name, arch, width, r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    for row in [head, ["-" * w for w in widths], *body]:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
