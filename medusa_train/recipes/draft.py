"""Draft model: build a small model from the target, distil it from the target, save an HF folder.

    python -m medusa_train +recipe=draft
    python -m medusa_train +recipe=draft draft.layers=[0,15,29] draft.loss=tvd draft.temperature=2
    python -m medusa_train +recipe=draft draft.init=config '+draft.config_overrides={num_hidden_layers: 4}'
    python -m medusa_train +recipe=draft draft.target_logits=cache draft.cache_dir=runs/target_cache
    python -m medusa_train +recipe=draft draft.truncated_vocab_size=8192
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml -m medusa_train +recipe=draft train=gpu

Reads top to bottom: set-up, data, model (the frozen target, the draft built from it, the
truncated vocabulary), the target's distributions (online, or a top-k cache on disk; the
held-out split is always cached), optimiser, resume, the train loop (forward / backward /
step / log / save), final evaluation, save, summary. The loss (medusa_train/draft/losses.py)
compares draft and target next-token distributions at every position that predicts an
assistant token. Output: <output_dir>/draft, a standard HF folder (safetensors, tokenizer,
generation config; draft_vocab.safetensors when truncated) usable as
`model.generate(..., assistant_model=AutoModelForCausalLM.from_pretrained(folder))`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from medusa_train.base_model import load_base_model, load_tokenizer, resolve_dtype
from medusa_train.data import collate
from medusa_train.draft.build import INITS, build_draft, embeddings_from_target
from medusa_train.draft.losses import (
    check_loss,
    next_token_mask,
    per_token_loss,
    sparse_per_token_loss,
)
from medusa_train.draft.target_cache import build_target_cache, target_cache_key
from medusa_train.draft.vocab import save_vocab_map
from medusa_train.training.batching import global_batch
from medusa_train.training.checkpoint import latest_checkpoint
from medusa_train.training.head_batches import frequent_tokens
from medusa_train.training.loop import (
    NonFiniteLossError,  # noqa: F401  (raised by finish_step; part of this recipe's interface)
    micro_batch_rows,
    tokenized_splits,
)
from medusa_train.training.progress import (OPTIMIZER_NAME, Progress, finish_step, keep_training, log_due,
                                            periodic_eval_and_save, resume_progress, save_training_checkpoint)
from medusa_train.training.run_dir import prepare_output_dir
from medusa_train.training.setup import make_accelerator
from medusa_train.training.tracking import init_tracking, tracker_name

log = logging.getLogger(__name__)

DRAFT_DIR = "draft"
TRAINABLE_NAME = "draft_trainable.safetensors"  # in checkpoints: the draft's trainable weights


def main(cfg: DictConfig) -> dict:
    start_time = time.time()
    d = cfg.draft
    check_config(cfg)
    # ---- set-up -------------------------------------------------------------------------
    accelerator = make_accelerator(cfg.train.mixed_precision, tracker_name(cfg))
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    prepare_output_dir(output_dir, resume=cfg.resume, overwrite=cfg.overwrite, accelerator=accelerator)
    init_tracking(accelerator, cfg)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device

    # ---- data ---------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision)
    train_ds, eval_ds = tokenized_splits(cfg.data, tokenizer, accelerator, cfg.model.name_or_path)
    train_rows, train_labels = train_ds["input_ids"], train_ds["labels"]
    eval_rows, eval_labels = eval_ds["input_ids"], eval_ds["labels"]

    # ---- model: the frozen target, the draft built from it ------------------------------
    target = load_base_model(cfg.model.name_or_path, cfg.model.dtype, device, cfg.model.trust_remote_code,
                             cfg.model.revision)
    target.requires_grad_(False)
    if target.dtype != torch.float32 and accelerator.mixed_precision == "no":
        raise ValueError(f"the target is {target.dtype} but train.mixed_precision is off: set "
                         "train.mixed_precision=bf16 (the draft trains in fp32 under autocast) or model.dtype=float32")
    vocab_size = target.get_output_embeddings().weight.shape[0]
    if d.cache_top_k > vocab_size:  # checked whatever target_logits says: the held-out split is always cached
        raise ValueError(f"draft.cache_top_k={d.cache_top_k} exceeds the target's vocabulary ({vocab_size})")

    def make_draft() -> nn.Module:
        # Seeded, so a resumed run rebuilds exactly the draft the first run started from.
        torch.manual_seed(cfg.seed)
        draft = build_draft(target, d, tokenizer, dtype=cfg.model.dtype,
                            trust_remote_code=cfg.model.trust_remote_code).float()  # fp32 weights; autocast on GPU
        # Frozen embeddings stay the target's (or the given model's): the kept layers already
        # read and write that space, and training 28M embedding parameters on a small data
        # set costs CPU time and overfits. Freshly initialised ones must train.
        if not d.train_embeddings and (d.init == "model" or embeddings_from_target(draft, target)):
            draft.get_input_embeddings().requires_grad_(False)
            draft.get_output_embeddings().requires_grad_(False)
        return draft

    draft = make_draft()
    trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
    total = sum(p.numel() for p in draft.parameters())
    describe = describe_draft(d, draft)
    accelerator.print(f"draft: {describe}; {total:,} parameters, {trainable:,} trained")

    # The truncated vocabulary: the loss and our runtime see only these ids' logits.
    vocab_map = None
    if d.truncated_vocab_size:
        vocab_map = frequent_tokens(train_labels, vocab_size, d.truncated_vocab_size).to(device)  # (V',)
    to_sub = None  # full id -> position in vocab_map, -1 outside it
    if vocab_map is not None:
        to_sub = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        to_sub[vocab_map] = torch.arange(len(vocab_map), device=device)

    # ---- the target's distributions -----------------------------------------------------
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps

    def target_logits(input_ids, attention_mask, keep, ids=None) -> torch.Tensor:
        """(N, V) (or (N, V') over `ids`) next-token logits of the frozen target at positions `keep`."""
        with torch.no_grad(), accelerator.autocast():
            return project(target, input_ids, attention_mask, keep, ids, vocab_size)

    # Only the rows the run visits (a run shorter than an epoch caches no more than it reads),
    # keyed by model, data, rows, k, temperature and vocabulary: runs sharing draft.cache_dir
    # (another loss, other layers) share a cache.
    visited = sorted({i for s in range(cfg.train.max_steps)
                      for i in global_batch(len(train_rows), micro * accum * world, cfg.seed, s)})
    caches = {}
    for split, rows, labels, fp, indices in [("train", train_rows, train_labels, train_ds._fingerprint, visited),
                                             ("eval", eval_rows, eval_labels, eval_ds._fingerprint, None)]:
        if split == "train" and d.target_logits != "cache":
            continue
        key = target_cache_key(str(cfg.model.name_or_path), fp, d.cache_top_k, d.cache_dtype, d.temperature,
                               vocab_map, indices)
        caches[split] = build_target_cache(Path(d.cache_dir) / f"{split}-{key}", key, rows, labels, target_logits,
                                           d.cache_top_k, accelerator, temperature=d.temperature, vocab_map=vocab_map,
                                           dtype=d.cache_dtype, batch_tokens=2048,
                                           desc=f"caching target log-probs ({split})", indices=indices)

    def sparse_target(cache, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, k) log-probs, (N, k) ids in the draft's training vocabulary, (N,) full-vocabulary greedy ids."""
        logprobs, ids, greedy = (t.to(device) for t in cache.batch(indices))
        return logprobs, (ids if to_sub is None else to_sub[ids]), greedy

    # ---- optimiser ----------------------------------------------------------------------
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=cfg.train.max_steps)
    student = DraftLogits(draft, vocab_size)
    student_model, optimizer = accelerator.prepare(student, optimizer)

    # ---- resume -------------------------------------------------------------------------
    run = Progress()
    checkpoint = latest_checkpoint(output_dir) if cfg.resume else None
    if checkpoint is not None:
        draft.load_state_dict(load_file(str(checkpoint / TRAINABLE_NAME)), strict=False)
        optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_NAME, weights_only=True))
        run = resume_progress(checkpoint, scheduler, accelerator)

    def batch_inputs(indices: list[int], rows, labels):
        batch = collate([{"input_ids": rows[i], "labels": labels[i]} for i in indices], tokenizer.pad_token_id)
        return (batch["input_ids"].to(device), batch["attention_mask"].to(device),
                next_token_mask(batch["labels"]).to(device))  # (B, T) x 3

    @torch.no_grad()
    def evaluate() -> dict:
        """Held-out loss (the sparse loss against the cached top-k target: a lower bound of the
        dense one, equal at k = V) and greedy agreement: the share of
        counted positions where the draft's argmax is the target's (over the full vocabulary,
        as HF assisted generation drafts; and over the truncated one, as our runtime does)."""
        student.eval()
        sums = torch.zeros(4, device=device)  # loss, agreements (full), agreements (truncated), positions
        mine = [i for i in range(len(eval_rows)) if i % world == rank]
        for start in range(0, len(mine), micro):
            idx = mine[start:start + micro]
            input_ids, attention_mask, keep = batch_inputs(idx, eval_rows, eval_labels)
            with accelerator.autocast():
                logits = student(input_ids, attention_mask, keep).float()  # (N, V)
            target_lp, target_ids, greedy = sparse_target(caches["eval"], idx)  # greedy: the target's argmax
            sums[1] += (logits.argmax(-1) == greedy).sum()
            if vocab_map is not None:
                logits = logits[:, vocab_map]  # (N, V')
                sums[2] += (vocab_map[logits.argmax(-1)] == greedy).sum()
            sums[0] += sparse_per_token_loss(d.loss, logits, target_lp, target_ids, d.temperature).sum()
            sums[3] += keep.sum()
        loss, agree, agree_sub, n = accelerator.reduce(sums, reduction="sum").tolist()
        n = max(n, 1.0)
        result = {"tokens": int(n), "loss": round(loss / n, 5), "top1_agreement": round(agree / n, 5)}
        if vocab_map is not None:
            result["top1_agreement_truncated"] = round(agree_sub / n, 5)
        student.train()
        return result

    def evaluate_and_log(at: int) -> None:
        result = evaluate()
        run.history.append({"step": at, "eval": result})
        accelerator.log({f"eval/{k}": v for k, v in result.items() if k != "tokens"}, step=at)

    def save(step_now: int) -> None:
        def write_weights(folder: Path) -> None:
            weights = {n: p.detach().cpu().contiguous() for n, p in draft.named_parameters() if p.requires_grad}
            save_file(weights, str(folder / TRAINABLE_NAME))
        save_training_checkpoint(accelerator, output_dir, step_now, run.state(), optimizer, scheduler, write_weights,
                                 keep=cfg.train.keep_checkpoints)

    if not run.history:  # the built, untrained draft: the "before" of before/after
        evaluate_and_log(0)
    untrained = run.history[0]["eval"]

    # ---- train --------------------------------------------------------------------------
    T = cfg.train.max_steps
    bar = tqdm(total=T, initial=run.step, desc="draft", disable=not accelerator.is_local_main_process)
    student_model.train()
    while keep_training(run, cfg.train):
        t0 = time.time()
        micro_rows = micro_batch_rows(len(train_rows), micro, accum, cfg.seed, run.step, rank, world)
        # The global count of positions normalises every sum: any split over micro-batches
        # and processes gives the gradient of one big batch.
        count = sum(sum(int(next_token_mask(torch.tensor([train_labels[i]])).sum()) for i in r) for r in micro_rows)
        count = accelerator.reduce(torch.tensor(float(count), device=device), reduction="sum")
        sums = torch.zeros(2, device=device)  # loss sum, greedy agreements
        for i, r in enumerate(micro_rows):
            input_ids, attention_mask, keep = batch_inputs(r, train_rows, train_labels)
            if d.target_logits == "cache":
                target_lp, target_ids, _ = sparse_target(caches["train"], r)  # (N, k) x 2
                greedy = target_ids[:, 0]  # in the training vocabulary, like the draft's argmax below
            else:
                online = target_logits(input_ids, attention_mask, keep, vocab_map)  # (N, V')
                greedy = online.argmax(-1)
            sync = accelerator.no_sync(student_model) if i < accum - 1 else nullcontext()
            with sync, accelerator.autocast():
                logits = student_model(input_ids, attention_mask, keep, vocab_map)  # (N, V')
                if d.target_logits == "cache":
                    loss_sum = sparse_per_token_loss(d.loss, logits, target_lp, target_ids, d.temperature).sum()
                else:
                    loss_sum = per_token_loss(d.loss, logits, online, d.temperature).sum()
                # DDP averages gradients over processes; the global normaliser already did.
                accelerator.backward(loss_sum / count.clamp(min=1) * world)
            sums += torch.stack([loss_sum.detach(), (logits.detach().argmax(-1) == greedy).sum().float()])
            run.train_tokens += int(keep.sum())
        sums = accelerator.reduce(sums, reduction="sum")
        grad_norm = float(accelerator.clip_grad_norm_(student_model.parameters(), cfg.train.max_grad_norm))
        total_loss = float(sums[0] / count.clamp(min=1))
        agreement = float(sums[1] / count.clamp(min=1))
        finish_step(run, total_loss, grad_norm, optimizer, scheduler, cfg.train.on_nan, output_dir, started=t0)
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss:.3f}", agree=f"{agreement:.3f}")
        if log_due(run.step, cfg.train):
            accelerator.log({f"train/{d.loss}": total_loss, "train/top1_agreement": agreement,
                             "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
                             "train/tokens_per_s": run.tokens_per_s}, step=run.step)
        periodic_eval_and_save(run.step, cfg.train, evaluate_and_log, save)
    bar.close()

    if run.step < T:  # stopped early on purpose (stop_after_steps)
        save(run.step)
        accelerator.end_training()
        return {"stopped_at": run.step}

    # ---- final evaluation, save, summary ------------------------------------------------
    evaluate_and_log(run.step)
    final = run.history[-1]["eval"]
    draft_dir = output_dir / DRAFT_DIR
    summary = {
        "recipe": cfg.recipe.name,
        "target_model": str(cfg.model.name_or_path),
        "draft_dir": str(draft_dir),
        "draft": describe,
        "draft_params": total,
        "trained_params": trainable,
        "loss": d.loss,
        "temperature": d.temperature,
        "target_logits": d.target_logits,
        "truncated_vocab_size": None if vocab_map is None else len(vocab_map),
        "steps": run.step,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "skipped_batches": run.skipped,
        "time_s": round(time.time() - start_time, 1),
        "train_loop_s_this_run": round(run.train_time, 1),
        "s_per_step_this_run": round(run.train_time / max(run.steps_this_run, 1), 3),
        "train_tokens_per_s_this_run": round(run.train_tokens * world / max(run.train_time, 1e-9), 1),
        "train_loss": run.losses,
        "eval_untrained": untrained,
        "eval_final": final,
    }
    if accelerator.is_main_process:
        if d.measure_latency:
            summary["decode_step_ms"] = decode_step_ms(target, draft, vocab_map, vocab_size)
        save_draft(draft_dir, draft, target, tokenizer, vocab_map,
                   {"target": str(cfg.model.name_or_path), "built": describe, "loss": d.loss,
                    "temperature": d.temperature, "steps": run.step})
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        print(format_summary(summary))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


# ---- parts ------------------------------------------------------------------------------------


class DraftLogits(nn.Module):
    """The draft as one module (so DDP syncs it) producing logits only at positions `keep`,
    over the vocabulary ids `ids` (None: the target's vocabulary)."""

    def __init__(self, draft: nn.Module, vocab_size: int):
        super().__init__()
        self.draft = draft
        self.vocab_size = vocab_size

    def forward(self, input_ids, attention_mask, keep, ids=None):
        return project(self.draft, input_ids, attention_mask, keep, ids, self.vocab_size)  # (N, V')


def project(model: nn.Module, input_ids, attention_mask, keep, ids, vocab_size: int) -> torch.Tensor:
    """(N, V') next-token logits of a causal LM at positions `keep` (B, T), over rows `ids` of its
    lm_head (None: the first vocab_size rows; a draft's table may be padded beyond the target's).

    Projecting only the counted positions, and only onto the truncated vocabulary, is most
    of the saving on a CPU: B x T x V logits would dominate a small draft's step.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    head = model.get_output_embeddings()
    weight = head.weight[:vocab_size] if ids is None else head.weight[ids]  # (V', H)
    bias = getattr(head, "bias", None)
    if bias is not None:
        bias = bias[:vocab_size] if ids is None else bias[ids]
    return F.linear(hidden[keep], weight, bias)  # (N, V')


def describe_draft(d: DictConfig, draft: nn.Module) -> str:
    if d.init == "layers":
        return f"target layers {list(d.layers)} + its embeddings, final norm and lm_head"
    if d.init == "config":
        overrides = OmegaConf.to_container(d.config_overrides) if isinstance(d.config_overrides, DictConfig) \
            else dict(d.config_overrides)
        return f"target config with {overrides}, shape-matching target weights copied"
    return f"{d.model} ({draft.config.num_hidden_layers} layers)"


def save_draft(folder: Path, draft: nn.Module, target: nn.Module, tokenizer, vocab_map, origin: dict) -> None:
    """A standard HF folder in the target's dtype, written under a temporary name and renamed."""
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = type(draft)._from_config(draft.config, dtype=target.dtype)
    model.load_state_dict(draft.state_dict())
    model.config.medusa_train_draft = origin  # config.json records what the draft was built from
    model.generation_config = target.generation_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if vocab_map is not None:
        save_vocab_map(tmp, vocab_map)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


@torch.no_grad()
def decode_step_ms(target: nn.Module, draft: nn.Module, vocab_map, vocab_size: int, context: int = 64,
                   steps: int = 24) -> dict:
    """Milliseconds of one cached decode step (batch 1, one token): the target, the draft with
    its full projection and, when truncated, with the truncated one. What a truncated
    vocabulary buys is the difference between the last two."""
    from transformers import DynamicCache

    def timed(model, weight) -> float:
        model.eval()
        device = weight.device
        ids = torch.randint(0, vocab_size, (1, context), device=device, generator=torch.Generator().manual_seed(0)
                            if device.type == "cpu" else None)
        cache = DynamicCache(config=model.config)
        decoder = model.get_decoder()
        decoder(input_ids=ids, past_key_values=cache, use_cache=True)
        token = ids[:, -1:]
        times = []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            hidden = decoder(input_ids=token, past_key_values=cache, use_cache=True).last_hidden_state  # (1, 1, H)
            token = F.linear(hidden[:, -1], weight).argmax(-1, keepdim=True)  # (1, 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        times.sort()
        return round(1000 * times[len(times) // 2], 2)  # median

    result = {"target": timed(target, target.get_output_embeddings().weight[:vocab_size]),
              "draft_full_vocab": timed(draft, draft.get_output_embeddings().weight[:vocab_size])}
    if vocab_map is not None:
        result[f"draft_truncated_{len(vocab_map)}"] = timed(draft, draft.get_output_embeddings().weight[vocab_map])
    draft.train()
    return result


def format_summary(s: dict) -> str:
    u, f = s["eval_untrained"], s["eval_final"]
    lines = [
        (f"\nDistilled a draft ({s['draft']}) from {s['target_model']}: {s['steps']} steps, loss {s['loss']} at "
         f"temperature {s['temperature']}, target logits {s['target_logits']}, {s['time_s']:.0f} s in all "
         f"({s['s_per_step_this_run']:.2f} s/step)"),
        (f"draft: {s['draft_params']:,} parameters ({s['trained_params']:,} trained), saved to {s['draft_dir']} "
         "(loads with AutoModelForCausalLM.from_pretrained; usable as assistant_model=)"),
        (f"held-out on {f['tokens']} positions (untrained draft in brackets): loss {f['loss']:.4f} "
         f"({u['loss']:.4f}), greedy agreement with the target {f['top1_agreement']:.3f} ({u['top1_agreement']:.3f})"),
    ]
    if "top1_agreement_truncated" in f:
        lines.append(f"  over the truncated {s['truncated_vocab_size']}-token vocabulary: "
                     f"{f['top1_agreement_truncated']:.3f} ({u['top1_agreement_truncated']:.3f})")
    if "decode_step_ms" in s:
        lines.append("one decode step: " + ", ".join(f"{k} {v:.2f} ms" for k, v in s["decode_step_ms"].items()))
    return "\n".join(lines)


def check_config(cfg: DictConfig) -> None:
    d = cfg.draft
    if d.init not in INITS:
        raise ValueError(f"draft.init must be one of {', '.join(INITS)}, got {d.init!r}")
    check_loss(d.loss, d.temperature)
    problems = [text for text, ok in [
        ("target_logits online or cache", d.target_logits in ("online", "cache")),
        ("cache_top_k >= 1", d.cache_top_k >= 1),
        ("cache_dtype float16 or float32", d.cache_dtype in ("float16", "float32")),
        ("truncated_vocab_size None or >= 1", d.truncated_vocab_size is None or d.truncated_vocab_size >= 1),
    ] if not ok]
    if problems:
        raise ValueError(f"draft settings out of range: need {', '.join(problems)}")
    if d.init == "model" and not d.model:
        raise ValueError("draft.init=model needs draft.model=<HF model id or local folder>")
    resolve_dtype(cfg.model.dtype, "cpu")  # raises on an unknown dtype
