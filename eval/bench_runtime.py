"""Decode speed of the Medusa runtime vs transformers' generate, greedy, on MT-bench first turns.

    python eval/bench_runtime.py --num-prompts 5 --max-new-tokens 128
    python eval/bench_runtime.py --heads runs/smollm2_medusa1/heads --tree cpu_small --num-prompts 20

Per prompt, three decoders run back to back in a rotating order, so machine drift and other
jobs on the CPU hit them alike: transformers `generate(do_sample=False)`, our runtime with the
1-node tree (plain decoding through the runtime: its overhead), and our runtime with the heads
and tree. Ratios are taken per prompt (side by side) and summarised by their geometric mean.
Without --heads the heads are untrained: expect tau ~ 1 and a slowdown from the bigger forward.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from medusa_train.base_model import load_base_model, load_tokenizer
from medusa_train.model import MedusaModel, build_heads
from medusa_train.runtime import medusa_generate, resolve_tree

REPO = Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--heads", default=None, help="saved heads folder; untrained heads when absent")
    p.add_argument("--num-heads", type=int, default=4, help="untrained heads only")
    p.add_argument("--tree", default=None, help="a runtime.TREES name or a JSON choices list; default: heads' tree")
    p.add_argument("--questions", default="data/mt_bench_question.jsonl")
    p.add_argument("--num-prompts", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="also write the per-prompt records here")
    return p.parse_args()


def load_questions(path: str, n: int) -> list[str]:
    candidates = [Path(path), REPO / path, REPO.parent / "shared" / "data" / Path(path).name]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"no MT-bench questions at any of {[str(c) for c in candidates]}")
    rows = [json.loads(line) for line in found.read_text().splitlines() if line.strip()]
    return [row["turns"][0] for row in rows[:n]]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # ---- model ---------------------------------------------------------------------
    base = load_base_model(args.model, dtype="float32")
    tokenizer = load_tokenizer(args.model)
    if args.heads:
        model = MedusaModel.from_pretrained(base, args.heads)
    else:
        model = MedusaModel(base, build_heads(base, args.model, num_heads=args.num_heads)).eval()
    tree = json.loads(args.tree) if args.tree and args.tree.startswith("[") else args.tree
    tree = resolve_tree(tree, model.heads.config.tree)
    eos = base.generation_config.eos_token_id

    # ---- decoders --------------------------------------------------------------------
    def hf(ids):
        out = base.generate(ids, do_sample=False, max_new_tokens=args.max_new_tokens)
        return out, None

    def runtime(ids, which_tree):
        out = medusa_generate(model, ids, tree=which_tree, max_new_tokens=args.max_new_tokens, eos_token_id=eos)
        return out.sequences, out.stats

    decoders = {"hf": hf, "ar": lambda ids: runtime(ids, "autoregressive"), "medusa": lambda ids: runtime(ids, tree)}

    # ---- run -----------------------------------------------------------------------
    questions = load_questions(args.questions, args.num_prompts)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        for q in questions
    ]
    with torch.no_grad():
        for decode in decoders.values():  # warm-up: allocator, kernels, tree buffers
            decode(prompts[0][:, :16])
    records = []
    names = list(decoders)
    for i, ids in enumerate(prompts):
        order = names[i % 3 :] + names[: i % 3]
        record = {"prompt": i, "prompt_tokens": ids.shape[1]}
        for name in order:
            (sequences, stats), seconds = timed(lambda: decoders[name](ids))
            record[name] = {"seconds": seconds, "tokens": sequences.shape[1] - ids.shape[1], "sequences": sequences}
            if stats is not None:
                record[name]["tokens"] = stats.new_tokens[0]
                record[name].update(tau=stats.tau, steps=stats.steps, time=stats.time)
        for name in ("ar", "medusa"):
            record[name]["identical"] = torch.equal(record[name].pop("sequences"), record["hf"]["sequences"])
        record["hf"].pop("sequences")
        records.append(record)
        print(
            f"prompt {i:2d} ({ids.shape[1]:3d} tok)  "
            + "  ".join(f"{n}: {record[n]['tokens'] / record[n]['seconds']:6.1f} tok/s" for n in names)
            + f"  tau {record['medusa']['tau']:.2f}",
            flush=True,
        )

    # ---- report --------------------------------------------------------------------
    def rate(rec):
        return rec["tokens"] / rec["seconds"]

    def geomean(xs):
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    print(f"\n{args.model}, {len(records)} MT-bench first turns, greedy, max_new_tokens={args.max_new_tokens}, "
          f"tree {len(tree.choices) + 1} nodes / depth {tree.depth}, heads: {args.heads or 'untrained'}, "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'decoder':<28}{'tok/s':>8}{'vs hf (geomean)':>17}{'tau':>7}{'identical':>11}")
    labels = {"hf": "transformers generate", "ar": "runtime, 1-node tree", "medusa": "runtime, heads + tree"}
    for name in names:
        tokens = sum(r[name]["tokens"] for r in records)
        seconds = sum(r[name]["seconds"] for r in records)
        ratio = geomean([rate(r[name]) / rate(r["hf"]) for r in records])
        forwards = sum(r[name]["steps"] + 1 for r in records) if name != "hf" else tokens  # + 1: the prefill
        same = "" if name == "hf" else f"{sum(r[name]['identical'] for r in records)}/{len(records)}"
        print(f"{labels[name]:<28}{tokens / seconds:>8.1f}{ratio:>16.2f}x{tokens / forwards:>7.2f}{same:>11}")

    print("\nper step (ms, mean over steps of all prompts; prefill per prompt)")
    print(f"{'decoder':<28}{'prefill':>9}{'forward':>9}{'logits':>8}{'other':>8}{'step':>8}{'other %':>9}")
    for name in ("ar", "medusa"):
        steps = sum(r[name]["steps"] for r in records)
        total = {k: sum(r[name]["time"][k] for r in records) for k in ("prefill", "forward", "logits", "other")}
        step = (total["forward"] + total["logits"] + total["other"]) / steps
        print(
            f"{labels[name]:<28}{1e3 * total['prefill'] / len(records):>9.1f}{1e3 * total['forward'] / steps:>9.1f}"
            f"{1e3 * total['logits'] / steps:>8.1f}{1e3 * total['other'] / steps:>8.1f}{1e3 * step:>8.1f}"
            f"{100 * total['other'] / steps / step:>8.1f}%"
        )
    print("forward = base decoder over the tree; logits = vocabulary projections (verification + next root/heads);"
          " other = tree fill, masks, acceptance, cache moves, stopping")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
