"""Data-parallel helpers over `torch.distributed` (gloo on CPU, nccl on GPU), used directly.

We all-reduce gradients by hand rather than wrap in DDP: several dictionaries train in lockstep,
TopK leaves some parameters without gradients on some ranks, and the dictionaries' own
`before_optimizer_step` hooks must see the *global* gradient. Nothing here pickles
(no `*_object` collectives).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_from_env() -> DistEnv:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/MASTER_*); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("DIFFLENS_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend=backend)
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size())


def current() -> DistEnv:
    if dist.is_available() and dist.is_initialized():
        return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size())
    return DistEnv()


def all_reduce_sum_(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads_(params: list[torch.nn.Parameter], env: DistEnv) -> None:
    """Sum gradients over ranks in one flat buffer (a missing grad counts as zeros)."""
    if not env.active or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def all_gather_rows(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate a [n_r, ...] tensor from every rank in rank order (n_r may differ)."""
    if not env.active:
        return t
    if t.dtype == torch.bool:  # gloo has no bool collectives
        return all_gather_rows(t.to(torch.uint8), env).to(torch.bool)
    n = torch.tensor([t.shape[0]], dtype=torch.int64)
    counts = [torch.zeros_like(n) for _ in range(env.world_size)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    pad = max(counts)
    if pad == 0:
        return t
    padded = torch.zeros((pad, *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


class BatchComm:
    """The group as a dictionary sees it for batch-level statistics (BatchTopK's global selection,
    AuxK's global-batch variances); see `dictionaries.sae.BatchComm`."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum_(t, self.env)

    def gather(self, t_N: torch.Tensor) -> torch.Tensor:
        return all_gather_rows(t_N.contiguous(), self.env)


def broadcast_module_(module: torch.nn.Module, env: DistEnv, src: int = 0) -> None:
    """Make every rank hold rank `src`'s parameters and buffers (after init, after resume)."""
    if not env.active:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.numel() == 0:
                continue
            if t.dtype == torch.bool:  # gloo has no bool collectives
                tmp = t.data.to(torch.uint8)
                dist.broadcast(tmp, src=src)
                t.data.copy_(tmp.to(torch.bool))
            else:
                dist.broadcast(t.data, src=src)


def broadcast_object(env: DistEnv, obj, src: int = 0):
    """Rank `src`'s small value (a message or None) on every rank."""
    if not env.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.destroy_process_group()
