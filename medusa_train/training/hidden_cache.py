"""Frozen-backbone hidden states computed once, stored on disk, read memory-mapped.

With a frozen backbone the last hidden state of every training token never changes, so
Medusa-1 needs the backbone forward only once per row; every later visit reads it from
the cache. Each process writes its own shard (rows i with i % world == rank) as a
`.npy` file plus an index of (row, offset, length), so `accelerate launch` builds the
cache in parallel; every process then maps all shards read-only. Under ZeRO-3 the
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

META_NAME = "meta.json"


def cache_key(model_name: str, dataset_fingerprint: str, dtype: str, hidden_size: int, indices=None) -> str:
    text = json.dumps([model_name, dataset_fingerprint, dtype, hidden_size, None if indices is None else list(indices)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class HiddenCache:
    """Read-only view: cache[row] -> (L, H) float tensor of post-norm last hidden states."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta = json.loads((self.path / META_NAME).read_text())
        self.num_shards = meta["num_shards"]
        self.where: dict[int, tuple[int, int, int]] = {}  # row -> (shard, offset, length)
        self.shards = []
        for s in range(self.num_shards):
            self.shards.append(np.load(self.path / f"shard{s}.npy", mmap_mode="r"))
            index = np.load(self.path / f"shard{s}_index.npy")
            for row, offset, length in index:
                self.where[int(row)] = (s, int(offset), int(length))

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, row: int) -> torch.Tensor:
        shard, offset, length = self.where[row]
        return torch.from_numpy(np.array(self.shards[shard][offset : offset + length], dtype=np.float32))


def is_complete(path: Path, key: str) -> bool:
    meta = Path(path) / META_NAME
    return meta.is_file() and json.loads(meta.read_text()).get("key") == key


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
    rank, world = accelerator.process_index, accelerator.num_processes
    if not is_complete(path, key):
        path.mkdir(parents=True, exist_ok=True)
        indices = range(len(rows)) if indices is None else indices
        mine = [i for n, i in enumerate(indices) if n % world == rank]
        batches = _batches([len(rows[i]) for i in mine], batch_tokens)
        _write_shard(path, rank, mine, batches, rows, decoder, hidden_size, accelerator.device,
                     np.dtype(dtype), desc, accelerator.is_local_main_process)
        if equal_forwards:
            from medusa_train.training.distributed import max_over_processes

            one = torch.zeros(1, 1, dtype=torch.long, device=accelerator.device)
            for _ in range(max_over_processes(accelerator, len(batches)) - len(batches)):
                decoder(input_ids=one, attention_mask=torch.ones_like(one))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (path / META_NAME).write_text(json.dumps({"key": key, "num_shards": world, "rows": len(rows)}))
        accelerator.wait_for_everyone()
    return HiddenCache(path)


def _batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Positions into `lengths`, sorted by length (each batch pads little) and cut into
    batches of ~batch_tokens padded tokens."""
    order = sorted(range(len(lengths)), key=lambda j: lengths[j])
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and lengths[order[end]] * (end - start + 1) <= batch_tokens:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def _write_shard(path, shard, mine, batches, rows, decoder, hidden_size, device, np_dtype, desc, show):
    lengths = [len(rows[i]) for i in mine]
    total = sum(lengths)
    tmp = path / f".shard{shard}.npy.tmp"
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=(total, hidden_size))
    index = np.zeros((len(mine), 3), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if mine else []
    bar = tqdm(total=total, desc=desc, unit="tok", disable=not show)
    for batch in batches:
        longest = max(lengths[j] for j in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for b, j in enumerate(batch):
            ids[b, : lengths[j]] = torch.tensor(rows[mine[j]])
            mask[b, : lengths[j]] = 1
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
