"""`difflens harvest`: record activations of a model at sites, steps and tokens into a store."""

from __future__ import annotations

import json

from difflens.errors import DifflensError


def register(sub) -> None:
    p = sub.add_parser("harvest", help="record activations across prompts, seeds and timesteps into a store")
    p.add_argument("--model", default="toy", help="'toy', a local diffusers folder or a hub id")
    p.add_argument("--sites", default=None, help="comma-separated sites or globs (default: the model's main site)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="prompt file: .txt (one per line), .jsonl, or hf:<dataset>[:split]")
    src.add_argument("--num-prompts", type=int, help="sample N prompts from the toy world")
    p.add_argument("--prompt-column", default=None, help="column/field holding the prompt (jsonl, datasets)")
    p.add_argument("--prompt-seed", type=int, default=1, help="seed of the toy-world prompt sampler")
    p.add_argument("--steps", type=int, default=12, help="denoising steps")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every prompt runs with every seed")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokens-per-image", type=int, default=None, help="tokens kept per image, step and stream")
    tok.add_argument("--token-fraction", type=float, default=None, help="fraction of tokens kept per image and step")
    p.add_argument("--timesteps", default="all", help="'all' or comma-separated step indices to record")
    p.add_argument("--stream", choices=["img", "txt"], default=None, help="stream for sites given without one")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="storage dtype of activations")
    p.add_argument("--model-dtype", default="fp32", help="dtype to run the model in (fp32 or bf16 on CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--quantize", default=None, choices=["nf4"], help="4-bit NF4 transformer (CUDA + bitsandbytes)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per generate() call (one store unit)")
    p.add_argument("--both-branches", action="store_true", help="record the unconditional CFG rows too")
    p.add_argument("--out", required=True, help="store folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted harvest into the same store")
    p.add_argument("--append", action="store_true", help="add to a store made with another configuration")
    p.set_defaults(func=run)


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DifflensError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise DifflensError(f"--seeds must be non-negative integers, got {text!r}")
    return seeds


def run(args) -> int:
    from difflens.harvest.config import HarvestConfig, parse_steps, read_prompts
    from difflens.harvest.run import harvest, world_prompts
    from difflens.models import load_adapter

    scenes = None
    if args.num_prompts is not None:
        if args.num_prompts < 1:
            raise DifflensError(f"--num-prompts must be >= 1, got {args.num_prompts}")
        prompts, scenes = world_prompts(args.num_prompts, args.prompt_seed)
        source = f"world:{args.num_prompts}:{args.prompt_seed}"
    else:
        prompts = read_prompts(args.prompts, args.prompt_column)
        source = args.prompts
    adapter = load_adapter(args.model, dtype=args.model_dtype, device=args.device, quantize=args.quantize)
    patterns = args.sites or adapter.default_site()
    if args.stream:
        patterns = ",".join(p if ":" in p else f"{p}:{args.stream}" for p in patterns.split(","))
    cfg = HarvestConfig(
        model=args.model,
        sites=adapter.resolve_sites(patterns),
        steps=args.steps,
        guidance=args.guidance,
        seeds=_parse_seeds(args.seeds),
        tokens_per_image=args.tokens_per_image,
        token_fraction=args.token_fraction,
        record_steps=parse_steps(args.timesteps),
        cond_only=not args.both_branches,
        dtype=args.dtype,
        model_dtype=args.model_dtype,
        batch_size=args.batch_size,
        prompt_source=source,
        num_prompts=len(prompts),
    )
    summary = harvest(args.out, cfg, prompts, scenes=scenes, adapter=adapter, resume=args.resume, append=args.append)
    if summary["rank"] == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "manifest"}, indent=2))
    return 0
