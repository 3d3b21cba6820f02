"""Pieces that every training recipe repeats: the tokenised train/eval splits, which rows
a process reads at a step, what to do with a non-finite loss, heads restored from a
checkpoint."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from medusa_train.data import (
    load_conversations,
    tokenize_conversations,
    train_eval_split,
)
from medusa_train.data.self_distill import warn_other_models_answers
from medusa_train.heads import MedusaHeads
from medusa_train.training.batching import global_batch, shard
from medusa_train.training.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def micro_batch_rows(num_rows: int, micro: int, accum: int, seed: int, step: int, rank: int,
                     world: int) -> list[list[int]]:
    """This process's rows of global batch `step`, one list per micro-batch (accum of them)."""
    rows = global_batch(num_rows, micro * accum * world, seed, step)
    return [shard(rows[i * micro * world:(i + 1) * micro * world], rank, world) for i in range(accum)]


def take_step(loss: float, grad_norm: float, step: int, on_nan: str, output_dir: Path, skipped: int) -> bool:
    """True when the loss and gradient norm are finite. Otherwise on_nan=stop raises
    NonFiniteLossError naming the step (1-based) and the last good checkpoint, and
    on_nan=skip logs the batch as skipped (the caller counts it) and returns False."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return True
    if on_nan == "stop":
        raise NonFiniteLossError(
            f"loss is {loss} (grad norm {grad_norm}) at step {step + 1}: stopping. "
            f"The last good checkpoint is {latest_checkpoint(output_dir)}; set train.on_nan=skip to skip "
            "such batches, or lower train.lr"
        )
    log.warning("non-finite loss at step %d: batch skipped (%d so far)", step + 1, skipped + 1)
    return False


def restore_heads(heads: MedusaHeads, folder: Path) -> None:
    """Load the heads saved in `folder` into `heads` in place (weights and vocab_map), on
    whatever device `heads` is (read on the CPU: safetensors rejects names like cpu:0)."""
    restored = MedusaHeads.from_pretrained(folder)
    heads.load_state_dict(restored.state_dict())
    heads.vocab_map = restored.vocab_map.to(heads.vocab_map.device)


def tokenized_splits(data, tokenizer, accelerator, model_name: str | None = None):
    """(train, eval) datasets with `input_ids` and `labels` (assistant tokens only) from a
    `data` config node; the eval split is cut to data.eval_max_rows. With `model_name`, warns
    about self-distilled sources that another model wrote."""
    if model_name is not None and accelerator.is_main_process:
        warn_other_models_answers(list(data.sources), str(model_name))
    with accelerator.main_process_first():  # one process tokenises, the others hit the datasets cache
        conversations = load_conversations(list(data.sources), format=data.format, split=data.split,
                                           max_rows=data.max_rows)
        tokenized = tokenize_conversations(conversations, tokenizer, data.max_length)
    train_ds, eval_ds = train_eval_split(tokenized, data.eval_fraction, data.seed)
    return train_ds, eval_ds.select(range(min(len(eval_ds), data.eval_max_rows)))
