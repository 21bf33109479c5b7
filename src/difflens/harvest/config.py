"""What a harvest records: model, sites, prompts, seeds, steps, token subsampling, storage dtype."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from difflens.errors import DifflensError
from difflens.models import DEFAULT_MODEL


@dataclass
class HarvestConfig:
    model: str = DEFAULT_MODEL
    sites: list[str] = field(default_factory=list)  # resolved site strings
    steps: int | None = None  # None = the model's default (`Adapter.default_steps`), filled in by harvest()
    guidance: float | None = None
    seeds: list[int] = field(default_factory=lambda: [0])  # every prompt is generated with every seed
    tokens_per_image: int | None = None  # per sample, step and stream; None = all tokens
    token_fraction: float | None = None
    record_steps: list[int] | None = None  # step indices to record; None = all
    cond_only: bool = True  # record the conditional CFG branch only
    dtype: str = "fp32"  # storage dtype: fp32 | bf16
    model_dtype: str = "fp32"
    batch_size: int = 16
    prompt_source: str = ""  # "world:N:seed" or a file path
    num_prompts: int = 0
    token_seed: int = 0
    height: int | None = None  # image size; None = the model's default
    width: int | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise DifflensError(f"--steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise DifflensError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise DifflensError(f"seeds must be non-negative integers, got {self.seeds}")
        if self.tokens_per_image is not None and self.token_fraction is not None:
            raise DifflensError("give --tokens-per-image or --token-fraction, not both")
        if self.tokens_per_image is not None and self.tokens_per_image < 1:
            raise DifflensError(f"--tokens-per-image must be >= 1, got {self.tokens_per_image}")
        if self.token_fraction is not None and not (0 < self.token_fraction <= 1):
            raise DifflensError(f"--token-fraction must be in (0, 1], got {self.token_fraction}")
        if self.record_steps is not None and self.steps is not None:
            bad = [s for s in self.record_steps if not 0 <= s < self.steps]
            if bad:
                raise DifflensError(f"--step-window {bad} outside 0..{self.steps - 1} (step indices of a {self.steps}-step run)")
        if self.dtype not in ("fp32", "bf16"):
            raise DifflensError(f"--store-dtype must be fp32 or bf16, got {self.dtype!r}")

    def tokens_kept(self, n: int) -> int:
        if self.tokens_per_image is not None:
            return min(n, self.tokens_per_image)
        if self.token_fraction is not None:
            return max(1, round(n * self.token_fraction))
        return n


def parse_steps(text: str | None) -> list[int] | None:
    if text is None or text.strip().lower() == "all":
        return None
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise DifflensError(f"--step-window must be 'all' or comma-separated step indices like 0,3,6; got {text!r}") from None
    return out


def _hub_offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def read_prompts(path: str, column: str | None = None) -> list[str]:
    """Text (one prompt a line), JSONL ({"prompt": ...} per line), or `hf:<dataset>[:split]` with `datasets`."""
    if path.startswith("hf:"):
        try:
            import datasets  # optional
        except ImportError:
            raise DifflensError(f"reading prompts from a Hugging Face dataset ({path}) needs the datasets extra: "
                                "pip install 'difflens[datasets]' (or pass a local .txt/.jsonl prompts file)") from None
        parts = path[3:].split(":")
        if not parts[0]:
            raise DifflensError(f"{path!r}: write hf:ORG/DATASET[:split], e.g. hf:nateraw/parti-prompts:train")
        try:
            ds = datasets.load_dataset(parts[0], split=parts[1] if len(parts) > 1 else "train")
        except (ConnectionError, OSError, FileNotFoundError, ValueError) as e:
            offline = " (HF_HUB_OFFLINE is set: the hub is off)" if _hub_offline() else ""
            raise DifflensError(f"could not load dataset {parts[0]}{offline}: {type(e).__name__}: {e}. Fix: download it "
                                "once online (it is then cached), or pass a local .txt/.jsonl prompts file") from None
        col = column or "prompt"
        if col not in ds.column_names:
            raise DifflensError(f"dataset {parts[0]} has no column {col!r}; pass --prompt-column (columns: {ds.column_names})")
        return [str(x) for x in ds[col]]
    p = Path(path)
    if not p.is_file():
        raise DifflensError(f"prompts file {path} not found; pass a .txt (one prompt per line) or .jsonl file")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise DifflensError(f"prompts file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    if p.suffix == ".jsonl":
        out = []
        key = column or "prompt"
        for i, ln in enumerate(lines):
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError as e:
                raise DifflensError(f"{path}:{i + 1} is not valid JSON ({e.msg}); each line must be an object like {{\"prompt\": \"...\"}}") from None
            if not isinstance(rec, dict) or key not in rec:
                raise DifflensError(f"{path}:{i + 1} has no {key!r} field; pass --prompt-column to pick another")
            out.append(str(rec[key]))
        lines = out
    if not lines:
        raise DifflensError(f"prompts file {path} holds no prompts")
    return lines
