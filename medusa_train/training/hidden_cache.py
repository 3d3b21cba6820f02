"""Frozen-backbone hidden states computed once, stored on disk, read memory-mapped.

With a frozen backbone the last hidden state of every training token never changes, so
Medusa-1 needs the backbone forward only once per row; every later visit reads it from
the cache. Each process writes its own shard as a `.npy` file plus an index of
(row, offset, length) (the layout of training/row_shards.py), so `accelerate launch`
builds the cache in parallel; every process then maps all shards read-only. Under ZeRO-3 the
backbone's weights are partitioned and gathered collectively as each layer runs, so every
process must run as many forward passes as the busiest one (`equal_forwards`): the others
pad with one-token passes whose output is dropped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medusa_train.training.row_shards import build_shards, length_batches, padded, read_index, read_meta, span_offsets


def cache_key(model_name: str, dataset_fingerprint: str, dtype: str, hidden_size: int, indices=None) -> str:
    text = json.dumps([model_name, dataset_fingerprint, dtype, hidden_size, None if indices is None else list(indices)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class HiddenCache:
    """Read-only view: cache[row] -> (L, H) float tensor of post-norm last hidden states."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.num_shards = read_meta(self.path)["num_shards"]
        self.where = read_index(self.path, self.num_shards)  # row -> (shard, offset, length)
        self.shards = [np.load(self.path / f"shard{s}.npy", mmap_mode="r") for s in range(self.num_shards)]

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, row: int) -> torch.Tensor:
        shard, offset, length = self.where[row]
        return torch.from_numpy(np.array(self.shards[shard][offset : offset + length], dtype=np.float32))


@torch.no_grad()
def build_hidden_cache(
    path: Path,
    key: str,
    rows: list[list[int]],
    decoder: torch.nn.Module,
    hidden_size: int,
    accelerator,
    batch_tokens: int = 4096,
    dtype: str = "float16",
    desc: str = "caching hidden states",
    indices: list[int] | None = None,
    equal_forwards: bool = False,
) -> HiddenCache:
    """Run the frozen decoder once over rows `indices` (default: all) and store last hidden states.

    `key` must identify the model, the rows and `indices`; a cache with another key is rebuilt.
    """
    path = Path(path)

    def write_shard(mine: list[int]) -> None:
        batches = length_batches([len(rows[i]) for i in mine], batch_tokens)
        _write_shard(path, accelerator.process_index, mine, batches, rows, decoder, hidden_size, accelerator.device,
                     np.dtype(dtype), desc, accelerator.is_local_main_process)
        if equal_forwards:
            from medusa_train.training.distributed import max_over_processes

            one = torch.zeros(1, 1, dtype=torch.long, device=accelerator.device)
            for _ in range(max_over_processes(accelerator, len(batches)) - len(batches)):
                decoder(input_ids=one, attention_mask=torch.ones_like(one))

    build_shards(path, key, len(rows), indices, accelerator, write_shard, {"rows": len(rows)})
    return HiddenCache(path)


def _write_shard(path, shard, mine, batches, rows, decoder, hidden_size, device, np_dtype, desc, show):
    lengths = [len(rows[i]) for i in mine]
    total = sum(lengths)
    tmp = path / f".shard{shard}.npy.tmp"
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=(total, hidden_size))
    index = np.zeros((len(mine), 3), dtype=np.int64)
    offsets = span_offsets(lengths)
    bar = tqdm(total=total, desc=desc, unit="tok", disable=not show)
    for batch in batches:
        ids, mask = padded([rows[mine[j]] for j in batch])
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # (B, T, H)
        hidden = hidden.float().cpu().numpy()
        for b, j in enumerate(batch):
            store[offsets[j] : offsets[j] + lengths[j]] = hidden[b, : lengths[j]]
            index[j] = (mine[j], offsets[j], lengths[j])
        bar.update(sum(lengths[j] for j in batch))
    bar.close()
    store.flush()
    del store
    tmp.replace(path / f"shard{shard}.npy")
    np.save(path / f"shard{shard}_index.npy", index)
