# %% [markdown]
# # Your own FLUX run: harvest, train, evaluate and steer on a diffusers Flux pipeline
#
# The same public API as 01_quickstart.py, pointed at a real diffusers `FluxPipeline`. Without
# `--model`, a tiny random FLUX-like pipeline (`difflens.models.tiny`) is saved to a folder and
# stands in for FLUX.1, so this runs anywhere in under a minute (its images are noise and its
# features mean nothing; the point is the code path). On a GPU, change what the `# GPU:`
# comments say, or run
#
#     python examples/02_your_own_flux.py --model black-forest-labs/FLUX.1-schnell --device cuda \
#         --model-dtype bf16 --offload model --size 512
#
# (download the model first: `huggingface-cli download black-forest-labs/FLUX.1-schnell`; with
# HF_HUB_OFFLINE=1 difflens only reads the local cache and says so when the model is missing).
#
#     python examples/02_your_own_flux.py                # the tiny stand-in, on CPU

# %%
import argparse
import json
import os

import numpy as np
from PIL import Image

import difflens
from difflens.evaluate import evaluate, text_table
from difflens.harvest import HarvestConfig, harvest
from difflens.intervene import Steer, generate_with, record_activations
from difflens.models import load_adapter
from difflens.store import Store
from difflens.train import TrainConfig, expand_specs, train
from difflens.viz import labelled_grid

from _common import new_folder  # examples/_common.py: never write over earlier output

TINY = os.environ.get("DIFFLENS_EXAMPLES_TINY") == "1"


parser = argparse.ArgumentParser(description="harvest, train, evaluate and steer on a diffusers Flux pipeline")
parser.add_argument("--model", default=None, help="hub id or pipeline folder (default: a tiny random stand-in)")
parser.add_argument("--device", default="cpu")  # GPU: cuda
parser.add_argument("--model-dtype", default="fp32", choices=["fp32", "bf16"])  # GPU: bf16 (FLUX.1 is 12B parameters)
parser.add_argument("--offload", default="none", choices=["none", "model", "sequential"])  # GPU < 40 GB: model
parser.add_argument("--size", type=int, default=None, help="image height and width (default: 32 for the stand-in, "
                    "the model's own otherwise; 512 is a good start for FLUX.1)")
parser.add_argument("--out", default="runs/examples/02_your_own_flux", help="output folder (a new one if it holds files)")
args = parser.parse_args()
out = new_folder(args.out)

# %% [markdown]
# ## 1. The model
# `load_adapter` takes a hub id, a local pipeline folder or "toy", and picks the family (Flux,
# SD3, PixArt, DiT) from the pipeline's model_index.json.

# %%
model = args.model
size = args.size
if model is None:  # GPU: not needed; pass --model (a hub id or a pipeline folder)
    from difflens.models.tiny import save_tiny_pipeline  # tiny random pipelines of each family, built in code

    model = str(save_tiny_pipeline("flux", out / "tiny-flux", clip_length=77))  # 77 CLIP tokens, as FLUX.1
    size = size or 32
    print(f"no --model: a tiny random FluxPipeline stands in for FLUX.1 ({model})")
adapter = load_adapter(model, dtype=args.model_dtype, device=args.device, offload=args.offload)
# GPU: load_adapter("black-forest-labs/FLUX.1-schnell", dtype="bf16", device="cuda", offload="model",
#      quantize="nf4", max_text_length=128)   # nf4 (bitsandbytes) and max_text_length are optional
SITE = adapter.default_site()  # the last double-stream block's image tokens: transformer_blocks.18:img on FLUX.1
steps = adapter.default_steps  # 4 for FLUX.1-schnell, 28 for FLUX.1-dev
print(f"{len(adapter.sites())} hookable sites, e.g. {SITE} (width {adapter.site_dim(SITE)}); "
      f"{steps} denoising steps by default")

# %% [markdown]
# ## 2. Harvest
# Your prompts (a list, or `difflens.harvest.config.read_prompts("prompts.txt")`), a few seeds,
# a share of the image tokens per image (at 512 px FLUX.1 has 1,024 image tokens per step; a
# 16th of them keeps the store small while covering many images).

# %%
PROMPTS = ["a red fox in the snow", "a blue house by the sea", "a bowl of green apples", "a yellow taxi at night",
           "a portrait of an old man", "a cat on a sofa", "a mountain lake at sunrise", "a plate of pasta"]
seeds = [0, 1] if TINY else [0, 1, 2, 3]  # GPU: thousands of prompts; seeds multiply them
cfg = HarvestConfig(model=model, sites=[SITE], steps=steps, seeds=seeds, token_fraction=0.5 if size == 32 else 0.0625,
                    dtype="bf16", model_dtype=args.model_dtype, batch_size=8, height=size, width=size)
harvest(out / "store", cfg, PROMPTS, adapter=adapter)
store = Store(out / "store")
print(f"harvested {store.num_rows(SITE):,} rows of width {store.d(SITE)} from {len(PROMPTS) * len(seeds)} images")

# %% [markdown]
# ## 3. Train and evaluate a TopK SAE
# GPU: width 16 x d or more (3072 x 16 = 49,152 on FLUX.1), k 32-64, 20k+ steps of 4,096 tokens.

# %%
width = 4 * store.d(SITE)
specs = expand_specs([{"arch": "topk"}], defaults={"site": SITE, "width": width, "k": 4})
tcfg = TrainConfig(steps=60 if TINY else 300, batch_size=256, warmup_steps=10, eval_every=0, eval_tokens=512,
                   init_tokens=1024, dead_after_tokens=10_000, progress=False)
train(out / "store", specs, tcfg, out / "dicts")
result = evaluate(out / "dicts", store, show_progress=False)
print(text_table(result))
fvu = result["dictionaries"][0]["metrics"]["fvu"]

# %% [markdown]
# ## 4. Steer
# The feature most active on a new prompt, pushed down (scale -1) and up (+1) in units of the
# typical token norm, at every step. On FLUX.1-schnell Shabalin et al. steer at ~0.8 inside a
# region for the first steps (`region=Region.parse(...)`, `window=Window.range(0, 3)`).

# %%
sae = difflens.load(out / "dicts" / specs[0].name)
prompt = "a red fox in a green forest"
rec = record_activations(adapter, [prompt], [0], SITE, height=size, width=size)
codes = sae.encode(rec.step_acts(0).reshape(-1, sae.cfg.d_in).to(next(sae.parameters()).device))
feature = int(codes.mean(0).argmax())
gens = {"unsteered": generate_with(adapter, [prompt], [0], [], height=size, width=size)}
for scale in (-1.0, 1.0):
    gens[f"feature {feature} x{scale:+g}"] = generate_with(adapter, [prompt], [0], [Steer(sae, [feature], scale)],
                                                           height=size, width=size)
images = [g.images[0] for g in gens.values()]
change = [float(np.abs(im.astype(float) - images[0].astype(float)).mean()) for im in images]
for label, c in zip(gens, change):
    print(f"  {label:<22} mean pixel change vs unsteered {c:6.1f} / 255")
Image.fromarray(labelled_grid(images, list(gens), label_lines=1, title=prompt)).save(out / "steer.png")
print(f"wrote {out / 'steer.png'}")
(out / "results.json").write_text(json.dumps({"model": model, "site": SITE, "rows": store.num_rows(SITE), "fvu": fvu,
                                              "feature": feature, "pixel_change": change}, indent=2) + "\n")
