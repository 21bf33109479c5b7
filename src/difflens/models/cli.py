"""`difflens sites`: list a model's hookable sites and their widths."""

from __future__ import annotations

import argparse

from difflens.cli_options import MODEL_DTYPES
from difflens.models import DEFAULT_MODEL


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sites",
        help="list a model's hookable sites (module:stream) and their dims",
        description="List the sites a model's adapter can hook, one per line with its width, "
        "then the default site. Weights are not loaded for diffusers pipelines.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"'toy', a diffusers pipeline folder, or a hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--model-dtype", default="fp32", choices=MODEL_DTYPES, help="fp32 or bf16 (fp16 on GPUs only); default fp32")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N; default cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from difflens.models._loading import describe_sites

    listing = describe_sites(args.model, dtype=args.model_dtype, device=args.device)
    width = max(len(site) for site, _ in listing.sites)
    for site, dim in listing.sites:
        print(f"{site:<{width}}  {dim}")
    print(f"default: {listing.default}")
    return 0
