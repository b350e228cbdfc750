"""The order in which a run reads its samples."""

from __future__ import annotations

import math

import torch


class DataOrder:
    """The micro-batch stream: a seeded permutation per epoch, cut into micro-batches.

    Micro-batch m is a pure function of (seed, m), so resuming at step s needs nothing but s.
    """

    def __init__(self, n: int, micro_batch_size: int, seed: int):
        self.n, self.mbs, self.seed = n, micro_batch_size, seed
        self.per_epoch = math.ceil(n / micro_batch_size)
        self._perm: tuple[int, list[int]] | None = None

    def micro(self, m: int) -> list[int]:
        epoch, pos = divmod(m, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1][pos * self.mbs:(pos + 1) * self.mbs]
