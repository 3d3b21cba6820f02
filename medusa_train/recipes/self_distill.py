"""Self-distillation: the base model answers the data's user turns; train heads on that.

    python -m medusa_train +recipe=self_distill
    python -m medusa_train +recipe=self_distill resume=true      # carry on after a kill
    accelerate launch --config_file recipes/accelerate_configs/cpu_ddp.yaml -m medusa_train +recipe=self_distill
    python -m medusa_train +recipe=medusa1 data.sources=[runs/self_distill/self_distill.jsonl]

Reads top to bottom: set-up, output file (fresh, resume or refuse), data, what is already
answered, model, generation (chunk by chunk, each appended to this process's part file),
merge of the parts into self_distill.output_file, summary.

With N processes, process r answers data rows r, r+N, r+2N, ... and writes
`<output_file>.part{r}`; the main process merges the parts, sorted by id, at the end.
Greedy answers (the default, temperature 0) do not depend on N, on batch_size or on a
resume; sampled ones are reproducible for the same N and batch_size without a kill.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm

from medusa_train.base_model import load_base_model, load_tokenizer
from medusa_train.data import load_conversations
from medusa_train.data.self_distill import (
    answered_ids,
    append_jsonl,
    check_settings,
    count_user_turns,
    distill_conversations,
    merge_parts,
    meta_file,
    part_file,
    part_files,
    prompt_turns,
    repair_jsonl,
    stop_token_ids,
    write_meta,
)
from medusa_train.training.setup import make_accelerator

log = logging.getLogger(__name__)


def main(cfg: DictConfig) -> dict:
    # ---- set-up -------------------------------------------------------------------------
    sd = cfg.self_distill
    _check_config(sd)
    accelerator = make_accelerator()
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:  # each process would answer every row into the same part file
        raise RuntimeError(f"{launched} processes were launched but accelerate sees {world}: check the accelerate "
                           "config (on a CPU-only machine use recipes/accelerate_configs/cpu_ddp.yaml)")
    # One sampling stream per process, so shards do not repeat each other; greedy ignores it.
    set_seed(cfg.seed + rank)
    output_file = Path(sd.output_file)
    settings = generation_settings(cfg)

    # ---- output file: fresh, resume, or refuse ------------------------------------------
    existing = output_file.exists() or bool(part_files(output_file)) or meta_file(output_file).exists()
    accelerator.wait_for_everyone()  # every process has looked before the main one deletes anything
    if existing and not cfg.resume:
        if not cfg.overwrite:
            raise FileExistsError(f"{output_file} already exists: pass resume=true to carry on generating into it, "
                                  "overwrite=true to regenerate it, or self_distill.output_file=<another file>")
        if is_main:
            for p in [output_file, meta_file(output_file), *part_files(output_file)]:
                p.unlink(missing_ok=True)
        existing = False
    meta = check_settings(output_file, settings) if existing else None  # same answer on every process
    accelerator.wait_for_everyone()
    if is_main:
        output_file.parent.mkdir(parents=True, exist_ok=True)
        if meta is None:  # written before any row, so rows never exist without their settings
            meta = {"settings": settings, "info": data_info(cfg), "runs": []}
            write_meta(output_file, meta)
        for p in part_files(output_file):  # a kill mid-append leaves a torn last line: cut it
            if cut := repair_jsonl(p):
                log.warning("%s: dropped a half-written last row (%d bytes) left by an interrupted run", p, cut)
    accelerator.wait_for_everyone()

    # ---- data ---------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision)
    with accelerator.main_process_first():  # one process reads and converts, the others hit the cache
        data = load_conversations(list(cfg.data.sources), format=cfg.data.format, split=cfg.data.split,
                                  max_rows=cfg.data.max_rows, require_assistant=False)
    conversations, sources = data["messages"], data["source"]

    # ---- what is already answered -------------------------------------------------------
    done = answered_ids(output_file, conversations, sd.max_turns)
    todo = [i for i in range(rank, len(conversations), world) if i not in done]
    # Longest first: chunks (and so batches) hold similar lengths, and the biggest batch
    # runs first, so an out-of-memory shows in the first minute, not the last.
    todo.sort(key=lambda i: -_first_prompt_chars(conversations[i], sd.max_turns))
    if is_main and done:
        answered = sum(1 for i in done if i < len(conversations))
        print(f"resuming {output_file}: {answered} of {len(conversations)} conversations already answered")

    # ---- model --------------------------------------------------------------------------
    model = load_base_model(cfg.model.name_or_path, cfg.model.dtype, accelerator.device,
                            cfg.model.trust_remote_code, cfg.model.revision)
    stop_ids = stop_token_ids(model, tokenizer)

    # ---- generate -----------------------------------------------------------------------
    part = part_file(output_file, rank)
    total_answers = sum(count_user_turns(conversations[i], sd.max_turns) for i in todo)
    bar = tqdm(total=total_answers, desc=f"self-distill answers (process {rank} of {world})", unit="answer",
               disable=not accelerator.is_local_main_process)
    answers = tokens = truncated = empty = 0
    # A chunk's conversations are all the prompts a wave can batch: never fewer than batch_size.
    chunk_size = max(sd.chunk_size, sd.batch_size)
    start = time.time()
    for first in range(0, len(todo), chunk_size):
        ids = todo[first:first + chunk_size]
        results = distill_conversations(
            model, tokenizer, [conversations[i] for i in ids], max_new_tokens=sd.max_new_tokens,
            temperature=sd.temperature, top_p=sd.top_p, batch_size=sd.batch_size, max_turns=sd.max_turns,
            stop_ids=stop_ids, on_batch=lambda batch: bar.update(len(batch)))
        append_jsonl(part, [{"id": i, "messages": r.messages, "source": sources[i], "truncated": r.truncated}
                            for i, r in zip(ids, results)])
        answers += sum(r.num_answers for r in results)
        tokens += sum(r.num_tokens for r in results)
        truncated += sum(r.truncated for r in results)
        empty += sum(1 for r in results for m in r.messages if m["role"] == "assistant" and not m["content"])
        bar.set_postfix(tokens_per_s=f"{tokens / max(time.time() - start, 1e-9):.0f}")
    bar.close()
    elapsed = time.time() - start

    # ---- merge and summary --------------------------------------------------------------
    counts = torch.tensor([len(todo), answers, tokens, truncated, empty], dtype=torch.float64, device=accelerator.device)
    counts = accelerator.reduce(counts, reduction="sum").tolist()
    elapsed = float(accelerator.gather(torch.tensor([elapsed], device=accelerator.device)).max())  # the slowest shard
    summary = {
        "output_file": str(output_file),
        "base_model": str(cfg.model.name_or_path),
        "dtype": str(model.dtype).removeprefix("torch."),
        "processes": world,
        "batch_size": sd.batch_size,
        "conversations": int(counts[0]),
        "answers": int(counts[1]),
        "tokens": int(counts[2]),
        "truncated_conversations": int(counts[3]),
        "empty_answers": int(counts[4]),
        "generation_s": round(elapsed, 1),
        "answers_per_min": round(counts[1] / max(elapsed, 1e-9) * 60, 2),
        "tokens_per_s": round(counts[2] / max(elapsed, 1e-9), 1),
        "stop_token_ids": stop_ids,
    }
    accelerator.wait_for_everyone()  # every part file is complete
    if is_main:
        summary["rows_in_file"] = merge_parts(output_file)
        meta = json.loads(meta_file(output_file).read_text())
        meta["runs"].append({**summary, **data_info(cfg), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        write_meta(output_file, meta)
        print(format_summary(summary, sd.max_new_tokens))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


# ---- helpers ------------------------------------------------------------------------------


def generation_settings(cfg: DictConfig) -> dict:
    """What decides the answers: a file is only ever resumed with these unchanged. The data
    itself is checked row by row on resume (answered_ids); batch_size, chunk_size and the
    number of processes do not change greedy answers and may differ between runs."""
    sd = cfg.self_distill
    sampled = sd.temperature > 0
    return {
        "base_model": str(cfg.model.name_or_path),
        "revision": cfg.model.revision,
        "max_new_tokens": sd.max_new_tokens,
        "temperature": sd.temperature,
        "top_p": sd.top_p if sampled else None,
        "seed": cfg.seed if sampled else None,
        "max_turns": sd.max_turns,
    }


def data_info(cfg: DictConfig) -> dict:
    return {"data_sources": list(cfg.data.sources), "data_format": cfg.data.format, "data_split": cfg.data.split,
            "max_rows": cfg.data.max_rows, "model_dtype": cfg.model.dtype}


def format_summary(s: dict, max_new_tokens: int) -> str:
    lines = [
        (f"\nSelf-distilled {s['conversations']} conversations ({s['answers']} answers, {s['tokens']} tokens) "
         f"with {s['base_model']} ({s['dtype']}) on {s['processes']} process(es), batch {s['batch_size']}, "
         f"in {s['generation_s']:.0f} s: {s['answers_per_min']:.1f} answers/min, {s['tokens_per_s']:.1f} tokens/s"),
        (f"wrote {s['output_file']} ({s['rows_in_file']} conversations in all); settings in "
         f"{meta_file(Path(s['output_file'])).name}"),
    ]
    if s["truncated_conversations"]:
        lines.append(f"{s['truncated_conversations']} conversations have an answer cut at max_new_tokens="
                     f"{max_new_tokens} (kept, marked \"truncated\": true)")
    if s["empty_answers"]:
        lines.append(f"{s['empty_answers']} answers are empty; the training readers skip those conversations")
    lines.append(f"train heads on it: python -m medusa_train +recipe=medusa1 data.sources=[{s['output_file']}]")
    return "\n".join(lines)


def _first_prompt_chars(messages: list[dict], max_turns: int | None) -> int:
    chars = 0
    for m in prompt_turns(messages, max_turns):
        chars += len(m["content"])
        if m["role"] == "user":
            break
    return chars


def _check_config(sd: DictConfig) -> None:
    problems = [name for name, ok in [
        ("batch_size >= 1", sd.batch_size >= 1), ("chunk_size >= 1", sd.chunk_size >= 1),
        ("max_new_tokens >= 1", sd.max_new_tokens >= 1), ("temperature >= 0", sd.temperature >= 0),
        ("0 < top_p <= 1", 0 < sd.top_p <= 1), ("max_turns >= 1 or null", sd.max_turns is None or sd.max_turns >= 1),
    ] if not ok]
    if problems:
        raise ValueError(f"self_distill settings out of range: need {', '.join(problems)}")
