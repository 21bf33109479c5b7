"""`difflens harvest`: record activations of a model at sites, steps and tokens into a store."""

from __future__ import annotations

from pathlib import Path

from difflens.cli_options import (
    STORE_DTYPES,
    add_generation_options,
    add_json_option,
    add_model_options,
    add_out_option,
    add_seeds_option,
    add_step_window,
    emit_json,
    generation_kwargs,
    load_model,
    out_dir,
    parse_int_list,
    parse_step_window,
    say,
)
from difflens.errors import DifflensError


def register(sub) -> None:
    p = sub.add_parser("harvest", help="record activations across prompts, seeds and timesteps into a store",
                       description="Generate images and record activations at sites, steps and tokens into a store "
                       "(docs/store.md). --dry-run prints the rows and bytes the settings would write, and the free "
                       "disk, without loading the model's weights.")
    add_model_options(p)
    add_generation_options(p)
    p.add_argument("--sites", default=None, help="comma-separated sites or globs (default: the model's main site)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="prompt file: .txt (one per line), .jsonl, or hf:<dataset>[:split]")
    src.add_argument("--num-prompts", type=int,
                     help="sample N prompts from the model's ground-truth world (the toy model has one; real models: --prompts)")
    p.add_argument("--prompt-column", default=None, help="column/field holding the prompt (jsonl, datasets)")
    p.add_argument("--prompt-seed", type=int, default=1, help="seed of the ground-truth world's prompt sampler (--num-prompts)")
    add_seeds_option(p)
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokens-per-image", type=int, default=None, help="tokens kept per image, step and stream")
    tok.add_argument("--token-fraction", type=float, default=None, help="fraction of tokens kept per image and step")
    add_step_window(p, help="denoising step indices to record: a:b (b excluded) or 0,3,6 (default: all steps)")
    p.add_argument("--stream", choices=["img", "txt"], default=None, help="stream for sites given without one")
    p.add_argument("--store-dtype", default="fp32", choices=list(STORE_DTYPES),
                   help="dtype the store keeps activations in (default fp32; bf16 halves the bytes)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per generate() call (one store unit)")
    p.add_argument("--both-branches", action="store_true", help="record the unconditional CFG rows too")
    p.add_argument("--dict", dest="dicts", action="append", default=[], metavar="DIR",
                   help="with --topk: a dictionary (folder or hf:ORG/REPO[/SUB]) whose streaming top-k cache to fill "
                   "while generating (repeat for several); written to <out>/topk/<name>/")
    p.add_argument("--topk", type=int, default=None, metavar="N",
                   help="examples (sample, step, token map) kept per feature of each --dict (docs/interpret.md)")
    p.add_argument("--topk-snapshot-every", type=int, default=1, metavar="N",
                   help="with --topk: save the cache's resumable snapshot after every N committed units (default 1); "
                   "each snapshot rewrites the whole cache, so raise N when it is large; a crash regenerates at most "
                   "the last N units for the cache")
    p.add_argument("--write-queue", type=int, default=2, metavar="N",
                   help="finished units waiting for the background store writer (default 2; 0 = write synchronously)")
    add_out_option(p, kind="dir", help="store folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted harvest into the same store")
    p.add_argument("--append", action="store_true", help="add to a store made with another configuration")
    p.add_argument("--dry-run", action="store_true", help="print rows, bytes on disk and free disk; write nothing")
    add_json_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from difflens.harvest.config import HarvestConfig, read_prompts
    from difflens.harvest.run import harvest

    gk = generation_kwargs(args)
    seeds = parse_int_list(args.seeds, "--seeds")
    record_steps = parse_step_window(args.step_window)
    out_dir(args.out)
    scenes = None
    if args.num_prompts is not None:
        if args.num_prompts < 1:
            raise DifflensError(f"--num-prompts must be >= 1, got {args.num_prompts}")
        prompts = None  # sampled by the model's ground truth once the model is loaded
        source = f"world:{args.num_prompts}:{args.prompt_seed}"
    else:
        prompts = read_prompts(args.prompts, args.prompt_column)
        source = args.prompts
    if args.dry_run:
        from difflens.harvest.plan import plan_harvest

        n_prompts = args.num_prompts if prompts is None else len(prompts)
        plan = plan_harvest(args, n_prompts=n_prompts, seeds=seeds, record_steps=record_steps)
        say(None, plan.text())
        if args.json:
            emit_json(plan.to_json())
        return 0
    adapter = load_model(args)
    if prompts is None:
        from difflens.groundtruth import world_prompts_of

        prompts, scenes = world_prompts_of(adapter, args.num_prompts, args.prompt_seed, model=args.model,
                                           option="--num-prompts N", instead="--prompts FILE|hf:DATASET")
    steps = gk["steps"] or int(adapter.default_steps)  # the Adapter contract: every model declares one
    patterns = args.sites or adapter.default_site()
    if args.stream:
        patterns = ",".join(p if ":" in p else f"{p}:{args.stream}" for p in patterns.split(","))
    cfg = HarvestConfig(
        model=args.model,
        sites=adapter.resolve_sites(patterns),
        steps=steps,
        guidance=args.guidance,
        seeds=seeds,
        tokens_per_image=args.tokens_per_image,
        token_fraction=args.token_fraction,
        record_steps=record_steps,
        cond_only=not args.both_branches,
        dtype=args.store_dtype,
        model_dtype=args.model_dtype,
        batch_size=args.batch_size,
        prompt_source=source,
        num_prompts=len(prompts),
        height=gk["height"],
        width=gk["width"],
    )
    topk = None
    if bool(args.dicts) != (args.topk is not None):
        raise DifflensError("--dict and --topk go together: --dict DIR --topk N fills a streaming top-k cache")
    if args.dicts:
        from difflens.dictionaries.hub import display_name, local_folder

        topk, seen = [], set()
        for d in args.dicts:
            folder = local_folder(d)
            name = display_name(folder) or folder.resolve().name or "dict"
            if name in seen:
                raise DifflensError(f"two --dict folders are both named {name!r}: their top-k caches would collide")
            seen.add(name)
            topk.append((name, str(folder), args.topk))
    created = not Path(args.out).exists()
    try:
        summary = harvest(args.out, cfg, prompts, scenes=scenes, adapter=adapter, resume=args.resume, append=args.append,
                          write_queue=args.write_queue, topk=topk, topk_snapshot_every=args.topk_snapshot_every)
    except BaseException:
        _remove_if_empty(Path(args.out), created)
        raise
    if summary["rank"] == 0:
        result = {k: v for k, v in summary.items() if k != "manifest"}
        if args.json:
            emit_json(result)
        say(args, f"harvested {result.get('rows_written', '?')} rows into {args.out}")
    return 0


def _remove_if_empty(out: Path, created: bool) -> None:
    """A harvest that fails before committing its first unit leaves no store to block the rerun.

    Only a folder this run created, holding no committed unit, and only in a single-process run
    (with torchrun another rank may still be writing)."""
    import os
    import shutil

    if not created or not out.is_dir() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    units = out / "units"
    if units.is_dir() and any(units.glob("*.json")):
        return
    shutil.rmtree(out, ignore_errors=True)
