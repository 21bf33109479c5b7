"""The images and prompts of generated samples, saved next to an interpretation so the browser can
show them (`interpret --generate` keeps activations in memory; without this its pages would have
no pictures).

    <folder>/samples.json      {"format": "difflens-samples", "description": ..., "samples": [records]}
    <folder>/images/<id>.png   one PNG per sample

`SampleFolder` reads it back with the part of the `Store` interface the browser uses
(`samples()`, `image_path()`, `fingerprint()`, `manifest`); `open_samples` opens either.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from difflens.errors import DifflensError
from difflens.utils import atomic_write_bytes, write_json

FORMAT = "difflens-samples"
MARKER = "samples.json"


def _jsonable(record: dict) -> dict:
    return json.loads(json.dumps(record, default=str))


def save_samples(source, folder, sample_ids=None) -> Path:
    """Write the records and images of `source` (a SampleSource; all its samples by default)."""
    from PIL import Image

    folder = Path(folder)
    sids = [int(s) for s in (source.sample_ids() if sample_ids is None else sample_ids)]
    records = []
    for sid in sids:
        rec = _jsonable({**source.record(sid), "sample_id": sid})
        buf = io.BytesIO()
        Image.fromarray(np.asarray(source.image(sid), np.uint8)).save(buf, format="PNG")
        atomic_write_bytes(folder / "images" / f"{sid}.png", buf.getvalue())
        rec["image"] = f"images/{sid}.png"
        records.append(rec)
    write_json(folder / MARKER, {"format": FORMAT, "description": _jsonable(dict(source.description)), "samples": records})
    return folder


class SampleFolder:
    """A folder written by `save_samples`, read like a store's samples and images."""

    def __init__(self, folder):
        self.root = Path(folder)
        try:
            doc = json.loads((self.root / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DifflensError(f"{self.root}: no {MARKER}; pass a store or the samples folder `interpret --generate` wrote") from None
        if doc.get("format") != FORMAT:
            raise DifflensError(f"{self.root / MARKER} is not a difflens samples file")
        self.description = doc.get("description") or {}
        self._samples = sorted(doc.get("samples") or [], key=lambda r: int(r["sample_id"]))
        self.manifest = {"model": self.description.get("model")}

    def samples(self) -> list[dict]:
        return list(self._samples)

    def image_path(self, sample_id: int) -> Path:
        p = self.root / "images" / f"{int(sample_id)}.png"
        if not p.is_file():
            raise DifflensError(f"no image for sample {sample_id} in {self.root}")
        return p

    def meta(self, site, columns=None):
        raise DifflensError(f"{self.root} holds generated samples, no activation rows")

    def fingerprint(self) -> str:
        return hashlib.sha256((self.root / MARKER).read_bytes()).hexdigest()[:20]


def is_sample_folder(path) -> bool:
    return (Path(path) / MARKER).is_file()


def open_samples(path):
    """A `Store` or a `SampleFolder`, whichever `path` holds."""
    if is_sample_folder(path):
        return SampleFolder(path)
    from difflens.store import Store

    return Store(path)
