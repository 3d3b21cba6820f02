"""The on-disk layout and build protocol that training/hidden_cache.py and
draft/target_cache.py share.

A cache is a folder of per-process shards: process `rank` stores the rows i with
n % world == rank of the rows it was asked for (n: i's position among them), so
`accelerate launch` builds it in parallel, and `shard{s}_index.npy` maps each of its rows
to (row, offset, length) in that shard's arrays. `meta.json`, written last and atomically
by the main process, carries the key (model, data, rows, settings): a folder without it,
or with another key, is rebuilt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medusa_train.training.checkpoint import atomic_write

META_NAME = "meta.json"


def is_complete(path: Path, key: str) -> bool:
    meta = Path(path) / META_NAME
    return meta.is_file() and json.loads(meta.read_text()).get("key") == key


def build_shards(path: Path, key: str, num_rows: int, indices, accelerator,
                 write_shard: Callable[[list[int]], None], meta: dict) -> None:
    """Unless `path` already holds the cache for `key`: every process calls
    `write_shard(mine)` with its share of rows `indices` (None: all `num_rows`), then the
    main process writes meta.json ({key, num_shards, **meta}). Collective."""
    path = Path(path)
    if is_complete(path, key):
        return
    rank, world = accelerator.process_index, accelerator.num_processes
    path.mkdir(parents=True, exist_ok=True)
    indices = range(num_rows) if indices is None else indices
    write_shard([i for n, i in enumerate(indices) if n % world == rank])
    accelerator.wait_for_everyone()  # every shard is on disk before meta.json says the cache is complete
    if accelerator.is_main_process:
        text = json.dumps({"key": key, "num_shards": world, **meta})
        atomic_write(path / META_NAME, lambda tmp: tmp.write_text(text))
    accelerator.wait_for_everyone()


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META_NAME).read_text())


def read_index(path: Path, num_shards: int) -> dict[int, tuple[int, int, int]]:
    """row -> (shard, offset, length) over every shard's index."""
    where = {}
    for s in range(num_shards):
        for row, offset, length in np.load(Path(path) / f"shard{s}_index.npy"):
            where[int(row)] = (s, int(offset), int(length))
    return where


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
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


def span_offsets(lengths: list[int]):
    """Where each of consecutive spans of `lengths` starts in a shard's arrays."""
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths else []


def padded(seqs: list[list[int]], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) right-padded token ids and (B, T) attention mask of `seqs`."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), fill, dtype=torch.long)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
    return ids, mask
