"""The factor classifier: a small slot-based CNN that reads a toy-world image back into factors.

It is the judge of generated images (prompt adherence, "did the object turn red?"). A
two-object image does not say which object a prompt named first, so the classifier reads
*slots*: for each of the five positions, P(an object is there) and, given one is, its colour,
object and size; plus the background colour and pattern for the whole image.

Weights ship in `difflens/assets/classifier/` (`model.safetensors` + `config.json`); loading
never unpickles. Train new ones with `difflens zoo train classifier`
(`difflens.world.classifier_train.train_classifier`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from safetensors.torch import load_file, save

from difflens.errors import DifflensError
from difflens.utils import atomic_write_bytes, write_json
from difflens.world import vocab as V
from difflens.world.prompts import parse_prompt

SCHEMA_VERSION = 1
ARCHITECTURE = "slot_cnn"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SLOT_FACTORS = ("color", "object", "size")
GLOBAL_FACTORS = V.BACKGROUND_FACTORS  # ("bgcolor", "bg")
PRESENCE_THRESHOLD = 0.5
# A slot counts as occupied in the ground truth only if its object shows at least this many pixels.
MIN_VISIBLE_PIXELS = 4


def default_folder() -> Path:
    """The shipped weights, inside the installed package."""
    return Path(__file__).resolve().parent.parent / "assets" / "classifier"


def _vocab() -> dict[str, list[str]]:
    return {f: list(v) for f, v in V.FACTORS.items()}


def _slot_window_origins(feat_size: int) -> list[tuple[int, int]]:
    """Top-left corner, in the padded feature map, of each position's window (see FactorClassifier)."""
    stride = V.IMAGE_SIZE // feat_size
    half = V.SIZE_PIXELS["large"] // 2
    out = []
    for pos in V.POSITIONS:
        cy, cx = V.POSITION_CENTER[pos]
        # The large object's box starts at centre - half; the window adds one cell of margin, which
        # the one-cell padding absorbs, so the padded origin equals the unpadded box start.
        out.append(((cy - half) // stride, (cx - half) // stride))
    return out


class FactorClassifier(nn.Module):
    """CNN trunk (3 conv stages, 2x2 max-pool between) -> 8x8 map; a shared slot head per position.

    The slot head sees the window of feature cells covering a large object at that position
    plus one cell of margin (±1 px jitter and shifts), with a learned per-slot bias so corner
    and centre windows can differ. Sharing the head across slots gives it 5x the examples.
    """

    def __init__(self, stages: Sequence[Sequence[int]] = ((32,), (64,), (128,)), slot_channels: int = 32,
                 hidden: int = 128):
        super().__init__()
        self.stages = tuple(tuple(int(w) for w in st) for st in stages)
        if len(self.stages) != 3 or not all(self.stages):
            raise DifflensError(f"the classifier needs 3 non-empty conv stages, got {self.stages}")
        self.slot_channels = int(slot_channels)
        self.hidden = int(hidden)

        layers: list[nn.Module] = []
        c_in = 3
        for i, st in enumerate(self.stages):
            if i:
                layers.append(nn.MaxPool2d(2))  # 32 -> 16 -> 8
            for w in st:
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c_in = w
        self.trunk = nn.Sequential(*layers)
        w2 = c_in
        self.feat_size = V.IMAGE_SIZE // 4
        cells = V.SIZE_PIXELS["large"] // (V.IMAGE_SIZE // self.feat_size)
        self.window = cells + 2  # one cell of margin each side
        self.origins = _slot_window_origins(self.feat_size)
        n_slots = len(V.POSITIONS)
        self.slot_reduce = nn.Sequential(nn.Conv2d(w2, self.slot_channels, 1), nn.ReLU(inplace=True))
        self.slot_fc = nn.Linear(self.slot_channels * self.window**2, self.hidden)
        self.slot_bias = nn.Parameter(torch.zeros(n_slots, self.hidden))
        self.n_out = {"presence": 1, **{f: len(V.FACTORS[f]) for f in SLOT_FACTORS}}
        self.slot_out = nn.Linear(self.hidden, sum(self.n_out.values()))
        self.global_out = nn.Linear(2 * w2, sum(len(V.FACTORS[f]) for f in GLOBAL_FACTORS))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float [B, 3, 32, 32] in [0, 1]. Returns logits: presence [B, 5], color/object/size
        [B, 5, K], bgcolor/bg [B, K]."""
        h = self.trunk((x - 0.5) / 0.25)
        s = F.pad(self.slot_reduce(h), (1, 1, 1, 1))
        w = self.window
        win = torch.stack([s[:, :, r : r + w, c : c + w] for r, c in self.origins], dim=1)  # [B, 5, C, w, w]
        z = F.relu(self.slot_fc(win.flatten(2)) + self.slot_bias)
        out = self.slot_out(z)  # [B, 5, n]
        res: dict[str, torch.Tensor] = {}
        i = 0
        for name, n in self.n_out.items():
            res[name] = out[..., i : i + n]
            i += n
        res["presence"] = res["presence"].squeeze(-1)
        g = self.global_out(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))
        i = 0
        for f in GLOBAL_FACTORS:
            n = len(V.FACTORS[f])
            res[f] = g[:, i : i + n]
            i += n
        return res

    # ------------------------------------------------------------------ io
    def config(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "architecture": ARCHITECTURE,
            "stages": [list(st) for st in self.stages],
            "slot_channels": self.slot_channels,
            "hidden": self.hidden,
            "image_size": V.IMAGE_SIZE,
            "positions": list(V.POSITIONS),
            "factors": _vocab(),
        }

    def save(self, folder: str | Path, extra_config: dict | None = None) -> None:
        """Write `model.safetensors` + `config.json` (atomically)."""
        folder = Path(folder)
        state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in self.state_dict().items()}
        atomic_write_bytes(folder / WEIGHTS_FILE, save(state))
        write_json(folder / CONFIG_FILE, {**self.config(), **(extra_config or {})})
        for name in (WEIGHTS_FILE, CONFIG_FILE):  # temp files are 0600; shipped assets should be readable
            os.chmod(folder / name, 0o644)

    @classmethod
    def load(cls, folder: str | Path | None = None, device: str | torch.device = "cpu") -> "FactorClassifier":
        """Load weights (safetensors only) and config; default: the weights shipped with difflens."""
        folder = Path(folder) if folder is not None else default_folder()
        wpath, cpath = folder / WEIGHTS_FILE, folder / CONFIG_FILE
        if not wpath.is_file() or not cpath.is_file():
            raise DifflensError(
                f"no factor-classifier weights in {folder} (expected {WEIGHTS_FILE} and {CONFIG_FILE}); "
                "run `difflens zoo train classifier` to train them"
            )
        try:
            cfg = json.loads(cpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DifflensError(
                f"cannot read {cpath} ({e}); run `difflens zoo train classifier` to write a fresh classifier"
            ) from None
        if cfg.get("architecture") != ARCHITECTURE or cfg.get("schema_version") != SCHEMA_VERSION:
            raise DifflensError(
                f"{cpath} describes a {cfg.get('architecture')!r} v{cfg.get('schema_version')} classifier, this "
                f"difflens reads {ARCHITECTURE!r} v{SCHEMA_VERSION}; run `difflens zoo train classifier` to retrain"
            )
        if cfg.get("factors") != _vocab() or cfg.get("positions") != list(V.POSITIONS):
            raise DifflensError(
                f"the classifier in {folder} was trained on a different toy-world vocabulary; "
                "run `difflens zoo train classifier` to retrain it on the current one"
            )
        model = cls(stages=cfg["stages"], slot_channels=cfg["slot_channels"], hidden=cfg["hidden"])
        try:
            state = load_file(str(wpath))
            model.load_state_dict(state, strict=True)
        except Exception as e:  # corrupt file or shape mismatch
            raise DifflensError(
                f"cannot load classifier weights {wpath} ({str(e).splitlines()[0]}); "
                "run `difflens zoo train classifier` to write fresh ones"
            ) from None
        model.train_config = cfg.get("train", {})
        return model.to(device).eval()

    # ------------------------------------------------------------------ reading images
    @torch.no_grad()
    def predict_probs(self, images, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Probabilities as arrays: presence [B, 5]; color/object/size [B, 5, K]; bgcolor/bg [B, K]."""
        arr = as_image_batch(images)
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        chunks: dict[str, list[np.ndarray]] = {}
        try:
            for i in range(0, len(arr), batch_size):
                x = torch.from_numpy(arr[i : i + batch_size]).to(dev).permute(0, 3, 1, 2).float() / 255.0
                out = self(x)
                probs = {"presence": torch.sigmoid(out["presence"])}
                for f in SLOT_FACTORS + GLOBAL_FACTORS:
                    probs[f] = torch.softmax(out[f], dim=-1)
                for k, v in probs.items():
                    chunks.setdefault(k, []).append(v.cpu().numpy())
        finally:
            self.train(was_training)
        if not chunks:
            return {}
        return {k: np.concatenate(v) for k, v in chunks.items()}

    def classify(self, images, batch_size: int = 256) -> list[dict]:
        """Per image: detected objects (presence > 0.5, most confident first), the main object,
        the background, and all probabilities."""
        p = self.predict_probs(images, batch_size)
        if not p:
            return []
        return [_reading(p, b) for b in range(len(p["presence"]))]

    def read_factor(self, images, factor: str, position: str | None = None) -> list[str]:
        """One factor per image: of the object at `position` (or of the most confident object)."""
        return read_factor(images, factor, position, classifier=self)

    def adherence(self, prompts: Sequence[str], images) -> dict:
        return adherence(prompts, images, classifier=self)


# ---------------------------------------------------------------------- helpers
def as_image_batch(images) -> np.ndarray:
    """uint8 [B, 32, 32, 3] from an array/tensor [B,32,32,3] or [32,32,3], or a list of images."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, (list, tuple)):
        if not images:
            return np.zeros((0, V.IMAGE_SIZE, V.IMAGE_SIZE, 3), np.uint8)
        images = np.stack([as_image_batch(im)[0] for im in images])
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    want = (V.IMAGE_SIZE, V.IMAGE_SIZE, 3)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != want:
        raise DifflensError(
            f"the factor classifier reads toy-world images of shape [B, {V.IMAGE_SIZE}, {V.IMAGE_SIZE}, 3] "
            f"(height, width, RGB); got shape {tuple(arr.shape)}; pass the toy model's 32x32 RGB outputs"
        )
    if arr.dtype != np.uint8:
        raise DifflensError(
            f"the factor classifier reads uint8 images, got dtype {arr.dtype}; convert floats in [0, 1] with "
            "(x.clip(0, 1) * 255).round().astype(numpy.uint8)"
        )
    return np.ascontiguousarray(arr)


def _reading(p: dict[str, np.ndarray], b: int) -> dict:
    """Turn one image's probabilities into the classify() dict."""
    slots = []
    for s, pos in enumerate(V.POSITIONS):
        slot = {"position": pos}
        for f in SLOT_FACTORS:
            slot[f] = V.FACTORS[f][int(p[f][b, s].argmax())]
        slot["p"] = float(p["presence"][b, s])
        slots.append(slot)
    order = sorted(range(len(slots)), key=lambda s: -slots[s]["p"])
    objects = [slots[s] for s in order if slots[s]["p"] > PRESENCE_THRESHOLD]
    probs = {
        "presence": {pos: float(p["presence"][b, s]) for s, pos in enumerate(V.POSITIONS)},
        "slots": {
            pos: {f: {v: float(p[f][b, s, k]) for k, v in enumerate(V.FACTORS[f])} for f in SLOT_FACTORS}
            for s, pos in enumerate(V.POSITIONS)
        },
    }
    for f in GLOBAL_FACTORS:
        probs[f] = {v: float(p[f][b, k]) for k, v in enumerate(V.FACTORS[f])}
    return {
        "objects": objects,
        "main": dict(slots[order[0]]),
        "slots": {sl["position"]: sl for sl in slots},
        "bgcolor": V.BG_COLORS[int(p["bgcolor"][b].argmax())],
        "bg": V.PATTERNS[int(p["bg"][b].argmax())],
        "probs": probs,
    }


_DEFAULT: FactorClassifier | None = None


def default_classifier() -> FactorClassifier:
    """The shipped classifier, loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = FactorClassifier.load()
    return _DEFAULT


def classify(images, *, classifier: FactorClassifier | None = None, batch_size: int = 256) -> list[dict]:
    """Read each image's factors with the shipped (or given) classifier; see FactorClassifier.classify."""
    return (classifier or default_classifier()).classify(images, batch_size)


def read_factor(images, factor: str, position: str | None = None, *, classifier: FactorClassifier | None = None) -> list[str]:
    """The value of one factor per image, e.g. the colour of the object in the top left.

    Object factors (color/object/size) are read at `position` if given (whatever the slot's
    presence), else from the most confident object; `position` returns the most confident
    object's position; bgcolor/bg are whole-image.
    """
    if factor not in V.FACTORS:
        raise DifflensError(f"unknown factor {factor!r}; use one of: {', '.join(V.FACTORS)}")
    if position is not None and position not in V.POSITIONS:
        raise DifflensError(f"unknown position {position!r}; use one of: {', '.join(V.POSITIONS)}")
    if position is not None and factor not in SLOT_FACTORS:
        raise DifflensError(
            f"factor {factor!r} is not read at a position; pass position only with {', '.join(SLOT_FACTORS)}"
        )
    readings = classify(images, classifier=classifier)
    out = []
    for r in readings:
        if factor in GLOBAL_FACTORS:
            out.append(r[factor])
        elif position is not None:
            out.append(r["slots"][position][factor])
        else:
            out.append(r["main"][factor])
    return out


# ---------------------------------------------------------------------- adherence
ADHERENCE_FACTORS = ("color", "object", "size", "position", "bgcolor", "bg")
GROUPS = ("all", "single_object", "two_object")


def _score_prompt(spec, reading: dict) -> dict[str, float]:
    """Per factor the prompt pins down: the fraction of its mentions the image satisfies."""
    hits: dict[str, list[bool]] = {}
    slots = reading["slots"]
    detected = reading["objects"]
    single = len(spec.objects) == 1
    claimed = {o.position for o in spec.objects if o.position}
    # Objects with a position are read at their slot; the slot must be occupied for anything to count.
    for o in spec.objects:
        if not o.position:
            continue
        slot = slots[o.position]
        present = slot["p"] > PRESENCE_THRESHOLD
        if single:
            hits.setdefault("position", []).append(reading["main"]["position"] == o.position and present)
        else:
            hits.setdefault("position", []).append(present)
        for f in SLOT_FACTORS:
            want = getattr(o, f)
            if want is not None:
                hits.setdefault(f, []).append(present and slot[f] == want)
    # Objects without a position match the best-fitting detected object not already claimed.
    free = [d for d in detected if d["position"] not in claimed]
    for o in spec.objects:
        if o.position:
            continue
        wanted = {f: getattr(o, f) for f in SLOT_FACTORS if getattr(o, f) is not None}
        best = None
        if free:
            best = max(free, key=lambda d: (sum(d[f] == v for f, v in wanted.items()), d["p"]))
            free.remove(best)
        for f, v in wanted.items():
            hits.setdefault(f, []).append(best is not None and best[f] == v)
    for f in GLOBAL_FACTORS:
        want = getattr(spec, f)
        if want is not None:
            hits[f] = [reading[f] == want]
    return {f: float(np.mean(h)) for f, h in hits.items()}


def adherence(prompts: Sequence[str], images, *, classifier: FactorClassifier | None = None) -> dict:
    """How well images follow their prompts, per factor, judged by the classifier.

    For every factor a prompt pins down: objects with a position are checked at that slot
    (present, and colour/object/size equal); objects without one match the best-fitting
    detected object; the background against the global heads. For single-object prompts,
    position is right when the most confident slot is the prompt's. A prompt's factor score is
    the fraction of its mentions satisfied; accuracies average over prompts that specify the
    factor, for all prompts, single-object and two-object (>= 2 objects) prompts. `prompt` is
    the fraction of prompts with every specified factor right.
    """
    if isinstance(prompts, str):
        raise DifflensError("adherence takes a list of prompts, one per image; wrap a single prompt in a list")
    prompts = list(prompts)
    specs = [parse_prompt(p) for p in prompts]
    readings = classify(images, classifier=classifier)
    if len(readings) != len(prompts):
        raise DifflensError(
            f"adherence got {len(prompts)} prompts but {len(readings)} images; pass one image per prompt"
        )
    per_prompt = []
    sums = {g: {f: 0.0 for f in ADHERENCE_FACTORS + ("prompt",)} for g in GROUPS}
    counts = {g: {f: 0 for f in ADHERENCE_FACTORS + ("prompt",)} for g in GROUPS}
    for spec, reading in zip(specs, readings):
        scores = _score_prompt(spec, reading)
        if scores:
            scores["prompt"] = float(all(v == 1.0 for v in scores.values()))
        per_prompt.append(scores)
        group = "single_object" if len(spec.objects) == 1 else "two_object"
        for g in ("all", group):
            for f, v in scores.items():
                sums[g][f] += v
                counts[g][f] += 1
    acc = {g: {f: (sums[g][f] / counts[g][f] if counts[g][f] else None) for f in sums[g]} for g in GROUPS}
    return {
        "accuracy": acc["all"],
        "single_object": acc["single_object"],
        "two_object": acc["two_object"],
        "counts": counts,
        "n_prompts": len(prompts),
        "per_prompt": per_prompt,
    }
