"""Medusa-2: heads trained jointly with the backbone (LoRA, QLoRA or full fine-tuning).

    python -m medusa_train +recipe=medusa2
    python -m medusa_train +recipe=medusa2 medusa2.stages=[1]          # heads only, into <output_dir>/stage1
    python -m medusa_train +recipe=medusa2 medusa2.stages=[2]          # then stage 2 from <output_dir>/stage1/heads
    python -m medusa_train +recipe=medusa2 medusa2.stages=[2] medusa2.stage1_heads=runs/medusa1/heads
    python -m medusa_train +recipe=medusa2 medusa2.backbone=full model.dtype=float32 train.lr=2e-5
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml -m medusa_train +recipe=medusa2 train=gpu
    accelerate launch --config_file recipes/accelerate_configs/zero2.yaml -m medusa_train \
        --config-dir recipes/llama-3-8b --config-name medusa2

Under DeepSpeed the backbone (with its adapter) and the heads are one engine module
(SelectedLogits): ZeRO-3 partitions the frozen base weights too and gathers them as each
layer runs; checkpoints hold each process's optimizer shard (step_N/engine/), and the
heads and adapter are gathered before they are saved.

Stage 1 trains the heads alone: it is the medusa1 recipe, run into <output_dir>/stage1 at
the heads' learning rate (train.lr x medusa2.head_lr_multiplier) with
medusa2.stage1_heads_coefficient. Stage 2 starts from those heads (or medusa2.stage1_heads)
and reads top to bottom: set-up, data, model (backbone with its LoRA adapter, stage-1
heads), the original model for the KL loss, optimiser (backbone and heads parameter
groups), resume, the train loop (forward / backward / step / log / save), final
evaluation, save, summary. Its loss is

    L_backbone + heads_coefficient * schedule(t) * sum_k train.decay**k * L_head_k

with L_backbone the next-token CE on the labels (ce) or KL(original || tuned) over the
next-token distribution at labelled positions (kl; the original is the same model with the
adapter disabled). Output: <output_dir>/heads, <output_dir>/backbone (LoRA adapter, merged
model or full model), train_summary.json. The heads' config names the backbone folder, so
`medusa_train.training.lora.load_backbone` + the heads rebuild the trained model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from medusa_train.base_model import load_base_model, load_tokenizer
from medusa_train.data import collate, resolve_data_path
from medusa_train.data.self_distill import meta_file
from medusa_train.heads import MedusaHeads
from medusa_train.loss import (
    IGNORE_INDEX,
    head_targets,
    head_weights,
    medusa_loss,
    topk_correct,
)
from medusa_train.model import MedusaModel
from medusa_train.recipes import medusa1
from medusa_train.schedules import ramp_fraction, schedule_value
from medusa_train.training.checkpoint import latest_checkpoint, read_state
from medusa_train.training.distributed import (
    ENGINE_DIR,
    begin_micro_batch,
    check_supported,
    end_step,
    fill_deepspeed_config,
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
from medusa_train.training.head_batches import head_target_counts, pad_labels
from medusa_train.training.head_eval import eval_metrics, evaluate_heads, format_summary
from medusa_train.training.loop import (
    NonFiniteLossError,  # noqa: F401  (raised here: medusa2.NonFiniteLossError)
    micro_batch_rows,
    restore_heads,
    tokenized_splits,
)
from medusa_train.training.lora import (
    BACKBONE_KEY,
    add_lora,
    load_quantized_base,
    load_trainable_state,
    require_bitsandbytes,
    save_backbone,
    trainable_state,
)
from medusa_train.training.progress import (OPTIMIZER_NAME, Progress, finish_step, keep_training, log_due,
                                            periodic_eval_and_save, resume_progress, save_training_checkpoint)
from medusa_train.training.run_dir import prepare_output_dir
from medusa_train.training.setup import make_accelerator
from medusa_train.training.tracking import init_tracking, tracker_name

log = logging.getLogger(__name__)

STAGE1_DIR = "stage1"
BACKBONE_DIR = "backbone"
TRAINABLE_NAME = "backbone_trainable.safetensors"  # in checkpoints: the adapter (or every weight)


def main(cfg: DictConfig) -> dict:
    m2 = cfg.medusa2
    check_config(cfg)
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg.train.mixed_precision, tracker_name(cfg))
    prepare_output_dir(output_dir, resume=cfg.resume, overwrite=cfg.overwrite, accelerator=accelerator)
    fill_deepspeed_config(accelerator, cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.train.max_grad_norm)
    check_supported(accelerator, cfg.train.on_nan)
    check_deepspeed(m2, accelerator)

    # ---- stage 1: heads only (the medusa1 recipe) ----------------------------------------
    stage1 = None
    if 1 in m2.stages:
        stage1 = run_stage1(cfg, output_dir / STAGE1_DIR)
        if "stopped_at" in stage1 or 2 not in m2.stages:
            return {"stage1": stage1}
    heads_from = Path(m2.stage1_heads) if m2.stage1_heads else output_dir / STAGE1_DIR / "heads"

    # ---- stage 2: set-up -----------------------------------------------------------------
    if is_deepspeed(accelerator):
        accelerator.free_memory()  # one engine per accelerator: drop stage 1's
    start_time = time.time()
    set_seed(cfg.seed)
    init_tracking(accelerator, cfg)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    kind = resolve_backbone_loss(m2.backbone_loss, list(cfg.data.sources), m2.data_is_self_distilled)
    save_kind = {"auto": "adapter" if m2.backbone == "lora" else "full"}.get(m2.save, m2.save)

    # ---- data ---------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision)
    train_ds, eval_ds = tokenized_splits(cfg.data, tokenizer, accelerator, cfg.model.name_or_path)
    train_rows, train_labels = train_ds["input_ids"], train_ds["labels"]
    eval_rows, eval_labels = eval_ds["input_ids"], eval_ds["labels"]

    # ---- model: backbone (+ LoRA adapter) and the stage-1 heads ---------------------------
    if m2.qlora:
        base = load_quantized_base(cfg.model.name_or_path, device, cfg.model.trust_remote_code, cfg.model.revision)
    else:
        base = load_base_model(cfg.model.name_or_path, cfg.model.dtype, device, cfg.model.trust_remote_code,
                               cfg.model.revision)
    check_precision(base.dtype, m2.backbone, m2.qlora, accelerator.mixed_precision)
    peft_model = None
    if m2.backbone == "lora":
        base.requires_grad_(False)
        peft_model = add_lora(base, m2.lora_r, m2.lora_alpha, m2.lora_dropout, list(m2.lora_target_modules),
                              quantized=m2.qlora, gradient_checkpointing=m2.gradient_checkpointing)
    else:
        base.requires_grad_(True)
        if m2.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    heads = MedusaHeads.from_pretrained(heads_from).to(device)  # fp32; autocast (DeepSpeed: bf16 mode) computes in bf16
    with gathered([base.get_output_embeddings().weight]):  # ZeRO-3 (zero3_init_flag) loads it partitioned
        medusa = MedusaModel(base, heads)  # checks that the heads fit this backbone
    if heads.config.base_model not in (None, str(cfg.model.name_or_path)):
        log.warning("the heads in %s were trained on %s, not on %s", heads_from, heads.config.base_model,
                    cfg.model.name_or_path)
    if heads.truncated and heads.lm_heads is None and hasattr(base.get_output_embeddings(), "base_layer"):
        raise ValueError("heads sharing a truncated vocabulary project with the lm_head's base weight, so a LoRA "
                         "adapter on lm_head would be trained for the base model but not seen by the heads: "
                         "drop lm_head from medusa2.lora_target_modules")
    K = heads.num_heads
    trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    accelerator.print(f"stage 2 from heads {heads_from}: backbone {backbone_name(m2)} ({trainable:,} trainable "
                      f"parameters), backbone loss {kind}, heads weight {m2.heads_coefficient} x {m2.schedule}")

    # ---- the original model: the KL loss's target, and the quality baseline in eval ------
    # With LoRA it is the same modules with the adapter disabled. Full fine-tuning with the
    # KL loss keeps a frozen copy (the backbone's weights twice in memory); with the CE loss
    # it keeps none, and eval then reports perplexity only.
    frozen = copy.deepcopy(base).requires_grad_(False).eval() if peft_model is None and kind == "kl" else None

    def original_model_logits(input_ids, attention_mask, keep) -> torch.Tensor:
        """(N, V) next-token logits of the backbone as it was before stage 2, at positions `keep`."""
        model = frozen if frozen is not None else base
        adapter_off = peft_model.disable_adapter() if frozen is None else nullcontext()
        with torch.no_grad(), adapter_off, eval_mode(model), accelerator.autocast():
            return base_logits(model, input_ids, attention_mask, keep)

    original_logits = original_model_logits if peft_model is not None or frozen is not None else None

    # ---- optimiser ----------------------------------------------------------------------
    optimizer = torch.optim.AdamW(param_groups(base, heads, cfg.train.lr, m2.head_lr_multiplier),
                                  lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=cfg.train.max_steps)
    joint = SelectedLogits(medusa)
    joint_model, optimizer = accelerator.prepare(joint, optimizer)
    if heads.lm_heads is None and heads.truncated:  # ZeRO-3: the heads read the lm_head weight directly
        register_shared_weight(accelerator, heads, base.get_output_embeddings().weight)

    # ---- resume -------------------------------------------------------------------------
    run, backbone_losses = Progress(), []
    checkpoint = latest_checkpoint(output_dir) if cfg.resume else None
    if checkpoint is not None:
        if is_deepspeed(accelerator):  # heads, adapter and this process's optimizer shard
            load_engine_state(accelerator, checkpoint / ENGINE_DIR)
        else:
            restore_heads(heads, checkpoint / "heads")
            load_trainable_state(base, load_file(str(checkpoint / TRAINABLE_NAME)))  # copied onto the model's device
            optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_NAME, weights_only=True))
        run = resume_progress(checkpoint, scheduler, accelerator)
        backbone_losses = read_state(checkpoint)["backbone_losses"]

    def batch_hidden(indices: list[int], rows, labels, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H) hidden states of the backbone as it is now, (B, T) labels."""
        batch = collate([{"input_ids": rows[i], "labels": labels[i]} for i in indices], tokenizer.pad_token_id)
        with torch.no_grad(), accelerator.autocast():
            hidden = base.get_decoder()(input_ids=batch["input_ids"].to(device),
                                        attention_mask=batch["attention_mask"].to(device)).last_hidden_state
        return hidden, batch["labels"].to(device)  # (B, T, H), (B, T)

    def evaluate_and_log(at: int) -> None:
        joint.eval()
        result = {
            "heads": evaluate_heads(heads, base.get_output_embeddings(), eval_rows, eval_labels, None, batch_hidden,
                                    cfg.train.micro_batch_size, accelerator),
            "backbone": evaluate_backbone(base, original_logits, eval_rows, eval_labels, cfg.train.micro_batch_size,
                                          tokenizer.pad_token_id, accelerator),
        }
        joint.train()
        run.history.append({"step": at, "eval": result["heads"], "backbone": result["backbone"]})
        accelerator.log({**eval_metrics(result["heads"]),
                         **{f"eval/backbone/{k}": v for k, v in result["backbone"].items()}}, step=at)

    def save(step_now: int) -> None:
        def write_weights(folder: Path) -> None:  # the plain path's; DeepSpeed's engine state holds the adapter
            heads.save_pretrained(folder / "heads")
            save_file(trainable_state(base), str(folder / TRAINABLE_NAME))
        save_training_checkpoint(accelerator, output_dir, step_now, {**run.state(), "backbone_losses": backbone_losses},
                                 optimizer, scheduler, write_weights, keep=cfg.train.keep_checkpoints, heads=heads)

    if not run.history:
        evaluate_and_log(0)
    untrained = run.history[0]

    # ---- train --------------------------------------------------------------------------
    micro, accum, T = cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.train.max_steps
    bar = tqdm(total=T, initial=run.step, desc="medusa2 stage 2", disable=not accelerator.is_local_main_process)
    joint_model.train()
    while keep_training(run, cfg.train):
        t0 = time.time()
        # LoRA dropout masks depend on the step alone: a resumed run draws the same.
        torch.manual_seed(cfg.seed + run.step)
        heads_lambda = m2.heads_coefficient * schedule_value(m2.schedule, run.step, T)
        weights = [heads_lambda * w for w in head_weights(K, cfg.train.decay)]
        micro_rows = micro_batch_rows(len(train_rows), micro, accum, cfg.seed, run.step, rank, world)
        micro_labels = [pad_labels([train_labels[i] for i in r]) for r in micro_rows]
        # Global target counts (backbone, then each head) normalise every sum, so any split
        # over micro-batches and processes gives the gradient of one big batch.
        counts = sum(torch.cat([(next_token_targets(lab) != IGNORE_INDEX).sum().view(1),
                                head_target_counts(heads, lab, K)]) for lab in micro_labels)
        counts = accelerator.reduce(counts.to(device), reduction="sum")  # (1 + K,)
        sums = torch.zeros(1 + K, device=device)  # backbone loss sum, each head's CE sum
        hits = torch.zeros(K, device=device)
        for i, r in enumerate(micro_rows):
            batch = collate([{"input_ids": train_rows[j], "labels": train_labels[j]} for j in r],
                            tokenizer.pad_token_id)
            input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            labels = batch["labels"].to(device)  # (B, T)
            next_targets = next_token_targets(labels)  # (B, T)
            all_targets = head_targets(labels, K)  # (K, B, T)
            keep = (next_targets != IGNORE_INDEX) | (all_targets != IGNORE_INDEX).any(0)  # (B, T)
            targets = heads.to_head_vocab(all_targets[:, keep])  # (K, N)
            original = original_logits(input_ids, attention_mask, keep) if kind == "kl" else None  # (N, V)
            begin_micro_batch(accelerator, i, accum)  # DeepSpeed steps after the last one
            sync = no_sync(accelerator, joint_model) if i < accum - 1 else nullcontext()
            with sync, accelerator.autocast():
                logits, head_logits = joint_model(input_ids, attention_mask, keep)  # (N, V), (K, N, V')
                backbone_sum = backbone_loss_sum(logits, next_targets[keep], original)
                heads_loss, ce, _ = medusa_loss(head_logits, targets, weights, counts[1:])
                loss = backbone_sum / counts[0].clamp(min=1) + heads_loss
                # DDP (and DeepSpeed) average gradients over processes, DeepSpeed also over
                # micro-batches; the global normaliser already did both.
                accelerator.backward(loss * loss_scale(accelerator, accum))
            sums += torch.cat([backbone_sum.detach().view(1), ce])
            hits += topk_correct(head_logits.detach(), targets, ks=(1,))[1]
            run.train_tokens += int((labels != IGNORE_INDEX).sum())
        sums = accelerator.reduce(sums, reduction="sum")
        hits = accelerator.reduce(hits, reduction="sum")
        end_step(accelerator)
        # DeepSpeed clipped inside its step (gradient_clipping) and reports the norm here.
        grad_norm = grad_norm_value(accelerator.clip_grad_norm_(joint_model.parameters(), cfg.train.max_grad_norm))
        per_target = (sums / counts.clamp(min=1)).tolist()  # backbone loss, then each head's CE
        total_loss = per_target[0] + sum(w * ce for w, ce in zip(weights, per_target[1:]))
        finish_step(run, total_loss, grad_norm, optimizer, scheduler, cfg.train.on_nan, output_dir, started=t0)
        backbone_losses.append(round(per_target[0], 6))
        top1 = (hits / counts[1:].clamp(min=1)).tolist()
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss:.3f}", backbone=f"{per_target[0]:.4f}", head1_top1=f"{top1[0]:.3f}")
        if log_due(run.step, cfg.train):
            lrs = scheduler.get_last_lr()
            metrics = {"train/loss": total_loss, f"train/backbone/{kind}": per_target[0],
                       "train/heads_lambda": heads_lambda, "train/lr": lrs[0], "train/lr_heads": lrs[1],
                       "train/grad_norm": grad_norm, "train/tokens_per_s": run.tokens_per_s}
            for k in range(K):
                metrics[f"train/head{k + 1}/loss"] = per_target[1 + k]
                metrics[f"train/head{k + 1}/top1"] = top1[k]
            accelerator.log(metrics, step=run.step)
        periodic_eval_and_save(run.step, cfg.train, evaluate_and_log, save)
    bar.close()

    if run.step < T:  # stopped early on purpose (stop_after_steps)
        save(run.step)
        accelerator.end_training()
        return {"stopped_at": run.step, "stage1": stage1}

    # ---- final evaluation, save, summary ------------------------------------------------
    evaluate_and_log(run.step)
    final = run.history[-1]
    heads_dir, backbone_dir = output_dir / "heads", output_dir / BACKBONE_DIR
    summary = {
        "recipe": cfg.recipe.name,
        "base_model": str(cfg.model.name_or_path),
        "heads_dir": str(heads_dir),
        "backbone_dir": str(backbone_dir),
        "backbone": backbone_name(m2),
        "backbone_saved_as": save_kind,
        "backbone_loss_kind": kind,
        "trainable_backbone_params": trainable,
        "stage1_heads": str(heads_from),
        "stage1": stage1,
        "num_heads": K,
        "heads_coefficient": m2.heads_coefficient,
        "schedule": m2.schedule,
        "head_lr_multiplier": m2.head_lr_multiplier,
        "min_agreement": m2.min_agreement,
        "steps": run.step,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "hidden_cache": False,
        "skipped_batches": run.skipped,
        "time_s": round(time.time() - start_time, 1),
        "train_loop_s_this_run": round(run.train_time, 1),
        "train_tokens_per_s_this_run": round(run.train_tokens * world / max(run.train_time, 1e-9), 1),
        "train_loss": run.losses,
        "backbone_loss": backbone_losses,
        "eval_untrained": untrained["eval"],
        "eval_final": final["eval"],
        "backbone_eval_untrained": untrained["backbone"],
        "backbone_eval_final": final["backbone"],
    }
    # The heads name their backbone (relative to their folder): loading them alone onto
    # the original model is refused rather than silently proposing for another model.
    heads.config.extra = {**heads.config.extra, BACKBONE_KEY: f"../{BACKBONE_DIR}"}
    save_heads(accelerator, heads, heads_dir)  # the same files whatever the topology (ZeRO-3: gathered)
    trained = [p for p in base.parameters() if p.requires_grad] if is_zero3(accelerator) else []
    with gathered(trained):  # ZeRO-3: the adapter (or every weight) whole on each process while saving
        if accelerator.is_main_process:
            save_backbone(backbone_dir, save_kind, peft_model if peft_model is not None else base,
                          base_name=str(cfg.model.name_or_path), tokenizer=tokenizer,
                          dtype="bfloat16" if m2.qlora else str(base.dtype).removeprefix("torch."),
                          trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    if accelerator.is_main_process:
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        print(format_backbone_summary(summary))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


# ---- stage 1 ------------------------------------------------------------------------------


def run_stage1(cfg: DictConfig, folder: Path) -> dict:
    """Heads on the frozen backbone: the medusa1 recipe into `folder` (skipped when a resumed
    run finds it finished)."""
    summary_file = folder / "train_summary.json"
    if cfg.resume and summary_file.is_file():
        print(f"stage 1 already done: heads in {folder / 'heads'}")
        return json.loads(summary_file.read_text())
    return medusa1.main(stage1_config(cfg, folder), end_training=False)  # stage 2 trains on in this process group


def stage1_config(cfg: DictConfig, folder: Path) -> DictConfig:
    """The medusa1 config of stage 1: heads at train.lr x head_lr_multiplier, weighted by
    stage1_heads_coefficient, for stage1_max_steps (default train.max_steps)."""
    m2 = cfg.medusa2
    stage1 = copy.deepcopy(cfg)
    stage1.output_dir = str(folder)
    stage1.recipe.name = "medusa1"
    stage1.train.lr = cfg.train.lr * m2.head_lr_multiplier
    stage1.train.heads_coefficient = m2.stage1_heads_coefficient
    if m2.stage1_max_steps is not None:
        stage1.train.max_steps = m2.stage1_max_steps
    stage1.logger.run_name = f"{cfg.logger.run_name or cfg.recipe.name}_stage1"
    return stage1


# ---- stage 2 parts --------------------------------------------------------------------------


class SelectedLogits(nn.Module):
    """Backbone and heads as one module (so DDP syncs both), producing logits only at the
    positions `keep` where some target exists: projecting every position onto the full
    vocabulary would cost B x T x V floats per micro-batch."""

    def __init__(self, medusa: MedusaModel):
        super().__init__()
        self.medusa = medusa

    def forward(self, input_ids, attention_mask, keep):
        hidden = self.medusa.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.medusa.logits_from_hidden(hidden[keep])  # (N, V), (K, N, V')


def base_logits(model: nn.Module, input_ids, attention_mask, keep) -> torch.Tensor:
    """(N, V) next-token logits of a causal LM at positions `keep` (B, T)."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    return model.get_output_embeddings()(hidden[keep])  # (N, V)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets of the base lm_head: position t predicts labels[t + 1]."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def backbone_loss_sum(logits: torch.Tensor, targets: torch.Tensor, original: torch.Tensor | None = None):
    """Sum over labelled positions of next-token CE (original None) or of KL(original || tuned).

    logits, original (N, V); targets (N,) with IGNORE_INDEX where no label counts.
    """
    if original is None:
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    labelled = targets != IGNORE_INDEX
    return F.kl_div(F.log_softmax(logits[labelled].float(), dim=-1), F.log_softmax(original[labelled].float(), dim=-1),
                    log_target=True, reduction="sum")


def param_groups(backbone: nn.Module, heads: nn.Module, lr: float, head_lr_multiplier: float) -> list[dict]:
    """AdamW groups: the backbone's trainable parameters at lr, the heads at lr x multiplier."""
    return [{"params": [p for p in backbone.parameters() if p.requires_grad], "lr": lr, "name": "backbone"},
            {"params": list(heads.parameters()), "lr": lr * head_lr_multiplier, "name": "heads"}]


@contextmanager
def eval_mode(module: nn.Module):
    """No dropout inside the block; the module's training flag is restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def evaluate_backbone(base, original_logits, rows, labels, batch_size, pad_id, accelerator) -> dict:
    """Next-token quality of the backbone on held-out rows: CE (and perplexity) on the labels,
    and, when `original_logits` is given, against the original model: KL(original || tuned) and the
    share of positions where both give the same top-1 token (greedy agreement)."""
    device = accelerator.device
    mine = [i for i in range(len(rows)) if i % accelerator.num_processes == accelerator.process_index]
    sums = torch.zeros(4, device=device)  # CE sum, KL sum, top-1 agreements, labelled positions
    with eval_mode(base):
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            batch = collate([{"input_ids": rows[i], "labels": labels[i]} for i in idx], pad_id)
            input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            targets = next_token_targets(batch["labels"].to(device))  # (B, T)
            keep = targets != IGNORE_INDEX
            with accelerator.autocast():
                logits = base_logits(base, input_ids, attention_mask, keep)  # (N, V)
            sums[0] += backbone_loss_sum(logits, targets[keep])
            if original_logits is not None:
                original = original_logits(input_ids, attention_mask, keep)  # (N, V)
                sums[1] += backbone_loss_sum(logits, targets[keep], original)
                sums[2] += (logits.argmax(-1) == original.argmax(-1)).sum()
            sums[3] += keep.sum()
    ce, kl, agree, n = accelerator.reduce(sums, reduction="sum").tolist()
    n = max(n, 1.0)
    result = {"tokens": int(n), "ce": round(ce / n, 5), "ppl": round(math.exp(ce / n), 4)}
    if original_logits is not None:
        result.update({"kl_to_original": round(kl / n, 6), "top1_agreement": round(agree / n, 5)})
    return result


def format_backbone_summary(s: dict) -> str:
    u, f = s["backbone_eval_untrained"], s["backbone_eval_final"]
    backbone = (f"backbone: {s['backbone']} ({s['trainable_backbone_params']:,} trainable parameters), loss "
                f"{s['backbone_loss_kind']}, saved as {s['backbone_saved_as']} in {s['backbone_dir']}")
    lines = [format_summary(s), backbone,
             f"held-out next-token perplexity {f['ppl']:.3f} (original {u['ppl']:.3f}) on {f['tokens']} tokens"]
    if "top1_agreement" in f:
        lines.append(f"greedy agreement with the original model {f['top1_agreement']:.3f}, "
                     f"KL(original || tuned) {f['kl_to_original']:.5f} nats/token")
        if f["top1_agreement"] < s["min_agreement"]:
            # The heads' gradient pulls the backbone away from the original; its weight sets how far.
            lines.append(f"WARNING: greedy agreement {f['top1_agreement']:.3f} is below medusa2.min_agreement "
                         f"{s['min_agreement']}: the tuned model's answers differ from the original's. A lower "
                         f"medusa2.heads_coefficient (now {s['heads_coefficient']}) keeps it closer (eval/README.md, "
                         "Medusa-2 results)")
    return "\n".join(lines)


# ---- config -------------------------------------------------------------------------------------


def backbone_name(m2: DictConfig) -> str:
    return "full" if m2.backbone == "full" else ("qlora" if m2.qlora else "lora") + f" r={m2.lora_r}"


def resolve_backbone_loss(requested: str, sources: list[str], data_is_self_distilled: bool) -> str:
    """ce or kl. auto: kl when the data is the model's own answers (the flag, or a
    `<file>.meta.json` written by the self_distill recipe next to any data file): CE on
    sampled answers would pull the backbone towards those samples; KL keeps its distribution."""
    if requested != "auto":
        return requested
    if data_is_self_distilled:
        return "kl"
    for source in sources:
        try:
            path = resolve_data_path(source)
        except FileNotFoundError:  # a hub dataset id
            continue
        if meta_file(path).is_file():
            return "kl"
    return "ce"


def check_precision(dtype: torch.dtype, backbone: str, qlora: bool, mixed_precision: str) -> None:
    if backbone == "full" and dtype != torch.float32:
        raise ValueError(f"full fine-tuning keeps fp32 weights (AdamW updates vanish in {dtype}): set "
                         "model.dtype=float32; train.mixed_precision=bf16 still computes in bf16")
    if (qlora or dtype != torch.float32) and mixed_precision == "no":
        raise ValueError(f"the backbone computes in {'4-bit/bf16' if qlora else dtype} but train.mixed_precision "
                         "is off: set train.mixed_precision=bf16 (trainable weights stay fp32 under autocast) "
                         "or model.dtype=float32")


def check_deepspeed(m2: DictConfig, accelerator) -> None:
    """What the DeepSpeed path does not cover."""
    if not is_deepspeed(accelerator):
        return
    if m2.qlora:
        raise ValueError("medusa2.qlora=true runs on the plain path (ddp.yaml): its 4-bit base is not partitioned "
                         "by DeepSpeed; use LoRA on the bf16 backbone with ZeRO-2/3 instead")
    if is_zero3(accelerator) and m2.backbone == "full" and m2.backbone_loss != "ce":
        raise ValueError("medusa2.backbone=full with the KL loss keeps a frozen copy of the backbone, which ZeRO-3 "
                         "cannot partition: use medusa2.backbone=lora (the original is the adapter disabled) or "
                         "medusa2.backbone_loss=ce")
    if m2.save == "merged":
        raise ValueError("medusa2.save=merged reloads the base model on one process; under DeepSpeed save the "
                         "adapter (medusa2.save=auto) and merge it afterwards with training.lora.load_backbone")


def check_config(cfg: DictConfig) -> None:
    m2 = cfg.medusa2
    stages = list(m2.stages)
    problems = [text for text, ok in [
        ("stages a non-empty subset of [1, 2]", bool(stages) and set(stages) <= {1, 2}),
        ("backbone lora or full", m2.backbone in ("lora", "full")),
        ("backbone_loss auto, ce or kl", m2.backbone_loss in ("auto", "ce", "kl")),
        ("save auto, adapter or merged", m2.save in ("auto", "adapter", "merged")),
        ("head_lr_multiplier > 0", m2.head_lr_multiplier > 0),
        ("heads_coefficient >= 0", m2.heads_coefficient >= 0),
        ("lora_r >= 1", m2.lora_r >= 1),
        ("0 <= min_agreement <= 1", 0 <= m2.min_agreement <= 1),
    ] if not ok]
    if problems:
        raise ValueError(f"medusa2 settings out of range: need {', '.join(problems)}")
    ramp_fraction(m2.schedule)  # raises on an unknown schedule name
    if m2.backbone == "full" and (m2.qlora or m2.save in ("adapter", "merged")):
        raise ValueError("medusa2.qlora and medusa2.save=adapter|merged need medusa2.backbone=lora: full "
                         "fine-tuning saves the whole model")
    if m2.qlora:
        require_bitsandbytes()
    if m2.stage1_heads and 1 in stages:
        raise ValueError(f"medusa2.stage1_heads={m2.stage1_heads} replaces stage 1: set medusa2.stages=[2], or "
                         "drop stage1_heads to train stage 1 into <output_dir>/stage1")
    if 1 not in stages and not m2.stage1_heads and not (Path(cfg.output_dir) / STAGE1_DIR / "heads").is_dir():
        raise FileNotFoundError(f"stage 2 starts from trained heads: pass medusa2.stage1_heads=<heads folder> (e.g. a "
                                f"medusa1 run's heads), or run stage 1 too; {cfg.output_dir}/{STAGE1_DIR}/heads "
                                "does not exist")
