# %% [markdown]
# # Quickstart: the whole difflens pipeline in Python, on the embedded toy model
#
# harvest activations -> train a TopK SAE -> evaluate it on held-out images -> find the feature
# that best matches an object of the toy world and look at its top images -> steer with it.
#
#     python examples/01_quickstart.py                  # ~1-2 min on a laptop CPU
#     python examples/01_quickstart.py --out my_run     # outputs elsewhere (default runs/examples/01_quickstart)
#
# The toy model is a real diffusers FluxTransformer2DModel trained on a procedural world whose
# ground truth (colour, object, position... of every pixel) is known, so "feature 17 means
# triangle" is measured, not eyeballed. `DIFFLENS_EXAMPLES_TINY=1` shrinks every size (the test
# suite runs it that way). This file is a jupytext "percent" script: each `# %%` is a cell.

# %%
import argparse
import json
import os

import numpy as np
from PIL import Image

import difflens
from difflens.evaluate import evaluate, text_table
from difflens.harvest import HarvestConfig, harvest
from difflens.interpret import DictionaryFeatures, StoreSource, build_cache, concept_match, feature_grid
from difflens.intervene import Window, steer_sweep
from difflens.models import load_adapter
from difflens.store import Store
from difflens.train import TrainConfig, expand_specs, train
from difflens.viz import labelled_grid

from _common import new_folder  # examples/_common.py: never write over earlier output

TINY = os.environ.get("DIFFLENS_EXAMPLES_TINY") == "1"
SIZES = dict(prompts=12, width=128, k=8, train_steps=60) if TINY else dict(prompts=96, width=512, k=16, train_steps=600)


parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", default="runs/examples/01_quickstart", help="output folder (a new one if it holds files)")
out = new_folder(parser.parse_args().out)
print(f"outputs go to {out}  ({'tiny' if TINY else 'full'} sizes: {SIZES})")

# %% [markdown]
# ## 1. Harvest
# Generate images from prompts of the toy world and record the activations of one site: the image
# tokens after double-stream block 1 (`transformer_blocks.1:img`, d = 128), at 3 of the 12
# denoising steps, every token (the feature heatmaps need all of them). Each prompt comes with the
# scene it describes, so every stored token knows its ground-truth concepts.

# %%
SITE = "transformer_blocks.1:img"
adapter = load_adapter("toy")  # or a diffusers pipeline folder / hub id: see 02_your_own_flux.py
print("sites of the toy model:", ", ".join(adapter.sites()[:6]), "...")
prompts, scenes = adapter.ground_truth().sample_prompts(SIZES["prompts"], seed=0)  # prompts of the toy world + their scenes
cfg = HarvestConfig(model="toy", sites=[SITE], steps=12, record_steps=[0, 6, 11], dtype="bf16", batch_size=16)
summary = harvest(out / "store", cfg, prompts, scenes=scenes, adapter=adapter)
store = Store(out / "store")
print(f"harvested {store.num_rows(SITE):,} activation rows of width {store.d(SITE)} from {len(prompts)} images")

# %% [markdown]
# ## 2. Train a TopK SAE
# One entry per dictionary; lists in an entry make a grid (`"k": [8, 16]` trains two). Whole
# images are held out for evaluation (`eval_tokens`); `dead_after_tokens` is lowered because the
# store is small.

# %%
specs = expand_specs([{"name": "topk", "arch": "topk"}], defaults={"site": SITE, "width": SIZES["width"], "k": SIZES["k"]})
tcfg = TrainConfig(steps=SIZES["train_steps"], batch_size=512, warmup_steps=20, eval_every=0, eval_tokens=4096,
                   init_tokens=4096, dead_after_tokens=20_000, progress=False)
trained = train(out / "store", specs, tcfg, out / "dicts")
name = specs[0].name
print(f"trained {name}: {trained[name].num_latents} latents, k = {SIZES['k']}")

# %% [markdown]
# ## 3. Evaluate on the held-out images
# The same numbers as `difflens evaluate --dict DIR --data STORE`: fraction of variance unexplained
# (FVU, lower is better), cosine, L0 (active latents per token), dead latents.

# %%
result = evaluate(out / "dicts" / name, store, show_progress=False)
print(text_table(result))
metrics = result["dictionaries"][0]["metrics"]

# %% [markdown]
# ## 4. Which feature is an object, and where does it fire?
# The feature cache holds, per feature, its top images with token maps and how often it is active
# on tokens of each ground-truth concept. The Matthews correlation (MCC) between "feature active
# on a token" and "token shows concept c" names what a feature means; we take the feature that
# best matches an object (a shape or a digit) and draw its top images with heatmaps.

# %%
sae = difflens.load(out / "dicts" / name)  # exactly what a user of the saved folder would do
images = StoreSource(store)
cache = build_cache(DictionaryFeatures(sae, name=name), images)
concepts = cache.info["concepts"]
best = (-1.0, None, None)
for f in np.flatnonzero(cache.live()):
    if not cache.has_maps(int(f)) or not cache.top_examples(int(f), maps=False):
        continue
    mcc = concept_match(cache, int(f))["token"].max(0)  # best step, per concept
    for c, cname in enumerate(concepts):
        if cname.startswith("object=") and mcc[c] > best[0]:
            best = (float(mcc[c]), int(f), cname)
match, feature, concept = best
print(f"feature {feature} best matches {concept} (token MCC {match:.2f}; 0 = chance, 1 = exactly the {concept} tokens)")
Image.fromarray(feature_grid(cache, feature, images.image, n_top=6, title=f"{name} feature {feature} ~ {concept}")).save(
    out / "feature.png")
print(f"its top images with heatmaps: {out / 'feature.png'}")

# %% [markdown]
# ## 5. Steer with it
# Add the feature's decoder direction at every image token of the site while generating another
# object. `mode="feature-max"` measures the scale in multiples of the largest activation of the
# feature seen in the store (`mode="token-norm"`: in typical token norms). The toy model decides
# shapes at high noise, so we steer during the first 6 of the 12 steps only. The toy world's
# classifier reads the object at the centre of each image: watch it turn into the feature's object.

# %%
other = "triangle" if concept != "object=triangle" else "square"  # a shape the toy draws reliably
prompt = f"a large white {other} in the center on a black plain background"
scales = [2.0, 4.0] if TINY else [1.0, 2.0, 4.0, 8.0]
sweep = steer_sweep(adapter, sae, [feature], scales, prompt, seed=0, read=("object", "center"),
                    mode="feature-max", store=store, window=Window.range(0, 6))
change = [float(np.abs(im.astype(float) - sweep["images"][0].astype(float)).mean()) for im in sweep["images"]]
for label, c in zip(sweep["labels"], change):
    print(f"  {label:<28} mean pixel change vs unsteered {c:6.1f} / 255")
Image.fromarray(labelled_grid(list(sweep["images"]), sweep["labels"], label_lines=2,
                                 title=f"steering with feature {feature} ({concept})")).save(out / "steer.png")
print(f"steering sweep: {out / 'steer.png'}")

# %%
results = {"rows": store.num_rows(SITE), "fvu": metrics["fvu"], "l0": metrics["l0"], "feature": feature, "concept": concept,
           "match": match, "readings": sweep["readings"], "pixel_change": change,
           "images": {"feature": str(out / "feature.png"), "steer": str(out / "steer.png")}}
(out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
print(f"held-out FVU {metrics['fvu']:.3f}, L0 {metrics['l0']:.1f}; all numbers in {out / 'results.json'}")
