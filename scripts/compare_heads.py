"""Compare trained Medusa heads on MT-bench first turns, one row per heads folder.

    python scripts/compare_heads.py runs/medusa1/heads runs/medusa2/heads --questions 16

Per heads folder: each head's top-1 / top-5 accuracy on the model's own greedy answers (the
model the heads decode for: a Medusa-2 run's tuned backbone included), tau and speedup
decoding with a fixed tree against plain transformers generate (interleaved), and for heads
with a tuned backbone how far it moved from the original (greedy agreement, perplexity).
Writes <out>/compare.json and compare.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_unless_saved(overrides: list[str], run_dir: Path, threads: int = 1) -> None:
    """`python -m medusa_train <overrides>` into run_dir, unless its heads are already there
    (a comparison that was interrupted goes on where it stopped)."""
    if (run_dir / "heads" / "medusa_heads.safetensors").is_file():
        return
    cmd = [sys.executable, "-m", "medusa_train", f"output_dir={run_dir}", "logger=none", *overrides]  # overrides win
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=True)


def measure_heads(heads: Path, questions: int = 16, max_new_tokens: int = 128, tree: str = "mc_sim_7b_63",
                  threads: int = 1) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from medusa_train.base_model import load_tokenizer
    from medusa_train.eval.__main__ import run_eval
    from medusa_train.eval.accuracy import head_accuracy
    from medusa_train.eval.bench import chat_prompt
    from medusa_train.eval.questions import load_questions, resolve_bench, select_questions
    from medusa_train.model import MedusaModel

    torch.set_num_threads(threads)
    model = MedusaModel.from_pretrained(None, heads)
    tokenizer = load_tokenizer(model.heads.config.base_model)
    chosen = select_questions(load_questions(resolve_bench("mt_bench")), questions)
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": q.turns[0]}])[0].tolist() for q in chosen]
    accuracy = head_accuracy(model, tokenizer, heads, prompts=prompts, max_new_tokens=max_new_tokens).topk_accuracy()
    del model
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            f"heads_dir={heads}", f"num_questions={questions}", "max_turns=1", f"max_new_tokens={max_new_tokens}",
            f"threads={threads}", f"methods=[medusa:{tree}]", f"output_dir={heads.parent / 'eval_compare'}"])
    result = run_eval(cfg)["result"]
    overall = result["categories"]["overall"][f"medusa:{tree}"]
    return {"heads": str(heads), "tree": tree, "head_top1": [row[0] for row in accuracy],
            "head_top5": [row[4] for row in accuracy], "tau": overall["tau"], "speedup": overall["speedup"],
            "identical": f"{overall['identical']}/{overall['prompts']}", "quality": result.get("quality")}


def table(rows: list[dict], title: str = "") -> str:
    lines = ([title, ""] if title else []) + [
        "| heads | head-1 top-1 | head-2 top-1 | head-3 top-1 | head-4 top-1 | tau | speedup | identical | "
        "greedy agreement | perplexity before -> after |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        top1 = " | ".join(f"{a:.3f}" for a in (r["head_top1"] + [float("nan")] * 4)[:4])
        q = r.get("quality")
        quality = (f"{q['teacher_forced_agreement']:.4f} | {q['perplexity_original']:.3f} -> {q['perplexity_tuned']:.3f}"
                   if q else "1 (backbone unchanged) | unchanged")
        lines.append(f"| {r.get('name', r['heads'])} | {top1} | {r['tau']:.2f} | {r['speedup']:.2f}x | {r['identical']} | "
                     f"{quality} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("heads", nargs="+", type=Path)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tree", default="mc_sim_7b_63")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/compare_heads"))
    args = p.parse_args()
    rows = [measure_heads(h, args.questions, args.max_new_tokens, args.tree, args.threads) for h in args.heads]
    title = (f"MT-bench first turns ({args.questions}), {args.max_new_tokens} new tokens, greedy, tree {args.tree}; "
             "head accuracy on the decoding model's own greedy answers")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "compare.md").write_text(table(rows, title) + "\n")
    print(table(rows, title))


if __name__ == "__main__":
    main()
