"""The training data stream: one resumable batch iterator per site, plus the held-out slice.

* Determinism: epoch e of a site is `store.batches(..., seed=seed, start_epoch=e, epochs=1)`;
  every site uses the same seed, so a layer sweep reads the same token order at every layer
  when the sites hold the same rows. A position is (epoch, batches consumed in that epoch);
  resuming recreates the epoch's iterator and skips that many batches.
* DDP: each rank asks the store for its partition (rank, world_size) with the per-rank batch
  size; `drop_last` keeps the number of batches per epoch equal on every rank.
* Held-out data: whole samples (all their steps and tokens, so no image leaks into training)
  chosen once from the store's metadata; their rows are dropped from training batches and
  form the evaluation slice. A training step therefore sees batch_size rows minus any
  held-out ones (a small, deterministic shortfall).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from difflens.errors import DifflensError

TRAIN_COLUMNS = ("acts", "timestep", "sample_id", "step", "token")
EVAL_COLUMNS = ("acts", "timestep", "sample_id", "step")


@dataclass(frozen=True)
class Filters:
    """Which rows train: a timestep interval, a set of denoising step indices, the CFG branch.

    Text padding tokens are never trained on (the store leaves them out of batches by default)."""

    timestep_range: tuple[float, float] | None = None
    denoise_steps: tuple[int, ...] | None = None
    branch: str = "cond"  # CFG branch trained on: explicit, so a --both-branches store never mixes them

    def store_kwargs(self) -> dict:
        return {
            "timestep_range": self.timestep_range,
            "steps": list(self.denoise_steps) if self.denoise_steps is not None else None,
            "branch": self.branch,
        }

    def mask(self, timestep: np.ndarray, step: np.ndarray) -> np.ndarray:
        keep = np.ones(len(timestep), dtype=bool)
        if self.timestep_range is not None:
            lo, hi = self.timestep_range
            keep &= (timestep >= np.float32(lo)) & (timestep <= np.float32(hi))
        if self.denoise_steps is not None:
            keep &= np.isin(step, np.asarray(self.denoise_steps))
        return keep


def choose_heldout(store, site: str, eval_tokens: int, filters: Filters) -> list[int]:
    """The first samples in store order whose (filtered) rows reach `eval_tokens`.

    Never more than half of the samples: the rest must stay for training.
    """
    if eval_tokens <= 0:
        return []
    meta = store.meta(site, ["sample_id", "timestep", "step"])
    keep = filters.mask(np.asarray(meta["timestep"]), np.asarray(meta["step"]))
    sids = np.asarray(meta["sample_id"])[keep]
    if len(sids) == 0:
        raise DifflensError(
            f"site {site}: no rows match the timestep/step filters; widen --timestep-range / --step-window"
        )
    uniq, first, counts = np.unique(sids, return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    uniq, counts = uniq[order], counts[order]
    if len(uniq) < 2:
        raise DifflensError(
            f"site {site}: the store holds a single sample, so none can be held out for evaluation; "
            "harvest more prompts or pass --eval-tokens 0"
        )
    n = int(np.searchsorted(np.cumsum(counts), eval_tokens) + 1)
    n = max(1, min(n, len(uniq) // 2))
    return sorted(int(s) for s in uniq[:n])


class SiteStream:
    """Resumable, deterministic training batches of one site for this rank."""

    def __init__(
        self,
        store,
        site: str,
        *,
        local_batch_size: int,
        seed: int,
        filters: Filters,
        heldout: list[int],
        rank: int = 0,
        world_size: int = 1,
        columns: tuple[str, ...] = TRAIN_COLUMNS,
    ) -> None:
        self.store, self.site = store, site
        self.local_batch_size = local_batch_size
        self.seed, self.filters = seed, filters
        self.heldout = torch.as_tensor(sorted(heldout), dtype=torch.int64)
        self.rank, self.world_size = rank, world_size
        self.columns = columns
        self.epoch, self.batch_in_epoch = 0, 0
        self._it = None

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch_in_epoch}

    def seek(self, position: dict) -> None:
        """Continue exactly after `position` (reads and discards the epoch's first batches)."""
        self.epoch, skip = int(position["epoch"]), int(position["batch"])
        self._it = self._open(self.epoch)
        for i in range(skip):
            if next(self._it, None) is None:
                raise DifflensError(
                    f"cannot resume site {self.site}: epoch {self.epoch} now has only {i} batches, "
                    f"the checkpoint had read {skip}; the store changed since the run started"
                )
        self.batch_in_epoch = skip

    def _open(self, epoch: int):
        return iter(
            self.store.batches(
                self.site,
                self.local_batch_size,
                shuffle=True,
                seed=self.seed,
                start_epoch=epoch,
                epochs=1,
                columns=self.columns,
                drop_last=True,
                rank=self.rank,
                world_size=self.world_size,
                **self.filters.store_kwargs(),
            )
        )

    def next(self, agree=None) -> dict[str, torch.Tensor]:
        """The next batch; at an epoch's end, the next epoch's first batch.

        `agree(have_batch) -> bool` lets DDP ranks decide together whether the epoch goes on
        (ranks can differ by one batch per epoch); the default is this rank alone.
        """
        if self._it is None:
            self._it = self._open(self.epoch)
        batch = next(self._it, None)
        go_on = agree(batch is not None) if agree is not None else batch is not None
        if not go_on:  # epoch over (on some rank): everyone starts the next permutation
            if self.batch_in_epoch == 0:
                raise DifflensError(
                    f"site {self.site} has fewer rows (after filters, per process) than one batch of "
                    f"{self.local_batch_size}; lower --batch-size or widen the filters"
                )
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._it = self._open(self.epoch)
            batch = next(self._it, None)
            if batch is None:
                raise DifflensError(f"site {self.site}: the store returned no batch for epoch {self.epoch}")
        self.batch_in_epoch += 1
        if len(self.heldout) and "sample_id" in batch:
            keep = ~torch.isin(batch["sample_id"], self.heldout)
            if not bool(keep.all()):
                batch = {k: v[keep] for k, v in batch.items()}
        return batch


def init_sample(
    store, site: str, rows: int, *, seed: int, filters: Filters, heldout: list[int], rank: int = 0, world_size: int = 1
) -> dict[str, torch.Tensor]:
    """This rank's share of the first `rows` training rows (epoch 0), for data-dependent init.

    Normalisation statistics (PCA needs > 2·d rows) want more than one batch; gathered over
    ranks this is the same sample a single process would take when it covers the data.
    """
    share = max(1, -(-rows // world_size))
    held = torch.as_tensor(sorted(heldout), dtype=torch.int64)
    parts: dict[str, list] = {"acts": [], "timestep": []}
    got = 0
    for batch in store.batches(
        site,
        min(share, 4096),
        shuffle=True,
        seed=seed,
        start_epoch=0,
        epochs=1,
        columns=("acts", "timestep", "sample_id"),
        rank=rank,
        world_size=world_size,
        **filters.store_kwargs(),
    ):
        if len(held):
            keep = ~torch.isin(batch["sample_id"], held)
            batch = {k: v[keep] for k, v in batch.items()}
        take = min(share - got, int(batch["acts"].shape[0]))
        for k in parts:
            parts[k].append(batch[k][:take])
        got += take
        if got >= share:
            break
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in parts.items()}


def nonfinite_loss_error(store, site: str, batch: dict, step: int, name: str) -> DifflensError:
    """The message for a loss that turned NaN/inf: the step, where the batch came from, what to try."""
    sids = batch.get("sample_id")
    origin = ""
    if sids is not None and hasattr(store, "shards_of_samples"):
        try:
            shards = store.shards_of_samples(site, sids)
            origin = f" The batch came from {', '.join(shards[:3])}{' ...' if len(shards) > 3 else ''}."
        except DifflensError:
            origin = ""
    x = batch.get("acts")
    finite_data = x is None or bool(torch.isfinite(x).all())
    scale = f" (largest |activation| in the batch: {float(x.abs().max()):.3g})" if x is not None and finite_data and x.numel() else ""
    hint = ("the data is finite" + scale + ": lower --lr, keep gradient clipping on, or normalise the inputs"
            if finite_data else f"the batch holds NaN/inf activations: run `difflens store verify {getattr(store, 'root', '')}`")
    return DifflensError(
        f"training stopped at step {step + 1}: the loss of {name} is not finite (NaN/inf).{origin} Hint: {hint}. "
        "The last checkpoint is intact; --resume continues from it"
    )


@dataclass
class EvalSlice:
    """The held-out rows of one site, kept in memory for periodic evaluation."""

    acts: torch.Tensor  # [N, d] float32
    timestep: torch.Tensor  # [N]
    step: torch.Tensor  # [N]

    def __len__(self) -> int:
        return int(self.acts.shape[0])

    def chunks(self, size: int):
        for a in range(0, len(self), size):
            yield self.acts[a : a + size], self.timestep[a : a + size], self.step[a : a + size]


def load_eval_slice(store, site: str, heldout: list[int], filters: Filters, read_batch: int = 4096) -> EvalSlice:
    """Read the held-out samples' rows of `site` in store order (stops once all are found)."""
    d = store.d(site)
    if not heldout:
        return EvalSlice(torch.zeros(0, d), torch.zeros(0), torch.zeros(0, dtype=torch.int32))
    meta = store.meta(site, ["sample_id", "timestep", "step"])
    keep = filters.mask(np.asarray(meta["timestep"]), np.asarray(meta["step"]))
    expected = int(np.isin(np.asarray(meta["sample_id"])[keep], np.asarray(heldout)).sum())
    held = torch.as_tensor(heldout, dtype=torch.int64)
    parts: dict[str, list] = {"acts": [], "timestep": [], "step": []}
    found = 0
    for batch in store.batches(
        site, read_batch, shuffle=False, columns=EVAL_COLUMNS, drop_last=False, epochs=1, **filters.store_kwargs()
    ):
        sel = torch.isin(batch["sample_id"], held)
        if bool(sel.any()):
            for k in parts:
                parts[k].append(batch[k][sel])
            found += int(sel.sum())
        if found >= expected:
            break
    if found == 0:
        return EvalSlice(torch.zeros(0, d), torch.zeros(0), torch.zeros(0, dtype=torch.int32))
    return EvalSlice(*(torch.cat(parts[k]) for k in ("acts", "timestep", "step")))
