"""Deterministic global batches, sharded over processes.

Batch b is a pure function of (seed, b): resuming at step s needs no saved sampler
state, and 1 process with micro-batch 8 sees exactly the rows that 2 processes with
micro-batch 4 see together.
"""

from __future__ import annotations

import torch


def global_batch(num_rows: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Rows of global batch `index`: epochs are seeded permutations cut into full batches."""
    per_epoch = num_rows // batch_size
    if per_epoch == 0:
        raise ValueError(f"only {num_rows} training rows for a global batch of {batch_size}")
    epoch, within = divmod(index, per_epoch)
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[within * batch_size : (within + 1) * batch_size].tolist()


def shard(rows: list[int], rank: int, world: int) -> list[int]:
    """Contiguous slice of a global batch for one process."""
    per = len(rows) // world
    return rows[rank * per : (rank + 1) * per]
