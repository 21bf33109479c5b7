"""Dictionaries on the Hugging Face hub: ``hf:ORG/REPO[/SUBFOLDER][@REVISION]``.

Loading goes through `huggingface_hub.snapshot_download`, so files land in (and are reused from)
the usual HF cache, `HF_HUB_OFFLINE=1` works from that cache, and a revision pins a commit, tag
or branch. Only the subfolder's files are fetched. Any folder format `difflens.load` knows works:
difflens, sparsify or SAELens.

`push` uploads a difflens dictionary folder with a model card (README.md) that states the site,
the model, the harvest settings and the held-out metrics recorded at training time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from difflens.errors import DifflensError

PREFIX = "hf:"


def parse(spec: str) -> tuple[str, str | None, str | None]:
    """'hf:ORG/REPO[/SUB...][@REV]' -> (repo_id, subfolder or None, revision or None)."""
    if not spec.startswith(PREFIX):
        raise DifflensError(f"{spec!r} is not a hub reference; write hf:ORG/REPO[/SUBFOLDER][@REVISION]")
    body, _, rev = spec[len(PREFIX):].partition("@")
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2:
        raise DifflensError(f"{spec!r}: expected hf:ORG/REPO[/SUBFOLDER][@REVISION] (ORG and REPO are both needed)")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, rev or None


def resolve(spec: str, *, cache_dir: str | None = None) -> Path:
    """The local folder for a hub reference (downloaded into the HF cache if needed)."""
    repo_id, sub, rev = parse(spec)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with diffusers
        raise DifflensError("loading from the hub needs huggingface_hub: pip install huggingface_hub") from e
    try:
        root = snapshot_download(
            repo_id, revision=rev, cache_dir=cache_dir, allow_patterns=[f"{sub}/*"] if sub else None
        )
    except LocalEntryNotFoundError as e:
        raise DifflensError(
            f"{spec}: not in the local Hugging Face cache and the hub is not reachable (HF_HUB_OFFLINE is set or no "
            "network); download it once online or unset HF_HUB_OFFLINE"
        ) from e
    except Exception as e:  # noqa: BLE001 - repository/revision not found, auth, network
        raise DifflensError(f"{spec}: could not fetch from the hub ({type(e).__name__}: {e})") from e
    folder = Path(root) / sub if sub else Path(root)
    if not (folder / "cfg.json").is_file():
        raise DifflensError(f"{spec}: no cfg.json in {'subfolder ' + sub if sub else 'the repository root'}; "
                            "point at the folder that holds the dictionary")
    return folder


def local_folder(ref) -> Path:
    """A dictionary reference as a local folder: ``hf:...`` is resolved through the HF cache
    (`resolve`), anything else is taken as a path."""
    text = str(ref)
    return resolve(text) if text.startswith(PREFIX) else Path(text)


def display_name(folder) -> str | None:
    """A readable name for a folder inside the HF cache (``.../models--ORG--REPO/snapshots/<sha>[/SUB]``):
    the last part of SUB, else REPO. None for folders outside the cache."""
    parts = Path(folder).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            sub = parts[i + 2:]
            return sub[-1] if sub else parts[i - 1].split("--")[-1]
    return None


def model_card(folder: Path) -> str:
    """README.md for a difflens dictionary folder: what it is, where it reads, how it was trained."""
    from difflens.dictionaries import io

    meta = io.read_meta(folder)
    cfg = meta["config"]
    training = meta.get("training") or {}
    extra = meta.get("extra") or {}
    final = _final_metrics(folder)
    harvest = _harvest_settings(extra.get("store"))
    lines = [
        "---", "library_name: difflens", "tags:", "- sparse-autoencoder", "- diffusion", "- interpretability", "---", "",
        f"# {meta['architecture']} dictionary for `{meta.get('model')}` at `{meta.get('site')}`", "",
        "A difflens dictionary (`difflens.load(\"hf:ORG/REPO\")`). Inputs are raw activations of the site; "
        "the normalisation is inside the checkpoint.", "",
        "| field | value |", "|---|---|",
        f"| architecture | {meta['architecture']} |", f"| model | {meta.get('model')} |", f"| site | {meta.get('site')} |",
        f"| d_in | {meta.get('d_in')} |", f"| latents | {meta.get('num_latents')} |", f"| k | {meta.get('k')} |",
        f"| normalisation | {cfg.get('normalization')} |", f"| difflens version | {meta.get('library_version')} |",
        f"| store fingerprint | {meta.get('store_fingerprint')} |",
    ]
    if training:
        keys = ("steps", "tokens", "batch_size", "lr", "scale_lr", "auxk", "dead_after_tokens", "seed")
        lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {training.get(k)} |" for k in keys if k in training]
        lines += [f"| optimizer steps done | {extra.get('step')} |", f"| tokens seen | {extra.get('tokens')} |"]
    if harvest:
        lines += ["", "## Harvest settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in harvest.items()]
    if final:
        lines += ["", "## Held-out metrics (end of training)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final.items()]
    return "\n".join(lines) + "\n"


def _final_metrics(folder: Path) -> dict:
    log = folder / "metrics.jsonl"
    if not log.is_file():
        return {}
    recs = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    finals = [r for r in recs if r.get("kind") in ("final", "eval")]
    if not finals:
        return {}
    r = finals[-1]
    keys = ("fvu", "explained_variance", "l0", "cosine", "dead_fraction", "dead_window_tokens", "eval_tokens")
    return {k: r[k] for k in keys if r.get(k) is not None}


def _harvest_settings(store: str | None) -> dict:
    if not store or not (Path(store) / "manifest.json").is_file():
        return {}
    try:
        manifest = json.loads((Path(store) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    h = manifest.get("harvest_config") or {}
    keys = ("model", "num_prompts", "steps", "record_steps", "token_fraction", "guidance", "cond_only", "model_dtype", "seeds")
    out = {k: h[k] for k in keys if k in h}
    out.setdefault("model", manifest.get("model"))
    out["store dtype"] = manifest.get("dtype")
    return out


def push(folder, spec: str, *, revision: str | None = None, private: bool = False, token: str | None = None,
         upload=None) -> str:
    """Upload a difflens dictionary folder (+ model card) to hf:ORG/REPO[/SUBFOLDER]; returns the commit URL.

    `upload(staged_folder, repo_id, path_in_repo, revision)` defaults to `HfApi.upload_folder` (after
    creating the repo); tests pass a local stand-in for the hub."""
    from difflens.dictionaries import io

    folder = Path(folder)
    io.read_meta(folder)  # a difflens dictionary, or a clear error
    repo_id, sub, rev = parse(spec)
    revision = revision or rev
    stage = Path(tempfile.mkdtemp(prefix="difflens-push-"))
    try:
        for name in ("cfg.json", "weights.safetensors", "metrics.jsonl", "metrics.csv"):
            if (folder / name).is_file():
                shutil.copy2(folder / name, stage / name)
        (stage / "README.md").write_text(model_card(folder), encoding="utf-8")
        if upload is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)

            def upload(staged, repo, path_in_repo, rev):
                return str(api.upload_folder(folder_path=str(staged), repo_id=repo, path_in_repo=path_in_repo,
                                             revision=rev, commit_message="difflens push"))

        return upload(stage, repo_id, sub or "", revision)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
