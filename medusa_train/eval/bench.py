"""Interleaved timing of decoding methods on benchmark questions.

Every prompt is decoded by every method back to back, the baseline first on even prompts
and last on odd ones, so a slow-down of the machine (other jobs, heat) hits all methods
alike instead of whichever ran during it.

Multi-turn questions run turn by turn. Turn j's prompt is the chat template over the user
turns 1..j with the *baseline's* answers in between, the same prompt for every method, so
every method's outputs stay comparable with the baseline's (a method that diverged on turn
1 is not penalised again on turn 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from medusa_train.eval.methods import BASELINE, Generation, Method
from medusa_train.eval.questions import Question


@dataclass
class Prompt:
    question_id: int | str
    category: str
    turn: int  # 0-based
    input_ids: torch.Tensor  # (1, P)


def chat_prompt(tokenizer, messages: list[dict]) -> torch.Tensor:
    """The model's chat template with the generation prompt -> (1, P) ids."""
    from medusa_train.data import chat_template

    return tokenizer.apply_chat_template(messages, chat_template=chat_template(tokenizer), add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def method_order(names: list[str], index: int) -> list[str]:
    """Baseline first, then the others, on even prompts; the reverse on odd prompts."""
    order = [BASELINE] + [n for n in names if n != BASELINE]
    return order if index % 2 == 0 else order[::-1]


def run_bench(methods: dict[str, Method], questions: list[Question], tokenizer, max_turns: int | None = None,
              device: torch.device | str = "cpu", progress: bool = True) -> list[dict]:
    """Decode every (question, turn) with every method, interleaved -> one record per prompt."""
    if BASELINE not in methods:
        raise ValueError(f"the benchmark needs the baseline method {BASELINE!r}")
    turns = [min(len(q.turns), max_turns or len(q.turns)) for q in questions]
    bar = tqdm(total=sum(turns), desc="prompts", disable=not progress)
    records, index = [], 0
    for question, n_turns in zip(questions, turns):
        messages: list[dict] = []
        for turn in range(n_turns):
            messages.append({"role": "user", "content": question.turns[turn]})
            ids = chat_prompt(tokenizer, messages).to(device)
            results: dict[str, Generation] = {}
            order = method_order(list(methods), index)
            for name in order:
                results[name] = methods[name](ids)
            base = results[BASELINE]
            records.append({
                "question_id": question.question_id,
                "category": question.category,
                "turn": turn,
                "prompt_tokens": ids.shape[1],
                "order": order,
                "results": {
                    name: {"new_tokens": len(g.tokens), "seconds": round(g.seconds, 5), "forwards": g.forwards,
                           "identical": g.tokens == base.tokens, **({"stats": g.stats} if g.stats else {})}
                    for name, g in results.items()
                },
            })
            answer = tokenizer.decode(base.tokens, skip_special_tokens=True)
            messages.append({"role": "assistant", "content": answer})
            index += 1
            bar.update(1)
            bar.set_postfix(speedups(records))
    bar.close()
    return records


def speedups(records: list[dict]) -> dict[str, str]:
    """Running speedups for the progress bar."""
    agg = aggregate(records)
    return {name: f"{m['speedup']:.2f}x" for name, m in agg.items() if name != BASELINE}


def aggregate(records: list[dict]) -> dict[str, dict]:
    """Per method over `records`: sums, tokens/s, tau, speedup against the baseline, identical outputs.

    tokens/s = tokens / seconds over all prompts (long answers weigh more); speedup = a
    method's tokens/s over the baseline's on the same prompts; tau = tokens / base forwards.
    """
    if not records:
        return {}
    out = {}
    names = list(records[0]["results"])
    for name in names:
        tokens = sum(r["results"][name]["new_tokens"] for r in records)
        seconds = sum(r["results"][name]["seconds"] for r in records)
        forwards = sum(r["results"][name]["forwards"] for r in records)
        out[name] = {"prompts": len(records), "new_tokens": tokens, "seconds": round(seconds, 4),
                     "forwards": forwards, "tokens_per_s": tokens / max(seconds, 1e-9),
                     "tau": tokens / max(forwards, 1),
                     "identical": sum(r["results"][name]["identical"] for r in records)}
    base = out[BASELINE]["tokens_per_s"]
    for m in out.values():
        m["speedup"] = m["tokens_per_s"] / max(base, 1e-9)
    for name in names:  # runtime time breakdown, ms per step
        stats = [r["results"][name].get("stats") for r in records]
        if all(s and "time" in s for s in stats):
            steps = sum(s["steps"] for s in stats)
            parts = {}
            for s in stats:
                for k, v in s["time"].items():
                    parts[k] = parts.get(k, 0.0) + v
            out[name]["steps"] = steps
            prefill = parts.pop("prefill", 0.0)
            parts["total"] = parts.get("total", 0.0) - prefill  # decode steps only
            out[name]["ms_per_step"] = {k: round(1000 * v / max(steps, 1), 3) for k, v in parts.items()}
            out[name]["prefill_ms_per_prompt"] = round(1000 * prefill / len(stats), 3)
            if all("gammas" in s for s in stats):  # draft methods: drafts kept over drafts proposed
                proposed = sum(sum(s["gammas"]) for s in stats)
                out[name]["acceptance_rate"] = round(sum(sum(s["accept_lengths"]) for s in stats) / max(proposed, 1), 4)
                out[name]["mean_gamma"] = round(proposed / max(steps, 1), 3)
            depth = [s["accepted_at_depth"] for s in stats]
            if depth and depth[0]:
                out[name]["accept_rate_at_depth"] = [round(sum(d[k] for d in depth) / max(steps, 1), 4)
                                                     for k in range(len(depth[0]))]
    return out


def by_category(records: list[dict]) -> dict[str, dict[str, dict]]:
    """{category: aggregate(records of that category)}, categories in first-seen order, plus "overall"."""
    cats: dict[str, list[dict]] = {}
    for r in records:
        cats.setdefault(r["category"], []).append(r)
    out = {c: aggregate(rs) for c, rs in cats.items()}
    out["overall"] = aggregate(records)
    return out

