"""`difflens zoo train toy`: rectified-flow training of the toy model on freshly rendered scenes.

Resumable: a checkpoint (model, EMA, optimizer, step, RNG) is written atomically every
`checkpoint_every` steps; `--resume` continues from it. The shipped weights are the EMA.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from difflens.models.toy.model import ToyConfig, ToyT2I, pack
from difflens.utils import atomic_write_text, progress
from difflens.world.prompts import random_drop, scene_to_prompt
from difflens.world.scene import render, sample_scene


@dataclass
class ToyTrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 8e-4
    warmup: int = 100
    min_lr_frac: float = 0.05
    weight_decay: float = 0.0
    ema: float = 0.998
    drop_factor_prob: float = 0.15  # each factor left out of the prompt (so partial prompts work)
    uncond_prob: float = 0.1  # empty prompt, for classifier-free guidance
    seed: int = 0
    compile: bool = False  # measured: no faster than eager for this model on CPU
    checkpoint_every: int = 200
    threads: int = 0  # 0: torch default


def make_batch(rng: np.random.Generator, n: int, cfg: ToyTrainConfig) -> tuple[torch.Tensor, list[str]]:
    images, prompts = [], []
    for _ in range(n):
        scene = sample_scene(rng)
        images.append(render(scene).image)
        prompts.append("" if rng.random() < cfg.uncond_prob else scene_to_prompt(scene, random_drop(rng, cfg.drop_factor_prob)))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pack(x), prompts


def sample_sigmas(gen: torch.Generator, n: int) -> torch.Tensor:
    """Mostly logit-normal (SD3), partly uniform so the ends of the schedule are trained too."""
    ln = torch.sigmoid(torch.randn(n, generator=gen))
    un = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) < 0.7
    return torch.where(pick, ln, un).clamp(1e-4, 1.0)


def lr_at(step: int, cfg: ToyTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def _save_state(path: Path, model, ema, opt, step: int, rng: np.random.Generator, gen: torch.Generator, cfg) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{i}": p.detach().contiguous() for i, p in enumerate(ema)})
    for i, p in enumerate(model.parameters()):
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                tensors[f"opt.{i}.{name}"] = st[name].contiguous()
    tensors["torch_rng"] = gen.get_state()
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(path / "state.safetensors")
    meta = {"step": step, "numpy_rng": rng.bit_generator.state, "config": asdict(cfg)}
    atomic_write_text(path / "state.json", json.dumps(meta, default=int) + "\n")


def _load_state(path: Path, model, ema, opt, rng: np.random.Generator, gen: torch.Generator) -> int:
    from safetensors.torch import load_file

    t = load_file(str(path / "state.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    for i, p in enumerate(ema):
        p.copy_(t[f"ema.{i}"])
    for i, p in enumerate(model.parameters()):
        if f"opt.{i}.exp_avg" in t:
            opt.state[p] = {
                "step": torch.tensor(float(meta["step"])),
                "exp_avg": t[f"opt.{i}.exp_avg"].clone(),
                "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"].clone(),
            }
    gen.set_state(t["torch_rng"])
    rng.bit_generator.state = meta["numpy_rng"]
    return int(meta["step"])


def train_toy(out: str | Path, cfg: ToyTrainConfig | None = None, model_cfg: ToyConfig | None = None, resume: bool = False, log=print) -> Path:
    """Train from scratch (or resume) and write EMA weights + config to `out`."""
    cfg = cfg or ToyTrainConfig()
    out = Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = ToyT2I(model_cfg)
    model.train()
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = [p.detach().clone() for p in params]
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    state_dir = out / "train_state"
    start = 0
    if resume and (state_dir / "state.json").exists():
        start = _load_state(state_dir, model, ema, opt, rng, gen)
        log(f"resuming toy training at step {start}/{cfg.steps}")

    def loss_fn(x0, prompts_ids, mask, sigma, noise):
        text, pooled = model.text_encoder(prompts_ids, mask)
        s = sigma[:, None, None]
        xt = (1 - s) * x0 + s * noise
        v = model(xt, sigma, text, pooled)
        return torch.nn.functional.mse_loss(v, noise - x0)

    step_fn = loss_fn
    if cfg.compile:
        try:
            step_fn = torch.compile(loss_fn)
        except Exception as e:  # no compiler available: eager is correct, just slower
            log(f"torch.compile unavailable ({e}); training eagerly")
    bar = progress(range(start, cfg.steps), desc="train toy", initial=start, total=cfg.steps)
    t0 = time.time()
    losses = []
    for step in bar:
        x0, prompts = make_batch(rng, cfg.batch_size, cfg)
        ids, mask = model.tokenizer(prompts)
        sigma = sample_sigmas(gen, cfg.batch_size)
        noise = torch.randn(x0.shape, generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = step_fn(x0, ids, mask, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_state(state_dir, model, ema, opt, step + 1, rng, gen, cfg)
    # Ship the EMA weights.
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    model.eval()
    model.save(out)
    info = {"train_config": asdict(cfg), "final_loss": float(np.mean(losses[-100:])) if losses else None, "seconds": time.time() - t0}
    atomic_write_text(out / "train_info.json", json.dumps(info, indent=2) + "\n")
    return out
