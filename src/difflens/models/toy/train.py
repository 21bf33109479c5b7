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
    steps: int = 4000
    batch_size: int = 32  # measured: same images/s as 64 on this CPU, and twice the updates
    lr: float = 8e-4
    warmup: int = 100
    min_lr_frac: float = 0.05
    weight_decay: float = 0.0
    ema: float = 0.998
    drop_factor_prob: float = 0.15  # each factor left out of the prompt (so partial prompts work)
    uncond_prob: float = 0.1  # empty prompt, for classifier-free guidance
    # Location of the logit-normal over sigma. Object identity is decided at high noise, where the
    # image no longer shows the shape and only the prompt can: v3 (location 0) drew one blob for
    # every object word, so the high-noise end gets a larger share of the samples.
    sigma_location: float = 0.5
    # Auxiliary per-token loss: a linear head on the image stream after the last double-stream
    # block predicts which object (or background) each token will show. At high noise only the
    # prompt can say that, so the loss trains the text-to-shape pathway directly (REPA-style
    # representation guidance, with the world's ground truth as the target). The head is not
    # shipped. 0 turns it off.
    aux_object_weight: float = 1.0
    # Extra weight of the flow loss on object pixels (and a 1-pixel ring around them, where the
    # glyph's outline and holes are). Small objects cover ~10% of the image, so an unweighted
    # loss spends most of its capacity on background patterns; small digits were the objects
    # the model got wrong. Each pixel weighs 1 + this; 0 turns it off.
    object_pixel_weight: float = 4.0
    bf16: bool = True  # autocast: measured 1.3x faster per step on this CPU; weights stay fp32
    seed: int = 0
    compile: bool = False  # measured: no faster than eager for this model on CPU
    checkpoint_every: int = 200
    threads: int = 0  # 0: torch default


def make_batch(
    rng: np.random.Generator, n: int, cfg: ToyTrainConfig
) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """Packed images, prompts, per-token object targets [n, 256] for the auxiliary loss (the
    object's index in OBJECTS, len(OBJECTS) for background, -100 (ignored) when the prompt does
    not name the object: unconditional or object dropped), and packed per-pixel loss weights
    (1 on background, 1 + object_pixel_weight on and right around objects)."""
    from difflens.world import vocab as V
    from difflens.world.labels import BACKGROUND, token_owner

    images, prompts, targets, near_object = [], [], [], []
    for _ in range(n):
        scene = sample_scene(rng)
        r = render(scene)
        images.append(r.image)
        uncond = rng.random() < cfg.uncond_prob
        drop = random_drop(rng, cfg.drop_factor_prob)
        prompts.append("" if uncond else scene_to_prompt(scene, drop))
        near_object.append(~r.background_mask)
        owner = token_owner(r).reshape(-1)
        if uncond or drop.get("object"):
            targets.append(np.full(owner.shape, -100, np.int64))
        else:
            ids = np.array([V.OBJECTS.index(o.object) for o in scene.objects] + [len(V.OBJECTS)])
            targets.append(ids[np.where(owner == BACKGROUND, len(scene.objects), owner)])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    ring = torch.nn.functional.max_pool2d(torch.from_numpy(np.stack(near_object))[:, None].float(), 3, 1, 1)
    weights = pack((1.0 + cfg.object_pixel_weight * ring).expand(-1, x.shape[1], -1, -1).contiguous())
    return pack(x), prompts, torch.from_numpy(np.stack(targets)), weights


def sample_sigmas(gen: torch.Generator, n: int, location: float = 0.0) -> torch.Tensor:
    """Mostly logit-normal (SD3), partly uniform so the ends of the schedule are trained too."""
    ln = torch.sigmoid(torch.randn(n, generator=gen) + location)
    un = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) < 0.7
    return torch.where(pick, ln, un).clamp(1e-4, 1.0)


def lr_at(step: int, cfg: ToyTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def _save_state(path: Path, model, ema, opt, step: int, rng: np.random.Generator, gen: torch.Generator, cfg, params, head) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{i}": p.detach().contiguous() for i, p in enumerate(ema)})
    tensors.update({f"aux.{k}": v.detach().contiguous() for k, v in head.state_dict().items()})
    for i, p in enumerate(params):
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


def _load_state(path: Path, model, ema, opt, rng: np.random.Generator, gen: torch.Generator, params, head) -> int:
    from safetensors.torch import load_file

    t = load_file(str(path / "state.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    head.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("aux.")})
    for i, p in enumerate(ema):
        p.copy_(t[f"ema.{i}"])
    for i, p in enumerate(params):
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
    from difflens.world import vocab as V

    head = torch.nn.Linear(model.cfg.heads * model.cfg.head_dim, len(V.OBJECTS) + 1)
    captured = {}
    model.transformer.transformer_blocks[-1].register_forward_hook(lambda mod, args, out: captured.__setitem__("img", out[1]))
    params = [p for p in model.parameters()] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = [p.detach().clone() for p in params]
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    state_dir = out / "train_state"
    start = 0
    if resume and (state_dir / "state.json").exists():
        start = _load_state(state_dir, model, ema, opt, rng, gen, params, head)
        log(f"resuming toy training at step {start}/{cfg.steps}")

    def loss_fn(x0, prompts_ids, mask, sigma, noise, targets, weights):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16 and x0.device.type == "cpu"):
            text, pooled = model.text_encoder(prompts_ids, mask)
        s = sigma[:, None, None]
        xt = (1 - s) * x0 + s * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16 and x0.device.type == "cpu"):
            v = model(xt, sigma, text, pooled)
            logits = head(captured.pop("img")) if cfg.aux_object_weight else None
        loss = ((v.float() - (noise - x0)).square() * weights).sum() / weights.sum()
        if logits is not None and bool((targets >= 0).any()):
            aux = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
            return loss, aux
        return loss, torch.zeros(())

    step_fn = loss_fn
    if cfg.compile:
        try:
            step_fn = torch.compile(loss_fn)
        except Exception as e:  # no compiler available: eager is correct, just slower
            log(f"torch.compile unavailable ({e}); training eagerly")
    bar = progress(range(start, cfg.steps), desc="train toy", initial=start, total=cfg.steps)
    t0 = time.time()
    losses, aux_losses = [], []
    for step in bar:
        x0, prompts, targets, weights = make_batch(rng, cfg.batch_size, cfg)
        ids, mask = model.tokenizer(prompts)
        sigma = sample_sigmas(gen, cfg.batch_size, cfg.sigma_location)
        noise = torch.randn(x0.shape, generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss, aux = step_fn(x0, ids, mask, sigma, noise, targets, weights)
        opt.zero_grad(set_to_none=True)
        (loss + cfg.aux_object_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        losses.append(loss.item())
        aux_losses.append(aux.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", aux=f"{np.mean(aux_losses[-50:]):.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_state(state_dir, model, ema, opt, step + 1, rng, gen, cfg, params, head)
    # Ship the EMA weights.
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    model.eval()
    model.save(out)
    info = {"train_config": asdict(cfg), "final_loss": float(np.mean(losses[-100:])) if losses else None,
            "final_aux_object_loss": float(np.mean(aux_losses[-100:])) if aux_losses else None, "seconds": time.time() - t0}
    atomic_write_text(out / "train_info.json", json.dumps(info, indent=2) + "\n")
    return out
