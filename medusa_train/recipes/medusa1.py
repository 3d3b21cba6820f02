"""Medusa-1: train decoding heads on a frozen backbone.

    python -m medusa_train +recipe=medusa1
    accelerate launch --config_file recipes/accelerate_configs/cpu_ddp.yaml -m medusa_train +recipe=medusa1
    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml -m medusa_train \
        --config-dir recipes/llama-3-70b +recipe=medusa1

Under DeepSpeed (recipes/accelerate_configs/zero*.yaml) the engine takes the step inside
backward and shards the optimizer state; under ZeRO-3 the frozen backbone and the heads are
one engine module, partitioned over the processes and gathered layer by layer as they run
(see medusa_train/training/distributed.py).

Reads top to bottom: set-up, data, model, hidden-state cache, optimiser, resume, the
train loop (forward / backward / step / log / save), final evaluation and summary.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from medusa_train.base_model import load_base_model, load_tokenizer
from medusa_train.data import collate
from medusa_train.loss import IGNORE_INDEX, head_weights, medusa_loss, topk_correct
from medusa_train.model import build_heads
from medusa_train.training.batching import global_batch
from medusa_train.training.checkpoint import latest_checkpoint
from medusa_train.training.distributed import (
    ENGINE_DIR,
    begin_micro_batch,
    check_supported,
    compute_dtype,
    end_step,
    fill_deepspeed_config,
    full_shape,
    gathered,
    grad_norm_value,
    is_deepspeed,
    is_zero3,
    load_engine_state,
    loss_scale,
    no_sync,
    register_shared_weight,
    save_heads,
)
from medusa_train.training.head_batches import frequent_tokens, head_target_counts, pad_labels, selected_logits
from medusa_train.training.head_eval import eval_metrics, evaluate_heads, format_summary
from medusa_train.training.hidden_cache import build_hidden_cache, cache_key
from medusa_train.training.loop import (
    NonFiniteLossError,  # noqa: F401  (raised by finish_step; part of this recipe's interface)
    micro_batch_rows,
    restore_heads,
    tokenized_splits,
)
from medusa_train.training.progress import (OPTIMIZER_NAME, Progress, finish_step, keep_training, log_due,
                                            periodic_eval_and_save, resume_progress, save_training_checkpoint)
from medusa_train.training.run_dir import prepare_output_dir
from medusa_train.training.setup import make_accelerator
from medusa_train.training.tracking import init_tracking, tracker_name

log = logging.getLogger(__name__)


def main(cfg: DictConfig, end_training: bool = True) -> dict:
    """end_training=False keeps the process group up for a recipe that trains on after this one (medusa2)."""
    start_time = time.time()
    # ---- set-up -------------------------------------------------------------------------
    accelerator = make_accelerator(cfg.train.mixed_precision, tracker_name(cfg))
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    prepare_output_dir(output_dir, resume=cfg.resume, overwrite=cfg.overwrite, accelerator=accelerator)
    init_tracking(accelerator, cfg)
    world = accelerator.num_processes
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    fill_deepspeed_config(accelerator, micro, accum, cfg.train.max_grad_norm)  # no-op without DeepSpeed
    check_supported(accelerator, cfg.train.on_nan)
    zero3 = is_zero3(accelerator)

    # ---- data ---------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision)
    train_ds, eval_ds = tokenized_splits(cfg.data, tokenizer, accelerator, cfg.model.name_or_path)
    train_rows, train_labels = train_ds["input_ids"], train_ds["labels"]
    eval_rows, eval_labels = eval_ds["input_ids"], eval_ds["labels"]

    # ---- model --------------------------------------------------------------------------
    base = load_base_model(cfg.model.name_or_path, cfg.model.dtype, accelerator.device,
                           cfg.model.trust_remote_code, cfg.model.revision)
    base.requires_grad_(False)
    if base.dtype != torch.float32 and accelerator.mixed_precision == "no":
        raise ValueError(f"the base model is {base.dtype} but train.mixed_precision is off: set "
                         "train.mixed_precision=bf16 (heads train in fp32 under autocast) or model.dtype=float32")
    decoder, lm_head = base.get_decoder(), base.get_output_embeddings()
    vocab_size, hidden_size = full_shape(lm_head.weight)  # ZeRO-3 (zero3_init_flag) loads it partitioned
    vocab_map = None
    if cfg.heads.truncated_vocab_size:
        vocab_map = frequent_tokens(train_labels, vocab_size, cfg.heads.truncated_vocab_size)
    with gathered([lm_head.weight]):  # own projections copy the whole base lm_head
        heads = build_heads(base, cfg.model.name_or_path, num_heads=cfg.heads.num_heads,
                            num_layers=cfg.heads.num_layers, lm_head=cfg.heads.lm_head,
                            truncated_vocab_size=cfg.heads.truncated_vocab_size, vocab_map=vocab_map)
    heads.float()  # trainable parameters stay fp32; autocast (DeepSpeed: its bf16 mode) computes in bf16 on GPU
    K = heads.num_heads
    weights = head_weights(K, cfg.train.decay, cfg.train.heads_coefficient)

    # ---- optimiser ----------------------------------------------------------------------
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=cfg.train.max_steps)
    if zero3:
        # One engine module: ZeRO-3 partitions the frozen backbone with the heads and gathers
        # each layer's weights when it runs (the cache below runs the backbone through it).
        heads_model, optimizer = accelerator.prepare(HeadsOnBackbone(base, heads), optimizer)
        if heads.lm_heads is None:
            register_shared_weight(accelerator, heads, lm_head.weight)
    else:
        heads_model, optimizer = accelerator.prepare(heads, optimizer)
    dtype = compute_dtype(accelerator, heads)  # DeepSpeed: the engine's precision; plain: None (autocast)

    # ---- hidden-state cache -------------------------------------------------------------
    global_size = micro * accum * world
    train_cache = eval_cache = None
    if cfg.train.hidden_cache:
        # Only the rows the run will visit: a run shorter than an epoch caches no more
        # than it would have computed anyway, and every later epoch is free.
        visited = sorted({i for s in range(cfg.train.max_steps)
                          for i in global_batch(len(train_rows), global_size, cfg.seed, s)})
        for split, rows, fp, indices in [("train", train_rows, train_ds._fingerprint, visited),
                                         ("eval", eval_rows, eval_ds._fingerprint, None)]:
            key = cache_key(str(cfg.model.name_or_path), fp, cfg.train.hidden_cache_dtype, hidden_size, indices)
            cache = build_hidden_cache(output_dir / "hidden_cache" / split, key, rows, decoder, hidden_size,
                                       accelerator, dtype=cfg.train.hidden_cache_dtype,
                                       desc=f"caching {split} hidden states", indices=indices,
                                       equal_forwards=zero3)
            train_cache, eval_cache = (cache, eval_cache) if split == "train" else (train_cache, cache)

    def batch_hidden(indices: list[int], rows, labels, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H) hidden states and (B, T) labels for rows `indices`, right-padded."""
        batch = collate([{"input_ids": rows[i], "labels": labels[i]} for i in indices], tokenizer.pad_token_id)
        if cache is None:
            with torch.no_grad():
                hidden = decoder(input_ids=batch["input_ids"].to(accelerator.device),
                                 attention_mask=batch["attention_mask"].to(accelerator.device)).last_hidden_state
        else:
            hidden = torch.nn.utils.rnn.pad_sequence([cache[i] for i in indices], batch_first=True)
        return hidden.to(accelerator.device, dtype), batch["labels"].to(accelerator.device)  # (B, T, H), (B, T)

    # ---- resume -------------------------------------------------------------------------
    run = Progress()
    checkpoint = latest_checkpoint(output_dir) if cfg.resume else None
    if checkpoint is not None:
        if is_deepspeed(accelerator):  # heads and this process's optimizer shard
            load_engine_state(accelerator, checkpoint / ENGINE_DIR)
        else:
            restore_heads(heads, checkpoint / "heads")
            optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_NAME, weights_only=True))
        run = resume_progress(checkpoint, scheduler, accelerator)

    def evaluate_and_log(at: int) -> dict:
        result = evaluate_heads(heads, lm_head, eval_rows, eval_labels, eval_cache,
                                batch_hidden, cfg.train.micro_batch_size, accelerator, equal_forwards=zero3)
        run.history.append({"step": at, "eval": result})
        accelerator.log(eval_metrics(result), step=at)
        heads_model.train()  # evaluate_heads left the heads in eval mode
        return result

    def save(step_now: int) -> None:
        save_training_checkpoint(
            accelerator, output_dir, step_now, run.state(), optimizer, scheduler,
            write_weights=lambda folder: accelerator.unwrap_model(heads_model).save_pretrained(folder / "heads"),
            keep=cfg.train.keep_checkpoints, heads=heads)

    if not run.history:  # the untrained heads: the "before" of before/after
        evaluate_and_log(0)
    untrained = run.history[0]["eval"]

    # ---- train --------------------------------------------------------------------------
    bar = tqdm(total=cfg.train.max_steps, initial=run.step, desc="medusa1",
               disable=not accelerator.is_local_main_process)
    heads_model.train()
    while keep_training(run, cfg.train):
        t0 = time.time()
        micro_rows = micro_batch_rows(len(train_rows), micro, accum, cfg.seed, run.step, accelerator.process_index,
                                      world)
        micro_labels = [pad_labels([train_labels[i] for i in r]) for r in micro_rows]
        # Normalise by the global batch's target count per head so that any split over
        # micro-batches and processes gives the same gradient as one big batch.
        counts = sum(head_target_counts(heads, lab, K) for lab in micro_labels)
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum")
        ce_sums = torch.zeros(K, device=accelerator.device)
        hits = torch.zeros(K, device=accelerator.device)
        for i, r in enumerate(micro_rows):
            hidden, labels = batch_hidden(r, train_rows, train_labels, train_cache)
            begin_micro_batch(accelerator, i, accum)  # DeepSpeed steps after the last one
            sync = no_sync(accelerator, heads_model) if i < accum - 1 else nullcontext()
            with sync, accelerator.autocast():
                logits, targets = selected_logits(heads_model, heads, lm_head, hidden, labels, K)
                loss, ce, _ = medusa_loss(logits, targets, weights, counts)
                # DDP (and DeepSpeed) average gradients over processes, DeepSpeed also over
                # micro-batches; the global normaliser already did both.
                accelerator.backward(loss * loss_scale(accelerator, accum))
            ce_sums += ce
            hits += topk_correct(logits.detach(), targets, ks=(1,))[1]
            run.train_tokens += int((labels != IGNORE_INDEX).sum())
        ce_sums = accelerator.reduce(ce_sums, reduction="sum")
        hits = accelerator.reduce(hits, reduction="sum")
        end_step(accelerator)
        # DeepSpeed clipped inside its step (gradient_clipping) and reports the norm here.
        grad_norm = grad_norm_value(accelerator.clip_grad_norm_(heads_model.parameters(), cfg.train.max_grad_norm))
        total_loss = float((ce_sums / counts.clamp(min=1) * ce_sums.new_tensor(weights)).sum())
        finish_step(run, total_loss, grad_norm, optimizer, scheduler, cfg.train.on_nan, output_dir, started=t0)
        per_head = (ce_sums / counts.clamp(min=1)).tolist()
        top1 = (hits / counts.clamp(min=1)).tolist()
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss:.3f}", head1_top1=f"{top1[0]:.3f}")
        if log_due(run.step, cfg.train):
            metrics = {"train/loss": total_loss, "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": grad_norm, "train/tokens_per_s": run.tokens_per_s}
            for k in range(K):
                metrics[f"train/head{k + 1}/loss"] = per_head[k]
                metrics[f"train/head{k + 1}/top1"] = top1[k]
            accelerator.log(metrics, step=run.step)
        periodic_eval_and_save(run.step, cfg.train, evaluate_and_log, save)
    bar.close()

    if run.step < cfg.train.max_steps:  # stopped early on purpose (stop_after_steps)
        save(run.step)
        if end_training:
            accelerator.end_training()
        return {"stopped_at": run.step}

    # ---- final evaluation, save, summary ------------------------------------------------
    final = evaluate_and_log(run.step)
    heads_dir = output_dir / "heads"
    summary = {
        "recipe": cfg.recipe.name,
        "base_model": str(cfg.model.name_or_path),
        "heads_dir": str(heads_dir),
        "num_heads": K,
        "steps": run.step,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "hidden_cache": bool(cfg.train.hidden_cache),
        "skipped_batches": run.skipped,
        "time_s": round(time.time() - start_time, 1),
        "train_loop_s_this_run": round(run.train_time, 1),
        "train_tokens_per_s_this_run": round(run.train_tokens * world / max(run.train_time, 1e-9), 1),
        "train_loss": run.losses,
        "eval_untrained": untrained,
        "eval_final": final,
    }
    save_heads(accelerator, heads, heads_dir)  # the same files whatever the topology (ZeRO-3: gathered)
    if accelerator.is_main_process:
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        print(format_summary(summary))
    accelerator.wait_for_everyone()
    if end_training:
        accelerator.end_training()
    return summary


class HeadsOnBackbone(nn.Module):
    """The frozen backbone and the heads as one module, for ZeRO-3: the engine partitions
    both over the processes and gathers a layer's weights only while it runs, so a backbone
    too large for one GPU still computes hidden states. forward is the heads' forward."""

    def __init__(self, base: nn.Module, heads: nn.Module):
        super().__init__()
        self.base = base
        self.heads = heads

    def forward(self, hidden: torch.Tensor, base_lm_head: nn.Module | None = None) -> torch.Tensor:
        return self.heads(hidden, base_lm_head)  # (K, N, V')
