"""Per-dictionary training records: `metrics.jsonl` (source of truth), `metrics.csv`, TensorBoard.

The JSONL is appended line by line (flushed) so a crash loses at most the line being written;
the CSV is re-rendered atomically from it. On resume, records after the checkpoint step are
dropped so the redone steps are not logged twice.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

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
    def __init__(self, folder: str | Path, *, tensorboard: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.folder / "metrics.jsonl"
        self.csv = self.folder / "metrics.csv"
        self._tb = None
        if tensorboard:
            try:  # optional: only when the tensorboard package is importable
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.folder / "tensorboard"))
            except Exception:  # noqa: BLE001 - ImportError or a broken tensorboard install
                self._tb = None

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
        if self._tb is not None:
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(f"{prefix}/{k}", v, record.get("step", 0))

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
