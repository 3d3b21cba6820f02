"""Medusa-1: train decoding heads on a frozen backbone.

    python -m medusa_train +recipe=medusa1
    accelerate launch --config_file recipes/accelerate_configs/cpu_ddp.yaml -m medusa_train +recipe=medusa1

Reads top to bottom: set-up, data, model, hidden-state cache, optimiser, resume, the
train loop (forward / backward / step / log / save), final evaluation and summary.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import get_scheduler

from medusa_train.base_model import load_base_model, load_tokenizer
from medusa_train.data import load_conversations, tokenize_conversations, train_eval_split
from medusa_train.heads import MedusaHeads
from medusa_train.loss import IGNORE_INDEX, head_targets, head_weights, medusa_loss, topk_correct
from medusa_train.model import build_heads
from medusa_train.training.batching import global_batch, shard
from medusa_train.training.checkpoint import latest_checkpoint, read_state, save_checkpoint_dir
from medusa_train.training.hidden_cache import build_hidden_cache, cache_key
from medusa_train.training.run_dir import prepare_output_dir
from medusa_train.training.tracking import init_tracking, tracker_name

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def main(cfg: DictConfig) -> dict:
    start_time = time.time()
    # ---- set-up -------------------------------------------------------------------------
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(cfg.train.mixed_precision),
        log_with=tracker_name(cfg),
        # Without an accelerator, processes started by `accelerate launch` join a gloo
        # group on the CPU (recipes/accelerate_configs/cpu_ddp.yaml).
        cpu=not torch.accelerator.is_available(),
    )
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    prepare_output_dir(output_dir, resume=cfg.resume, overwrite=cfg.overwrite, accelerator=accelerator)
    init_tracking(accelerator, cfg)
    world = accelerator.num_processes

    # ---- data ---------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision)
    with accelerator.main_process_first():  # one process tokenises, the others hit the datasets cache
        conversations = load_conversations(list(cfg.data.sources), format=cfg.data.format, split=cfg.data.split,
                                           max_rows=cfg.data.max_rows)
        tokenized = tokenize_conversations(conversations, tokenizer, cfg.data.max_length)
    train_ds, eval_ds = train_eval_split(tokenized, cfg.data.eval_fraction, cfg.data.seed)
    eval_ds = eval_ds.select(range(min(len(eval_ds), cfg.data.eval_max_rows)))
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
    vocab_size, hidden_size = lm_head.weight.shape
    vocab_map = None
    if cfg.heads.truncated_vocab_size:
        vocab_map = frequent_tokens(train_labels, vocab_size, cfg.heads.truncated_vocab_size)
    heads = build_heads(base, cfg.model.name_or_path, num_heads=cfg.heads.num_heads,
                        num_layers=cfg.heads.num_layers, lm_head=cfg.heads.lm_head,
                        truncated_vocab_size=cfg.heads.truncated_vocab_size, vocab_map=vocab_map)
    heads.float()  # trainable parameters stay fp32; autocast handles bf16 compute on GPU
    K = heads.num_heads
    weights = head_weights(K, cfg.train.decay, cfg.train.heads_coefficient)

    # ---- hidden-state cache -------------------------------------------------------------
    def backbone_hidden(rows: list[list[int]]) -> torch.Tensor:
        ids, mask = _pad(rows, tokenizer.pad_token_id)
        with torch.no_grad():
            return decoder(input_ids=ids.to(accelerator.device),
                           attention_mask=mask.to(accelerator.device)).last_hidden_state  # (B, T, H)

    train_cache = eval_cache = None
    if cfg.train.hidden_cache:
        for split, rows, fp in [("train", train_rows, train_ds._fingerprint), ("eval", eval_rows, eval_ds._fingerprint)]:
            key = cache_key(str(cfg.model.name_or_path), fp, cfg.train.hidden_cache_dtype, hidden_size)
            cache = build_hidden_cache(output_dir / "hidden_cache" / split, key, rows, decoder, hidden_size,
                                       accelerator, dtype=cfg.train.hidden_cache_dtype,
                                       desc=f"caching {split} hidden states")
            train_cache, eval_cache = (cache, eval_cache) if split == "train" else (train_cache, cache)

    def batch_hidden(indices: list[int], rows, labels, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H) hidden states and (B, T) labels for rows `indices`, right-padded."""
        lab = _pad_labels([labels[i] for i in indices])
        if cache is None:
            hidden = backbone_hidden([rows[i] for i in indices])
        else:
            hidden = torch.nn.utils.rnn.pad_sequence([cache[i] for i in indices], batch_first=True)
        return hidden.to(accelerator.device), lab.to(accelerator.device)

    # ---- optimiser ----------------------------------------------------------------------
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=cfg.train.max_steps)
    heads_model, optimizer = accelerator.prepare(heads, optimizer)

    # ---- resume -------------------------------------------------------------------------
    step, skipped, history, losses = 0, 0, [], []
    checkpoint = latest_checkpoint(output_dir) if cfg.resume else None
    if checkpoint is not None:
        state = read_state(checkpoint)
        restored = MedusaHeads.from_pretrained(checkpoint / "heads", device=accelerator.device)
        accelerator.unwrap_model(heads_model).load_state_dict(restored.state_dict())
        accelerator.unwrap_model(heads_model).vocab_map = restored.vocab_map
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
        step, skipped, history, losses = state["step"], state["skipped_batches"], state["history"], state["losses"]
        accelerator.print(f"resumed from {checkpoint} at step {step}")

    def evaluate() -> dict:
        return evaluate_heads(accelerator.unwrap_model(heads_model), lm_head, eval_rows, eval_labels, eval_cache,
                              batch_hidden, cfg.train.micro_batch_size, accelerator)

    def save(step_now: int) -> None:
        if accelerator.is_main_process:
            def write(folder: Path) -> None:
                accelerator.unwrap_model(heads_model).save_pretrained(folder / "heads")
                torch.save(optimizer.state_dict(), folder / "optimizer.pt")
                torch.save(scheduler.state_dict(), folder / "scheduler.pt")
            save_checkpoint_dir(output_dir, step_now, write,
                                {"skipped_batches": skipped, "history": history, "losses": losses},
                                keep=cfg.train.keep_checkpoints)
        accelerator.wait_for_everyone()

    untrained = history[0]["eval"] if history else None
    if untrained is None:
        untrained = evaluate()
        history.append({"step": 0, "eval": untrained})
        accelerator.log(_eval_metrics(untrained), step=0)

    # ---- train --------------------------------------------------------------------------
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    global_size = micro * accum * world
    train_time, train_tokens, steps_this_run = 0.0, 0, 0
    bar = tqdm(total=cfg.train.max_steps, initial=step, desc="medusa1", disable=not accelerator.is_local_main_process)
    heads_model.train()
    while step < cfg.train.max_steps:
        if cfg.train.stop_after_steps is not None and steps_this_run >= cfg.train.stop_after_steps:
            break
        t0 = time.time()
        rows = global_batch(len(train_rows), global_size, cfg.seed, step)
        micro_rows = [shard(rows[i * micro * world:(i + 1) * micro * world], accelerator.process_index, world)
                      for i in range(accum)]
        micro_labels = [_pad_labels([train_labels[i] for i in r]) for r in micro_rows]
        # Normalise by the global batch's target count per head so that any split over
        # micro-batches and processes gives the same gradient as one big batch.
        counts = sum(_head_target_counts(accelerator.unwrap_model(heads_model), lab, K) for lab in micro_labels)
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum")
        ce_sums = torch.zeros(K, device=accelerator.device)
        hits = torch.zeros(K, device=accelerator.device)
        for i, r in enumerate(micro_rows):
            hidden, labels = batch_hidden(r, train_rows, train_labels, train_cache)
            sync = accelerator.no_sync(heads_model) if i < accum - 1 else nullcontext()
            with sync, accelerator.autocast():
                logits, targets = _selected_logits(heads_model, accelerator.unwrap_model(heads_model), lm_head,
                                                   hidden, labels, K)
                loss, ce, _ = medusa_loss(logits, targets, weights, counts)
                # DDP averages gradients over processes; the global normaliser already did.
                accelerator.backward(loss * world)
            ce_sums += ce
            hits += topk_correct(logits.detach(), targets, ks=(1,))[1]
            train_tokens += int((labels != IGNORE_INDEX).sum())
        ce_sums = accelerator.reduce(ce_sums, reduction="sum")
        hits = accelerator.reduce(hits, reduction="sum")
        grad_norm = accelerator.clip_grad_norm_(heads_model.parameters(), cfg.train.max_grad_norm)
        total_loss = float((ce_sums / counts.clamp(min=1) * ce_sums.new_tensor(weights)).sum())
        if not (math.isfinite(total_loss) and math.isfinite(float(grad_norm))):
            optimizer.zero_grad(set_to_none=True)
            if cfg.train.on_nan == "stop":
                raise NonFiniteLossError(
                    f"loss is {total_loss} (grad norm {float(grad_norm)}) at step {step + 1}: stopping. "
                    f"The last good checkpoint is {latest_checkpoint(output_dir)}; set train.on_nan=skip to skip "
                    "such batches, or lower train.lr"
                )
            skipped += 1
            log.warning("non-finite loss at step %d: batch skipped (%d so far)", step + 1, skipped)
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_this_run += 1
        losses.append(round(total_loss, 5))
        train_time += time.time() - t0
        per_head = (ce_sums / counts.clamp(min=1)).tolist()
        top1 = (hits / counts.clamp(min=1)).tolist()
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss:.3f}", head1_top1=f"{top1[0]:.3f}")
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            metrics = {"train/loss": total_loss, "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm), "train/tokens_per_s": train_tokens / max(train_time, 1e-9)}
            for k in range(K):
                metrics[f"train/head{k + 1}/loss"] = per_head[k]
                metrics[f"train/head{k + 1}/top1"] = top1[k]
            accelerator.log(metrics, step=step)
        if step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            result = evaluate()
            history.append({"step": step, "eval": result})
            accelerator.log(_eval_metrics(result), step=step)
            heads_model.train()
        if step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
            save(step)
    bar.close()

    if step < cfg.train.max_steps:  # stopped early on purpose (stop_after_steps)
        save(step)
        accelerator.end_training()
        return {"stopped_at": step}

    # ---- final evaluation, save, summary ------------------------------------------------
    final = evaluate()
    history.append({"step": step, "eval": final})
    accelerator.log(_eval_metrics(final), step=step)
    heads_dir = output_dir / "heads"
    summary = {
        "recipe": cfg.recipe.name,
        "base_model": str(cfg.model.name_or_path),
        "heads_dir": str(heads_dir),
        "num_heads": K,
        "steps": step,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "hidden_cache": bool(cfg.train.hidden_cache),
        "skipped_batches": skipped,
        "time_s": round(time.time() - start_time, 1),
        "train_loop_s_this_run": round(train_time, 1),
        "train_tokens_per_s_this_run": round(train_tokens * world / max(train_time, 1e-9), 1),
        "train_loss": losses,
        "eval_untrained": untrained,
        "eval_final": final,
    }
    if accelerator.is_main_process:
        accelerator.unwrap_model(heads_model).save_pretrained(heads_dir)
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        print(format_summary(summary))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


# ---- helpers ------------------------------------------------------------------------------


def frequent_tokens(labels: list[list[int]], vocab_size: int, n: int) -> torch.Tensor:
    """The n most frequent target tokens (ties: lower id first), sorted by id."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for row in labels:
        ids = torch.tensor([t for t in row if t != IGNORE_INDEX], dtype=torch.long)
        counts.index_add_(0, ids, torch.ones_like(ids))
    order = sorted(range(vocab_size), key=lambda t: (-int(counts[t]), t))[:n]
    return torch.tensor(sorted(order), dtype=torch.long)


def _head_target_counts(heads: MedusaHeads, labels: torch.Tensor, K: int) -> torch.Tensor:
    targets = heads.to_head_vocab(head_targets(labels, K))
    return (targets != IGNORE_INDEX).flatten(1).sum(-1)


def _selected_logits(heads_model, heads: MedusaHeads, lm_head, hidden, labels, K):
    """Head logits only at positions where some head has a target: (K, N, V'), targets (K, N).

    Assistant tokens are a fraction of each row; projecting only those positions onto the
    vocabulary is most of the saving on CPU.
    """
    targets = head_targets(labels, K)  # (K, B, T)
    keep = (targets != IGNORE_INDEX).any(0)  # (B, T)
    logits = heads_model(hidden[keep], lm_head)  # (K, N, V')
    return logits, heads.to_head_vocab(targets[:, keep])


@torch.no_grad()
def evaluate_heads(heads, lm_head, rows, labels, cache, batch_hidden, batch_size, accelerator) -> dict:
    """Top-1 / top-5 accuracy per head on held-out rows, against full-vocabulary targets.

    Targets outside a truncated head vocabulary count as misses.
    """
    heads.eval()
    K = heads.num_heads
    mine = [i for i in range(len(rows)) if i % accelerator.num_processes == accelerator.process_index]
    hits = {1: torch.zeros(K, device=accelerator.device), 5: torch.zeros(K, device=accelerator.device)}
    totals = torch.zeros(K, device=accelerator.device)
    for start in range(0, len(mine), batch_size):
        hidden, lab = batch_hidden(mine[start:start + batch_size], rows, labels, cache)
        with accelerator.autocast():
            logits, targets = _selected_logits(heads, heads, lm_head, hidden, lab, K)
        full = head_targets(lab, K)
        totals += (full != IGNORE_INDEX).flatten(1).sum(-1)
        for k, v in topk_correct(logits.float(), targets, ks=(1, 5)).items():
            hits[k] += v
    totals = accelerator.reduce(totals, reduction="sum")
    result = {"tokens": int(totals[0])}
    for k in (1, 5):
        acc = accelerator.reduce(hits[k], reduction="sum") / totals.clamp(min=1)
        result[f"top{k}"] = [round(float(a), 4) for a in acc]
    return result


def _eval_metrics(result: dict) -> dict:
    return {f"eval/head{k + 1}/top{n}": result[f"top{n}"][k] for n in (1, 5) for k in range(len(result["top1"]))}


def format_summary(s: dict) -> str:
    lines = [
        f"\nTrained {s['num_heads']} Medusa heads ({s['recipe']}) on {s['base_model']}: {s['steps']} steps, "
        f"{s['train_rows']} training rows, {s['time_s']:.0f} s in all",
        f"heads saved to {s['heads_dir']}",
        f"training throughput {s['train_tokens_per_s_this_run']:.0f} tokens/s "
        f"(hidden-state cache {'on' if s['hidden_cache'] else 'off'})",
        f"held-out accuracy on {s['eval_final']['tokens']} tokens (untrained heads in brackets):",
        "  head  top-1            top-5",
    ]
    for k in range(s["num_heads"]):
        f1, f5 = s["eval_final"]["top1"][k], s["eval_final"]["top5"][k]
        u1, u5 = s["eval_untrained"]["top1"][k], s["eval_untrained"]["top5"][k]
        lines.append(f"  {k + 1:>4}  {f1:.3f} ({u1:.3f})    {f5:.3f} ({u5:.3f})")
    return "\n".join(lines)


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    return ids, mask


def _pad_labels(rows: list[list[int]]) -> torch.Tensor:
    return _pad(rows, IGNORE_INDEX)[0]


def _mixed_precision(requested: str) -> str:
    if requested == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return requested
