"""Site-table builders shared by the adapters, so every family names sites the same way."""

from __future__ import annotations

from torch import nn

from difflens.hooks import SiteBinding


def model_width(transformer: nn.Module) -> int:
    """Residual-stream width of a diffusers transformer (heads x head dim)."""
    inner = getattr(transformer, "inner_dim", None)
    if inner is not None:
        return int(inner)
    cfg = transformer.config
    return int(cfg.num_attention_heads * cfg.attention_head_dim)


def feedforward_hidden(ff: nn.Module) -> int:
    """Width of a diffusers `FeedForward`'s hidden layer: the input size of its output Linear."""
    out_linear = ff.net[2]
    return int(out_linear.in_features)


def joint_block_sites(prefix: str, blocks: nn.ModuleList, dim: int) -> dict[str, SiteBinding]:
    """Output sites of blocks returning (txt, img); a block without a text output (SD3's last,
    `context_pre_only`) gets no txt site."""
    out: dict[str, SiteBinding] = {}
    for i, block in enumerate(blocks):
        path = f"{prefix}.{i}"
        out[f"{path}:img"] = SiteBinding(path, dim, "tuple", index=1)
        if not getattr(block, "context_pre_only", False):
            out[f"{path}:txt"] = SiteBinding(path, dim, "tuple", index=0)
    return out


def image_block_sites(prefix: str, blocks: nn.ModuleList, dim: int) -> dict[str, SiteBinding]:
    """Output sites of cross-attention blocks, which carry image tokens only."""
    return {f"{prefix}.{i}:img": SiteBinding(f"{prefix}.{i}", dim, "tensor") for i in range(len(blocks))}


def mlp_sites(prefix: str, blocks: nn.ModuleList) -> dict[str, SiteBinding]:
    """Post-activation MLP hidden units ("neurons"): `ff.net.0` (image) and `ff_context.net.0` (text)."""
    out: dict[str, SiteBinding] = {}
    for i, block in enumerate(blocks):
        ff = getattr(block, "ff", None)
        if ff is not None:
            path = f"{prefix}.{i}.ff.net.0"
            out[f"{path}:img"] = SiteBinding(path, feedforward_hidden(ff), "tensor")
        ff_ctx = getattr(block, "ff_context", None)
        if ff_ctx is not None:
            path = f"{prefix}.{i}.ff_context.net.0"
            out[f"{path}:txt"] = SiteBinding(path, feedforward_hidden(ff_ctx), "tensor")
    return out


def middle_block(n: int) -> int:
    return max(n // 2, 0)
