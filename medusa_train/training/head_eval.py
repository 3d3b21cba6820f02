"""Held-out accuracy of heads and the end-of-run summary."""

from __future__ import annotations

import math

import torch

from medusa_train.loss import IGNORE_INDEX, head_targets, topk_correct
from medusa_train.training.head_batches import selected_logits


@torch.no_grad()
def evaluate_heads(heads, lm_head, rows, labels, cache, batch_hidden, batch_size, accelerator,
                   equal_forwards: bool = False) -> dict:
    """Top-1 / top-5 accuracy per head on held-out rows, against full-vocabulary targets.

    Targets outside a truncated head vocabulary count as misses. equal_forwards (ZeRO-3,
    where weights are gathered collectively): every process runs as many batches as
    process 0, which has the most rows; a process short of rows repeats row 0 and drops it.
    """
    heads.eval()
    K = heads.num_heads
    mine = [i for i in range(len(rows)) if i % accelerator.num_processes == accelerator.process_index]
    hits = {1: torch.zeros(K, device=accelerator.device), 5: torch.zeros(K, device=accelerator.device)}
    totals = torch.zeros(K, device=accelerator.device)
    for start in range(0, len(mine), batch_size):
        hidden, lab = batch_hidden(mine[start:start + batch_size], rows, labels, cache)
        with accelerator.autocast():
            logits, targets = selected_logits(heads, heads, lm_head, hidden, lab, K)
        full = head_targets(lab, K)
        totals += (full != IGNORE_INDEX).flatten(1).sum(-1)
        for k, v in topk_correct(logits.float(), targets, ks=(1, 5)).items():
            hits[k] += v
    if equal_forwards and rows:
        most = math.ceil(math.ceil(len(rows) / accelerator.num_processes) / batch_size)
        for _ in range(most - math.ceil(len(mine) / batch_size)):
            hidden, lab = batch_hidden([0], rows, labels, cache)
            with accelerator.autocast():
                selected_logits(heads, heads, lm_head, hidden, lab, K)
    totals = accelerator.reduce(totals, reduction="sum")
    result = {"tokens": int(totals[0])}
    for k in (1, 5):
        acc = accelerator.reduce(hits[k], reduction="sum") / totals.clamp(min=1)
        result[f"top{k}"] = [round(float(a), 4) for a in acc]
    return result


def eval_metrics(result: dict) -> dict:
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
