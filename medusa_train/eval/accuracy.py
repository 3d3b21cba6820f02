"""Head accuracy as decoding sees it: the rank of the right token in each head's top-k.

For every position t inside an answer, `ranks[t, k]` is the rank (0 = top-1) of token
t+k+2 among head k's proposals at t, or MISS when it is not in the top-`topk` (or not in a
truncated head vocabulary). A position counts for head k only if tokens t+1 .. t+k+2 all
lie in the answer: decoding drafts from the hidden state that produced the root (t+1).

From the rank table come the per-head top-1..top-k accuracies and the probability that a
tree node is right (see `path_probability`): the tree search's input.

Where the answers come from (`source`):
  self  The base model's own greedy answers to held-out prompts: under greedy acceptance a
        node is accepted exactly when its path equals the model's continuation, so this
        measures what decoding sees (default).
  data  The held-out split's reference answers, as the medusa1 recipe's evaluation: text
        written by people or other models, harder to predict than the model's own, so the
        accuracies come out lower than what decoding meets.
Both use the medusa1 held-out split: `train_eval_split(tokenized, eval_fraction, seed)` with
the run's data config (runs/<name>/.hydra/config.yaml) when there is one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from medusa_train.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

MISS = -1  # target not in the head's top-k
NO_TARGET = -2  # no target for this head at this position

ESTIMATORS = ("joint", "conditional", "independent")


@dataclass
class HeadRanks:
    ranks: torch.Tensor  # (N, K) int16: rank of the right token in head k's top-k, MISS or NO_TARGET
    topk: int
    source: str

    @property
    def num_heads(self) -> int:
        return self.ranks.shape[1]

    def valid(self, depth: int) -> torch.Tensor:
        """(N,) positions where heads 0..depth-1 all have a target."""
        return (self.ranks[:, :depth] != NO_TARGET).all(-1)

    def positions(self) -> list[int]:
        """Positions counted per head."""
        return [int(self.valid(k + 1).sum()) for k in range(self.num_heads)]

    def topk_accuracy(self) -> list[list[float]]:
        """(K, topk): [k][i] = P(head k's right token is in its top-(i+1))."""
        out = []
        for k in range(self.num_heads):
            r = self.ranks[self.valid(k + 1), k]
            hits = torch.stack([((r >= 0) & (r <= i)).float().mean() for i in range(self.topk)]) if r.numel() else None
            out.append([0.0] * self.topk if hits is None else [round(float(h), 5) for h in hits])
        return out

    def rank_accuracy(self) -> torch.Tensor:
        """(K, topk): [k, i] = P(head k's rank-i proposal is right) (marginal)."""
        acc = torch.zeros(self.num_heads, self.topk)
        for k in range(self.num_heads):
            r = self.ranks[self.valid(k + 1), k].long()
            if r.numel():
                acc[k] = torch.bincount(r[r >= 0], minlength=self.topk)[: self.topk].float() / r.numel()
        return acc

    def conditional_accuracy(self) -> torch.Tensor:
        """(K, topk): [k, i] = P(head k's rank-i proposal is right | heads 0..k-1 right within their top-k)."""
        acc = torch.zeros(self.num_heads, self.topk)
        for k in range(self.num_heads):
            keep = self.valid(k + 1) & (self.ranks[:, :k] >= 0).all(-1)
            r = self.ranks[keep, k].long()
            if r.numel():
                acc[k] = torch.bincount(r[r >= 0], minlength=self.topk)[: self.topk].float() / r.numel()
        return acc

    def path_probability(self, estimator: str = "joint"):
        """A function path (tuple of ranks) -> P(every node on the path is right).

        joint        the measured frequency of exactly these ranks at these depths (no assumption);
        conditional  product over depths of conditional_accuracy (Medusa's construction with
                     accuracies conditioned on the heads above being right);
        independent  product of marginal rank accuracies (the Medusa paper's construction).
        """
        if estimator == "independent":
            return product_probability(self.rank_accuracy())
        if estimator == "conditional":
            return product_probability(self.conditional_accuracy())
        if estimator != "joint":
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        valid = [self.valid(d) for d in range(self.num_heads + 1)]
        totals = [max(int(v.sum()), 1) for v in valid]
        cache: dict[tuple, torch.Tensor] = {(): torch.ones(self.ranks.shape[0], dtype=torch.bool)}

        def prob(path: tuple[int, ...]) -> float:
            if len(path) > self.num_heads or max(path, default=0) >= self.topk:
                return 0.0
            for d in range(1, len(path) + 1):
                if path[:d] not in cache:
                    cache[path[:d]] = cache[path[: d - 1]] & (self.ranks[:, d - 1] == path[d - 1])
            return float((cache[path] & valid[len(path)]).sum()) / totals[len(path)]

        return prob

    def summary(self) -> dict:
        return {
            "source": self.source,
            "positions": self.positions(),
            "topk_accuracy": self.topk_accuracy(),  # [head][i]: top-(i+1)
            "rank_accuracy": [[round(float(a), 5) for a in row] for row in self.rank_accuracy()],
            "conditional_accuracy": [[round(float(a), 5) for a in row] for row in self.conditional_accuracy()],
        }

    def save(self, path: str | Path) -> None:
        torch.save({"ranks": self.ranks, "topk": self.topk, "source": self.source}, path)

    @classmethod
    def load(cls, path: str | Path) -> "HeadRanks":
        raw = torch.load(path, weights_only=True)
        return cls(raw["ranks"], raw["topk"], raw["source"])


def product_probability(acc: torch.Tensor):
    """(K, topk) per-depth rank accuracies -> path -> product of acc[depth, rank] along the path."""
    table = acc.tolist()

    def prob(path: tuple[int, ...]) -> float:
        if len(path) > len(table) or any(i >= len(table[0]) for i in path):
            return 0.0
        return math.prod(table[d][i] for d, i in enumerate(path))

    return prob


# ---- measuring -----------------------------------------------------------------------------


@torch.no_grad()
def measure_ranks(model, rows: list[list[int]], labels: list[list[int]], topk: int = 10, batch_size: int = 8,
                  source: str = "self", progress: bool = True) -> HeadRanks:
    """Rank table of `model` (a MedusaModel) on token rows; labels: the answer tokens, -100 elsewhere."""
    K = model.heads.num_heads
    device = next(model.parameters()).device
    tables = []
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths batch together
    for start in tqdm(range(0, len(rows), batch_size), desc="head accuracy", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        T = max(len(rows[i]) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        lab = torch.full((len(idx), T), IGNORE_INDEX, dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, : len(rows[i])] = torch.tensor(rows[i])
            mask[b, : len(rows[i])] = 1
            lab[b, : len(labels[i])] = torch.tensor(labels[i])
        targets, keep = chain_targets(lab, K)  # (K, B, T), (B, T)
        if not keep.any():
            continue
        hidden = model.decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # (B, T, H)
        head_logits = model.heads(hidden[keep.to(device)], model.lm_head)  # (K, N, V')
        full = targets[:, keep]  # (K, N) full-vocabulary ids; outside a truncated head vocabulary -> a miss
        ranks = rank_table(head_logits.float(), model.heads.to_head_vocab(full).to(device), topk).cpu()
        tables.append(torch.where(full.T == IGNORE_INDEX, NO_TARGET, ranks).to(torch.int16))
    ranks = torch.cat(tables) if tables else torch.empty(0, K, dtype=torch.int16)
    return HeadRanks(ranks, topk, source)


def chain_targets(labels: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) labels -> targets (K, B, T) with targets[k, b, t] = labels[b, t+k+2] where tokens
    t+1 .. t+k+2 are all labelled (else -100), and the (B, T) positions where head 0 has one."""
    B, T = labels.shape
    labelled = labels != IGNORE_INDEX
    targets = labels.new_full((num_heads, B, T), IGNORE_INDEX)
    chain = torch.zeros(B, T, dtype=torch.bool)
    chain[:, : T - 1] = labelled[:, 1:]  # token t+1 (the root) is in the answer
    for k in range(num_heads):
        shift = k + 2
        if shift >= T:
            break
        ok = torch.zeros(B, T, dtype=torch.bool)
        ok[:, : T - shift] = labelled[:, shift:]
        chain &= ok
        targets[k] = torch.where(chain, torch.cat([labels[:, shift:], labels.new_full((B, shift), 0)], 1), IGNORE_INDEX)
    return targets, targets[0] != IGNORE_INDEX


def rank_table(head_logits: torch.Tensor, targets: torch.Tensor, topk: int) -> torch.Tensor:
    """head logits (K, N, V'), head-vocab targets (K, N) -> (N, K) ranks, or MISS (a target of -100,
    e.g. outside a truncated head vocabulary, is a miss; the caller marks positions without a target)."""
    top = head_logits.topk(min(topk, head_logits.shape[-1]), dim=-1).indices  # (K, N, k)
    hit = top == targets.unsqueeze(-1)  # (K, N, k)
    ranks = torch.where(hit.any(-1), hit.int().argmax(-1), MISS)
    return ranks.T.to(torch.int16).contiguous()


# ---- held-out prompts and answers ----------------------------------------------------------------


def run_data_config(heads_path: str | Path):
    """The data config of the run that trained the heads (runs/<name>/.hydra/config.yaml), else the defaults."""
    from medusa_train.config import DataConfig

    run_config = Path(heads_path).resolve().parent / ".hydra" / "config.yaml"
    default = OmegaConf.structured(DataConfig)
    if run_config.is_file():
        raw = OmegaConf.load(run_config)
        if "data" in raw:
            log.info("held-out split: data config of %s", run_config)
            return OmegaConf.merge(default, raw.data)
    return default


def held_out_rows(tokenizer, data_cfg, max_rows: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """The medusa1 recipe's held-out split: (input_ids rows, labels rows)."""
    from medusa_train.data import load_conversations, tokenize_conversations, train_eval_split

    conversations = load_conversations(list(data_cfg.sources), format=data_cfg.format, split=data_cfg.split,
                                       max_rows=data_cfg.max_rows)
    tokenized = tokenize_conversations(conversations, tokenizer, data_cfg.max_length)
    _, eval_ds = train_eval_split(tokenized, data_cfg.eval_fraction, data_cfg.seed)
    n = min(len(eval_ds), data_cfg.eval_max_rows, max_rows or len(eval_ds))
    eval_ds = eval_ds.select(range(n))
    return eval_ds["input_ids"], eval_ds["labels"]


def first_prompt(ids: list[int], labels: list[int]) -> list[int] | None:
    """The tokens before the first answer token: the first user turn and the assistant header."""
    first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
    return None if not first else ids[:first]


@torch.no_grad()
def self_answers(base, prompts: list[list[int]], max_new_tokens: int, pad_id: int, batch_size: int = 8,
                 progress: bool = True) -> tuple[list[list[int]], list[list[int]]]:
    """An HF causal LM's greedy answers -> (prompt + answer rows, labels on the answer only, EOS
    included), in order of prompt length."""
    device = next(base.parameters()).device
    eos = base.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    rows, labels = [], []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in tqdm(chunks, desc="greedy answers", disable=not progress, leave=False):
        P = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), P), pad_id, dtype=torch.long)
        mask = torch.zeros(len(idx), P, dtype=torch.long)
        for b, i in enumerate(idx):  # left padding
            ids[b, P - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[b, P - len(prompts[i]) :] = 1
        out = base.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                            max_new_tokens=max_new_tokens, pad_token_id=pad_id)
        for b, i in enumerate(idx):
            answer = out[b, P:].tolist()
            end = next((j + 1 for j, t in enumerate(answer) if t in eos), len(answer))
            rows.append(prompts[i] + answer[:end])
            labels.append([IGNORE_INDEX] * len(prompts[i]) + answer[:end])
    return rows, labels


def head_accuracy(model, tokenizer, heads_path: str | Path, source: str = "self", num_prompts: int = 64,
                  max_new_tokens: int = 128, topk: int = 10, batch_size: int = 8, progress: bool = True,
                  cache: bool = True, prompts: list[list[int]] | None = None) -> HeadRanks:
    """Rank table on the medusa1 held-out split, from the model's own answers (self) or the references (data);
    or on the model's own answers to `prompts` (token ids, e.g. benchmark questions) when given.

    The self answers depend on the base model only, so they are kept in the medusa_train cache
    (`answers_cache_file`) and reused when the heads change.
    """
    if source not in ("self", "data"):
        raise ValueError(f"accuracy.source must be self or data, got {source!r}")
    if prompts is None:
        ids, labels = held_out_rows(tokenizer, run_data_config(heads_path), num_prompts)
        if source == "data":
            return measure_ranks(model, ids, labels, topk, batch_size, "data", progress)
        prompts = [p for p in (first_prompt(i, lab) for i, lab in zip(ids, labels)) if p]
    elif source == "data":
        raise ValueError("given prompts have no reference answers: use source=self")
    cache_file = answers_cache_file(model, prompts, max_new_tokens)
    if cache and cache_file.is_file():
        log.info("self answers from %s", cache_file)
        saved = json.loads(cache_file.read_text())
        rows, answer_labels = saved["rows"], saved["labels"]
    else:
        rows, answer_labels = self_answers(model.base, prompts, max_new_tokens, tokenizer.pad_token_id, batch_size, progress)
        if cache:
            from medusa_train.training.checkpoint import atomic_write

            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_file, lambda tmp: tmp.write_text(json.dumps({"rows": rows, "labels": answer_labels})))
    return measure_ranks(model, rows, answer_labels, topk, batch_size, "self", progress)


def answers_cache_file(model, prompts: list[list[int]], max_new_tokens: int) -> Path:
    """<medusa_train cache>/self_answers/<hash of base model, dtype, prompts, length>.json"""
    from medusa_train.base_model import cache_dir

    base = model.base
    params = list(base.parameters())
    weights = [p.detach().flatten()[:4096].float().cpu().numpy().tobytes().hex() for p in (params[0], params[-1])]
    key = json.dumps([base.config.to_json_string(use_diff=True), str(base.dtype), weights, max_new_tokens, prompts])
    return cache_dir() / "self_answers" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
