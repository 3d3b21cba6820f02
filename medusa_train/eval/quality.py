"""What a tuned backbone (Medusa-2) changed in what the model says, against the original.

agreement    The original model's greedy answers to held-out prompts, fed teacher-forced to
             the tuned model: the fraction of answer tokens that are the tuned model's argmax
             too (1.0: greedy behaviour unchanged). Also, the tuned model answering on its
             own: the fraction of answers identical to the original's and the mean length of
             the common prefix, as a fraction of the original answer.
perplexity   Of each model on the held-out split's reference answers (assistant tokens), so
             a drop in language-modelling quality shows even where greedy answers agree.

The held-out prompts are the medusa1 recipe's split (eval/accuracy.py), never trained on.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from medusa_train.eval.accuracy import first_prompt, held_out_rows, run_data_config, self_answers
from medusa_train.loss import IGNORE_INDEX


def backbone_quality(original, tuned, tokenizer, heads_path, num_prompts: int = 32, max_new_tokens: int = 128,
                     batch_size: int = 8, progress: bool = True) -> dict:
    """Agreement and perplexity of `tuned` against `original` (both HF causal LMs) -> a dict of numbers."""
    ids, labels = held_out_rows(tokenizer, run_data_config(heads_path), num_prompts)
    prompts = [p for p in (first_prompt(i, lab) for i, lab in zip(ids, labels)) if p]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, answer_labels = self_answers(original, prompts, max_new_tokens, pad, batch_size, progress)
    tuned_rows, _ = self_answers(tuned, prompts, max_new_tokens, pad, batch_size, progress)
    starts = [next((i for i, t in enumerate(lab) if t != IGNORE_INDEX), len(lab)) for lab in answer_labels]
    prefix = [common_prefix_fraction(a, b, start) for a, b, start in zip(rows, tuned_rows, starts)]
    return {
        "prompts": len(prompts),
        "answer_tokens": sum(sum(t != IGNORE_INDEX for t in row) for row in answer_labels),
        "teacher_forced_agreement": argmax_agreement(tuned, rows, answer_labels, batch_size, progress),
        "original_self_agreement": argmax_agreement(original, rows, answer_labels, batch_size, progress),
        "identical_answers": sum(f == 1.0 for f in prefix) / max(len(prefix), 1),
        "common_prefix_fraction": sum(prefix) / max(len(prefix), 1),
        "perplexity_original": perplexity(original, ids, labels, batch_size, progress),
        "perplexity_tuned": perplexity(tuned, ids, labels, batch_size, progress),
        "reference_tokens": sum(sum(t != IGNORE_INDEX for t in row) for row in labels),
    }


def common_prefix_fraction(original: list[int], tuned: list[int], prompt_len: int) -> float:
    """Length of the answers' common prefix over the original answer's length."""
    a, b = original[prompt_len:], tuned[prompt_len:]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return 1.0 if a == b else same / max(len(a), 1)


@torch.no_grad()
def argmax_agreement(model, rows: list[list[int]], labels: list[list[int]], batch_size: int = 8,
                     progress: bool = True) -> float:
    """Fraction of labelled tokens that are the model's argmax given the tokens before them."""
    hits = total = 0
    for hidden, targets, lm_head in labelled_hidden(model, rows, labels, batch_size, progress, "agreement"):
        hits += int((lm_head(hidden).argmax(-1) == targets).sum())
        total += targets.numel()
    return hits / max(total, 1)


@torch.no_grad()
def perplexity(model, rows: list[list[int]], labels: list[list[int]], batch_size: int = 8,
               progress: bool = True) -> float:
    """exp(mean negative log-likelihood) over the labelled tokens."""
    nll, total = 0.0, 0
    for hidden, targets, lm_head in labelled_hidden(model, rows, labels, batch_size, progress, "perplexity"):
        logits = lm_head(hidden).float()
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        total += targets.numel()
    return math.exp(nll / max(total, 1))


def labelled_hidden(model, rows, labels, batch_size, progress, desc):
    """Per batch of right-padded rows: the last hidden states at positions whose next token is
    labelled (N, H), those tokens (N,), and the lm_head. Only those positions are projected onto
    the vocabulary, which is most of the cost."""
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, leave=False):
        chunk, chunk_labels = rows[start:start + batch_size], labels[start:start + batch_size]
        T = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        target = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        for b, (r, lab) in enumerate(zip(chunk, chunk_labels)):
            ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
            target[b, :len(lab) - 1] = torch.tensor(lab[1:])  # position t predicts token t+1
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        keep = (target != IGNORE_INDEX).to(device)
        yield hidden[keep], target.to(device)[keep], lm_head
