# %% [markdown]
# # Load a dictionary in Python and intervene with it
#
# A dictionary is a folder. difflens reads its own format (`cfg.json` + `weights.safetensors`,
# written by `difflens train`), SAELens folders (`cfg.json` + `sae_weights.safetensors`), sparsify
# folders (`cfg.json` + `sae.safetensors`) and `hf:ORG/REPO[/SUBFOLDER]` references through the
# Hugging Face cache — all with `difflens.load`. This script
#
# 1. loads a difflens dictionary and says what it is;
# 2. exports it as a SAELens and a sparsify folder and loads those back: the codes agree;
# 3. ablates the features most active on an image, steers with one feature (everywhere, then only
#    in a box), and makes the same ablation through the SAELens copy: the same image.
#
#     python examples/03_load_and_steer.py --dict runs/examples/01_quickstart/dicts/topk
#     python examples/03_load_and_steer.py --dict runs/demo/dicts/topk     # after `make demo`
#
# Any TopK/BatchTopK/JumpReLU/Matryoshka/ReLU SAE goes through all three steps; TIDE and ITDA load
# and intervene too, but step 2 says why it stops (TIDE's encoder depends on the timestep, which
# SAELens/sparsify do not take; ITDA's codes come from pursuit, so only its atoms export).

# %%
import argparse
import json

import numpy as np
import torch
from PIL import Image

import difflens
from difflens import DifflensError
from difflens.dictionaries import interop
from difflens.intervene import Ablate, Region, Steer, generate_with, record_activations
from difflens.models import load_adapter
from difflens.viz import labelled_grid

from _common import new_folder  # examples/_common.py: never write over earlier output


parser = argparse.ArgumentParser(description="load a dictionary and steer / ablate with it")
parser.add_argument("--dict", required=True, help="dictionary folder (difflens, SAELens or sparsify) or hf:ORG/REPO[/SUB]")
parser.add_argument("--model", default=None, help="model the dictionary belongs to (default: the one its cfg names)")
parser.add_argument("--prompt", default="a large red triangle in the center on a gray plain background")
parser.add_argument("--out", default="runs/examples/03_load_and_steer", help="output folder (a new one if it holds files)")
args = parser.parse_args()
out = new_folder(args.out)

# %% [markdown]
# ## 1. Load

# %%
sae = difflens.load(args.dict)
cfg = sae.cfg
print(f"loaded {args.dict}: {cfg.arch}, {sae.num_latents} latents over d = {cfg.d_in} at {cfg.site!r} of model "
      f"{cfg.model!r}, k = {getattr(cfg, 'k', None)}, input normalisation {cfg.normalization!r}")
adapter = load_adapter(args.model or cfg.model or "toy")

# %% [markdown]
# ## 2. The same dictionary as a SAELens and a sparsify folder
# Export folds difflens's input normalisation into the weights, so both libraries see raw
# activations (`pre = W_enc (x - b_dec) + b_enc`) and compute the same codes. Loading the folders
# back goes through the same `difflens.load`. Here we compare codes on real activations of the
# prompt's image at the dictionary's site (every recorded step and token).

# %%
rec = record_activations(adapter, [args.prompt], [0], cfg.site)  # acts [rows, tokens, d] per denoising step
per_step = [rec.step_acts(s).reshape(-1, cfg.d_in) for s in range(len(rec.timesteps))]
x = torch.cat(per_step)
t = torch.cat([torch.full((len(a),), rec.timesteps[s]) for s, a in enumerate(per_step)])  # TIDE needs the timestep
with torch.no_grad():
    codes = sae.encode(x, t)
copies = {}
for fmt in ("saelens", "sparsify"):
    if fmt == "sparsify" and cfg.arch not in ("topk", "itda"):
        print(f"  {fmt}: skipped (sparsify folders hold TopK SAEs only; this is {cfg.arch})")
        continue
    try:
        folder = interop.export(sae, out / fmt, fmt)  # = `difflens export --format FMT DICT OUT`
    except DifflensError as e:  # TIDE, per-timestep normalisation: the reason is in the message
        print(f"  {fmt}: not exported: {e}")
        continue
    if cfg.arch == "itda":
        print(f"  {fmt}: wrote ITDA's atoms as a decoder in {folder}; its codes come from pursuit, not an encoder, "
              "so there are no codes to compare")
        continue
    copies[fmt] = difflens.load(folder)
    with torch.no_grad():
        other = copies[fmt].encode(x)
    same_active = float(((codes > 0) == (other > 0)).all(1).float().mean())
    print(f"  {fmt} copy in {folder}: max |code difference| {float((codes - other).abs().max()):.2e} over {len(x):,} "
          f"tokens, same active latents on {same_active:.1%} of them")

# %% [markdown]
# ## 3. Intervene
# `generate_with(adapter, prompts, seeds, [interventions])` runs the model with hooks that edit
# the site's activations at every step. Code edits (ablate / clamp / scale) keep the dictionary's
# error term, so only the chosen features change: x' = x + dec(c') - dec(c). Steering adds a
# decoder direction; `mode="token-norm"` measures the scale in typical token norms.

# %%
top = torch.argsort(codes.mean(0), descending=True)[:3].tolist()  # the features most active on this image
steer_feature = top[0]
half = Region.parse(f"0,0,{adapter.image_hw()[1] // 2},{adapter.image_hw()[0]}")  # x0,y0,x1,y1 in pixels: the left half
runs = {
    "clean": [],
    f"ablate {len(top)} top features": [Ablate(sae, top)],
    f"steer feature {steer_feature} x-0.5": [Steer(sae, [steer_feature], -0.5, mode="token-norm")],
    f"steer {steer_feature} x-0.5, left half": [Steer(sae, [steer_feature], -0.5, mode="token-norm", region=half)],
}
if "saelens" in copies:
    runs["ablate via the SAELens copy"] = [Ablate(copies["saelens"], top)]
images = {label: generate_with(adapter, [args.prompt], [0], ivs).images[0] for label, ivs in runs.items()}
clean = images["clean"].astype(float)
truth = adapter.ground_truth()  # the toy world's classifier; None for real models


def describe(read: dict) -> str:
    """The toy classifier's reading of the main object, in words ("large red triangle, center")."""
    m = read.get("main") or {}
    return f"{m.get('size', '?')} {m.get('color', '?')} {m.get('object', '?')}, {m.get('position', '?')} (p {m.get('p', 0):.2f})"


readings = {}
for label, im in images.items():
    change = float(np.abs(im.astype(float) - clean).mean())
    read = truth.read_images(im[None])[0] if truth is not None else None
    readings[label] = {"pixel_change": change, "reading": read}
    what = f"  classifier: {describe(read)}" if read is not None else ""
    print(f"  {label:<34} mean pixel change {change:6.1f} / 255{what}")
if "saelens" in copies:
    d = float(np.abs(images["ablate via the SAELens copy"].astype(float) - images[f"ablate {len(top)} top features"]).max())
    print(f"the SAELens copy's ablation differs from the original's by at most {d:.0f} grey levels")
Image.fromarray(labelled_grid(list(images.values()), list(images), label_lines=2, title=args.prompt[:60])).save(out / "interventions.png")
print(f"wrote {out / 'interventions.png'}")
(out / "results.json").write_text(json.dumps({"top_features": top, "runs": readings, "image": str(out / "interventions.png")},
                                              indent=2, default=str) + "\n")
