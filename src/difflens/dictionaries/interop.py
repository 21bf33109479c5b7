"""Dictionaries in the sparsify and SAELens folder formats, both ways.

Both libraries encode RAW activations: `pre = W_enc (x − b_dec) + b_enc`, `x̂ = W_dec z + b_dec`.
A difflens SAE works in a normalised space x_n = A x + c (normalize.py), so export folds the map
into the weights (exact in real arithmetic; the codes are the same numbers):

    W_enc' = W_enc A        b_enc' = b_enc
    W_dec' = W_dec A⁻ᵀ      (row f: A⁻¹ applied to the decoder row = invert(row) − invert(0))
    b_dec' = A⁻¹ (b_dec − c)  (`Normalizer.invert`)

Renaming tensors without this fold is silently wrong (the codes of a scaled input differ).
Refused, with the reason: dictionaries whose map depends on the timestep (TIDE's FiLM,
per-timestep normalisation) — neither format has a timestep input. ITDA exports its atoms as a
decoder with a note: the pursuit that computes its codes is not an encoder, so only the decoder
half is meaningful there.

Formats (DESIGN §5): sparsify = `cfg.json` (d_in, num_latents, k, activation, normalize_decoder, …)
+ `sae.safetensors` (`encoder.weight` [F, D], `encoder.bias`, `W_dec` [F, D], `b_dec`), TopK only.
SAELens = `cfg.json` (architecture, d_in, d_sae, k, dtype, apply_b_dec_to_input, …) +
`sae_weights.safetensors` (`W_enc` [D, F], `b_enc`, `W_dec` [F, D], `b_dec`, `threshold` for
jumprelu). BatchTopK and Matryoshka infer with one threshold θ, i.e. a JumpReLU with θ for every
latent, which is how they export to SAELens.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from difflens.errors import DifflensError

FORMATS = ("sparsify", "saelens")
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
NOTE_NAME = "DIFFLENS_NOTE.txt"


# ---- folding ------------------------------------------------------------------------------------------
@torch.no_grad()
def folded_weights(d) -> dict[str, torch.Tensor]:
    """Raw-space W_enc [F, D], b_enc [F], W_dec [F, D], b_dec [D] of a (non-timestep) SAE, in float64."""
    refuse_timestep_dependent(d)
    nd = copy.deepcopy(d.norm).to("cpu").double()  # the fold in float64; the dictionary is untouched
    eye = torch.eye(d.d_in, dtype=torch.float64)
    zero = torch.zeros(1, d.d_in, dtype=torch.float64)
    c = nd.apply(zero, None)[0]
    A = (nd.apply(eye, None) - c).T  # x_n = A x + c  (columns: images of the unit vectors)
    W_enc = d.W_enc_FD.detach().cpu().double() @ A
    W_dec = nd.invert(d.W_dec_FD.detach().cpu().double(), None) - nd.invert(zero, None)  # linear part of the inverse
    b_dec = nd.invert(d.b_dec_D.detach().cpu().double()[None], None)[0]
    return {"W_enc": W_enc, "b_enc": d.b_enc_F.detach().cpu().double().clone(), "W_dec": W_dec, "b_dec": b_dec}


def refuse_timestep_dependent(d) -> None:
    if d.arch == "tide":
        raise DifflensError(
            "a TIDE dictionary cannot be exported: its input modulation depends on the timestep (FiLM from t), "
            "and sparsify/SAELens SAEs take no timestep; export a TopK/BatchTopK/JumpReLU/Matryoshka/ReLU SAE"
        )
    if d.norm.mode == "per-timestep":
        raise DifflensError(
            "this dictionary uses per-timestep normalisation (a different scale and mean per timestep bucket), "
            "which cannot be folded into one set of weights; retrain with --normalize scalar or pca-whiten to export"
        )


# ---- export -------------------------------------------------------------------------------------------
def export(d, out, fmt: str, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write `d` (a loaded difflens dictionary) as a sparsify or SAELens folder at `out` (new folder)."""
    if fmt not in FORMATS:
        raise DifflensError(f"export format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DifflensError(f"{out} exists and is not empty; choose a new folder for the export")
    if d.arch != "itda":
        refuse_timestep_dependent(d)  # the first reason to give, whatever the format
    if d.arch == "itda":
        tensors, cfg, note = _itda_parts(d, fmt)
    else:
        tensors, cfg = (_sparsify_parts if fmt == "sparsify" else _saelens_parts)(d)
        note = None
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    cfg["dtype"] = str(dtype).replace("torch.", "") if fmt == "saelens" else cfg.get("dtype")
    if cfg.get("dtype") is None:
        cfg.pop("dtype", None)
    weights = SPARSIFY_WEIGHTS if fmt == "sparsify" else SAELENS_WEIGHTS
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file(tensors, str(tmp / weights))
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if note:
            (tmp / NOTE_NAME).write_text(note + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _meta(d) -> dict:
    return {"difflens_architecture": d.arch, "difflens_site": d.cfg.site, "difflens_model": d.cfg.model}


def _sparsify_parts(d):
    if d.arch != "topk":
        raise DifflensError(
            f"sparsify holds TopK SAEs only; this dictionary is {d.arch!r}. "
            "Export it with --format saelens (JumpReLU/BatchTopK/Matryoshka/ReLU are SAELens architectures)"
        )
    w = folded_weights(d)
    tensors = {"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    cfg = {
        "activation": "topk", "expansion_factor": max(1, d.num_latents // d.d_in), "normalize_decoder": False,
        "num_latents": d.num_latents, "k": int(d.cfg.k), "multi_topk": False, "skip_connection": False,
        "transcode": False, "d_in": d.d_in, **_meta(d),
    }
    return tensors, cfg


def _saelens_parts(d):
    w = folded_weights(d) if d.arch != "itda" else None
    tensors = {"W_enc": w["W_enc"].T, "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    cfg = {"d_in": d.d_in, "d_sae": d.num_latents, "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none"}
    if d.arch == "topk":
        cfg.update(architecture="topk", k=int(d.cfg.k), rescale_acts_by_decoder_norm=False)
    elif d.arch in ("batchtopk", "matryoshka"):
        if not bool(d.threshold_seen):
            raise DifflensError(f"this {d.arch} SAE has no inference threshold yet (never trained); train it first")
        cfg["architecture"] = "jumprelu"
        tensors["threshold"] = torch.full((d.num_latents,), float(d.threshold), dtype=torch.float64)
    elif d.arch == "jumprelu":
        cfg["architecture"] = "jumprelu"
        tensors["threshold"] = d.threshold_F.detach().double()
    elif d.arch == "relu":
        cfg["architecture"] = "standard"
    else:
        raise DifflensError(f"architecture {d.arch!r} has no SAELens counterpart")
    cfg["metadata"] = {"model_name": d.cfg.model, "hook_name": d.cfg.site, **_meta(d)}
    return tensors, cfg


def _itda_parts(d, fmt: str):
    """ITDA: raw-space unit atoms as W_dec; W_enc = W_decᵀ only so the file loads (not ITDA's codes)."""
    if d.norm.mode == "per-timestep":
        refuse_timestep_dependent(d)
    with torch.no_grad():
        atoms = d.decoder_directions().double()
    f, dd = atoms.shape
    zeros_F, zeros_D = torch.zeros(f, dtype=torch.float64), torch.zeros(dd, dtype=torch.float64)
    note = (
        "Exported from a difflens ITDA dictionary: W_dec holds its atoms (unit directions in raw activation space). "
        "ITDA computes codes by pursuit over the atoms (difflens: itda_inference=" + str(d.cfg.itda_inference) + ", "
        f"L0={d.cfg.k}), not with an encoder: the encoder here is W_decᵀ with zero bias, so this file's TopK codes "
        "are NOT ITDA's codes. Use it for the decoder directions (steering, comparing dictionaries); load it back "
        "into difflens only as a TopK SAE."
    )
    if fmt == "sparsify":
        tensors = {"encoder.weight": atoms, "encoder.bias": zeros_F, "W_dec": atoms, "b_dec": zeros_D}
        cfg = {"activation": "topk", "expansion_factor": 1, "normalize_decoder": True, "num_latents": f,
               "k": int(d.cfg.k), "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": dd,
               **_meta(d), "difflens_note": note}
    else:
        tensors = {"W_enc": atoms.T, "b_enc": zeros_F, "W_dec": atoms, "b_dec": zeros_D}
        cfg = {"architecture": "topk", "d_in": dd, "d_sae": f, "k": int(d.cfg.k), "device": "cpu",
               "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
               "rescale_acts_by_decoder_norm": False,
               "metadata": {"model_name": d.cfg.model, "hook_name": d.cfg.site, **_meta(d), "difflens_note": note}}
    return tensors, cfg, note


# ---- import -------------------------------------------------------------------------------------------
def detect(path) -> str | None:
    """'sparsify', 'saelens' or None, from the folder's files."""
    p = Path(path)
    if (p / "cfg.json").is_file() and (p / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    if (p / "cfg.json").is_file() and (p / SAELENS_WEIGHTS).is_file():
        return "saelens"
    return None


def _read(path: Path, weights: str) -> tuple[dict, dict]:
    try:
        cfg = json.loads((path / "cfg.json").read_text(encoding="utf-8"))
        with safe_open(str(path / weights), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise DifflensError(f"{path} looks like an exported SAE folder but cannot be read ({e})") from e
    return cfg, tensors


def load_foreign(path, *, device="cpu"):
    """A difflens dictionary (normalization 'none', eval mode) from a sparsify or SAELens folder."""
    path = Path(path)
    fmt = detect(path)
    if fmt == "sparsify":
        cfg, t = _read(path, SPARSIFY_WEIGHTS)
        if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in t:
            raise DifflensError(f"{path}: sparsify transcoders / skip connections have no difflens counterpart")
        if cfg.get("activation", "topk") != "topk":
            raise DifflensError(f"{path}: sparsify activation {cfg.get('activation')!r} is not supported (topk only)")
        W_enc, b_enc, W_dec, b_dec = t["encoder.weight"], t["encoder.bias"], t["W_dec"], t["b_dec"]
        arch, extra, k = "topk", {}, int(cfg["k"])
        site, model = cfg.get("difflens_site", ""), cfg.get("difflens_model")
    elif fmt == "saelens":
        cfg, t = _read(path, SAELENS_WEIGHTS)
        for key, ok in (("normalize_activations", "none"), ("reshape_activations", "none")):
            if cfg.get(key, "none") != ok:
                raise DifflensError(
                    f"{path}: SAELens {key}={cfg[key]!r} is not supported; fold it into the weights in SAELens "
                    "(e.g. sae.fold_activation_norm_scaling_factor) and save again"
                )
        W_enc, b_enc, W_dec, b_dec = t["W_enc"].T, t["b_enc"], t["W_dec"], t["b_dec"]
        if not cfg.get("apply_b_dec_to_input", True):  # pre = W_enc x + b_enc = W_enc (x − b_dec) + (b_enc + W_enc b_dec)
            b_enc = b_enc + W_enc.double().matmul(b_dec.double()).to(b_enc.dtype)
        arch_in = cfg.get("architecture", "standard")
        archs = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}
        if arch_in not in archs:
            raise DifflensError(f"{path}: SAELens architecture {arch_in!r} is not supported (topk, jumprelu, standard)")
        arch, k, extra = archs[arch_in], cfg.get("k"), {}
        if arch == "relu":
            extra = {"normalize_decoder": False}
            k = None
        meta = cfg.get("metadata") or {}
        site, model = meta.get("difflens_site") or meta.get("hook_name") or "", meta.get("difflens_model") or meta.get("model_name")
    else:
        raise DifflensError(f"{path} is neither a difflens, sparsify nor SAELens dictionary folder")
    from difflens.dictionaries import DictConfig, build

    f, d_in = W_dec.shape
    dc = DictConfig(arch=arch, d_in=int(d_in), width=int(f), k=k, site=site or "", model=model,
                    normalization="none", **extra)
    sae = build(dc)
    with torch.no_grad():
        sae.W_enc_FD.copy_(W_enc.float())
        sae.b_enc_F.copy_(b_enc.float())
        sae.W_dec_FD.copy_(W_dec.float())
        sae.b_dec_D.copy_(b_dec.float())
        if arch == "jumprelu":
            sae.log_threshold_F.copy_(t["threshold"].float().clamp_min(1e-30).log())
    sae.to(device)
    sae.eval()
    return sae
