"""Pieces every training loop here shares (SFT, DPO, the reward model): the data order.

    from dpo.loop import epoch_batches
    for idx in epoch_batches([len(e) for e in encoded], batch_size=8, seed=cfg.seed + epoch): ...
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, group: int = 8) -> list[list[int]]:
    """One epoch's batches: a seeded shuffle, then rows of similar length batched together within
    windows of `group` batches, then the batches in a seeded order.

    A batch costs its longest row times its size, so a short refusal batched with long answers
    is mostly padding. Sorting within windows removes most of it while every batch still comes
    from a random slice of the data (a global sort would put all the short rows in the same steps)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if group <= 1:  # plain shuffled batches, in the order drawn
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * group
    out: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]
