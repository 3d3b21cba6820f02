"""Where a training run stands, and the bookkeeping every recipe does around its own
forward / backward: count the optimizer step, decide what is due (log, eval, checkpoint,
stop), save the run with its optimizer and scheduler, and read it back on resume.

A recipe keeps a `Progress`, advances it with `finish_step` after its backward passes,
and checkpoints it with `save_training_checkpoint`; `resume_progress` restores it. What
the model writes into a checkpoint (heads, an adapter, a draft's weights) stays the
recipe's: it passes `write_weights`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medusa_train.training.checkpoint import (
    begin_checkpoint,
    checkpoint_tmp_dir,
    finish_checkpoint,
    read_state,
    save_checkpoint_dir,
)
from medusa_train.training.distributed import ENGINE_DIR, is_deepspeed, save_engine_state, save_heads
from medusa_train.training.loop import take_step

OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"


@dataclass
class Progress:
    """The counters a checkpoint keeps (step, skipped batches, eval history, per-step
    losses) and, not kept, this process's work in this run (for stop_after_steps and the
    throughput in the summary)."""

    step: int = 0
    skipped: int = 0
    history: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    steps_this_run: int = 0
    train_time: float = 0.0
    train_tokens: int = 0

    def state(self) -> dict:
        """The trainer state of a checkpoint (finish_checkpoint adds the step)."""
        return {"skipped_batches": self.skipped, "history": self.history, "losses": self.losses}

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / max(self.train_time, 1e-9)


def keep_training(run: Progress, train) -> bool:
    """Until train.max_steps, or until this run has done train.stop_after_steps (a planned
    interruption: the recipe then checkpoints and returns)."""
    if train.stop_after_steps is not None and run.steps_this_run >= train.stop_after_steps:
        return False
    return run.step < train.max_steps


def finish_step(run: Progress, loss: float, grad_norm: float, optimizer, scheduler, on_nan: str, output_dir: Path,
                started: float) -> None:
    """Step the optimizer unless the loss is non-finite (see loop.take_step), then count the
    step, its loss and the time since `started`."""
    if take_step(loss, grad_norm, run.step, on_nan, output_dir, run.skipped):
        optimizer.step()  # under DeepSpeed a no-op: the engine stepped in backward
    else:
        run.skipped += 1
    # The schedule follows the step count, skipped batches included, so that a resumed
    # run and an uninterrupted one see the same learning rates.
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.steps_this_run += 1
    run.losses.append(round(loss, 5))
    run.train_time += time.time() - started


def log_due(step: int, train) -> bool:
    return step % train.log_every == 0 or step == train.max_steps


def periodic_eval_and_save(step: int, train, evaluate_and_log: Callable[[int], object],
                           save: Callable[[int], None]) -> None:
    """Evaluate every train.eval_every steps and checkpoint every train.save_every, except at
    train.max_steps: the final evaluation and save follow the loop."""
    if step % train.eval_every == 0 and step < train.max_steps:
        evaluate_and_log(step)
    if step % train.save_every == 0 and step < train.max_steps:
        save(step)


def save_training_checkpoint(accelerator, output_dir: Path, step: int, state: dict, optimizer, scheduler,
                             write_weights: Callable[[Path], None], keep: int, heads=None) -> None:
    """Checkpoint `step` (every process calls this). Plain path: the main process writes
    `write_weights(folder)`, the optimizer and scheduler states and `state`. Under DeepSpeed
    the engine holds the trainable weights and optimizer instead, and `heads` are written
    gathered: see save_engine_checkpoint."""
    if is_deepspeed(accelerator):
        save_engine_checkpoint(accelerator, output_dir, step, state, scheduler, heads, keep)
        return
    if accelerator.is_main_process:
        def write(folder: Path) -> None:
            write_weights(folder)
            torch.save(optimizer.state_dict(), folder / OPTIMIZER_NAME)
            torch.save(scheduler.state_dict(), folder / SCHEDULER_NAME)
        save_checkpoint_dir(output_dir, step, write, state, keep=keep)
    accelerator.wait_for_everyone()


def save_engine_checkpoint(accelerator, output_dir: Path, step: int, state: dict, scheduler, heads, keep: int) -> None:
    """Checkpoint `step` under DeepSpeed (collective): every process writes its optimizer shard
    (and, under ZeRO-3, its trainable weights); the main one the gathered heads and the rest."""
    if accelerator.is_main_process:
        begin_checkpoint(output_dir, step)
    accelerator.wait_for_everyone()  # the folder exists before any process writes into it
    tmp = checkpoint_tmp_dir(output_dir, step)
    save_engine_state(accelerator, tmp / ENGINE_DIR)
    save_heads(accelerator, heads, tmp / "heads")
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_NAME)
        finish_checkpoint(output_dir, step, tmp, state, keep=keep)
    accelerator.wait_for_everyone()


def resume_progress(checkpoint: Path, scheduler, accelerator) -> Progress:
    """The scheduler state and the counters saved in `checkpoint`. The recipe restores the
    weights and optimizer itself (plain path: OPTIMIZER_NAME; DeepSpeed: load_engine_state)."""
    state = read_state(checkpoint)
    scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER_NAME, weights_only=True))
    accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return Progress(step=state["step"], skipped=state["skipped_batches"], history=state["history"],
                    losses=state["losses"])
