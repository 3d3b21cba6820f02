"""What self-distilled training data buys Medusa heads: the same prompts, the same step budget,
answers written by people (the dataset) vs by the base model itself (recipe self_distill).

    python -m medusa_train +recipe=self_distill output_dir=runs/sd 'data.sources=[data/default_train.jsonl]' \
        data.max_rows=600 self_distill.max_turns=1 self_distill.max_new_tokens=256
    python scripts/self_distill_gain.py --self-distilled runs/sd/self_distill.jsonl --steps 150

1. From the self-distilled file (its rows keep the source row `id`) and the source data, write
   two training files with the same prompts in the same order: the dataset's first answer and
   the model's own answer.
2. Train Medusa-1 heads on each with the same command and step budget (the default recipe).
3. Measure both on MT-bench first turns: each head's top-1 accuracy on the base model's own
   greedy answers (what greedy decoding accepts), and tau decoding with a fixed tree, with
   the speedup against plain transformers generate (interleaved, one run per arm).
Writes <out>/gain.json and gain.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from compare_heads import measure_heads, table as heads_table, train_unless_saved  # noqa: E402

ARMS = ("dataset", "self_distilled")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--self-distilled", required=True, help="the self_distill recipe's output (JSONL)")
    p.add_argument("--source", default=None, help="the data it was generated from (default: from its meta file)")
    p.add_argument("--steps", type=int, default=150, help="medusa1 optimizer steps per arm")
    p.add_argument("--out", default="runs/self_distill_gain")
    p.add_argument("--questions", type=int, default=16, help="MT-bench first turns (round-robin over categories)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tree", default="mc_sim_7b_63", help="tree for the tau measurement (a runtime.TREES name)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", nargs="*", default=[], help="more medusa1 overrides for both arms")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    files = write_arm_files(Path(args.self_distilled), args.source, out)
    results = {}
    for arm in ARMS:
        run_dir = out / arm
        train_unless_saved(["+recipe=medusa1", f"data.sources=[{files[arm]}]", f"train.max_steps={args.steps}",
                            *args.extra], run_dir, args.threads)
        results[arm] = measure_heads(run_dir / "heads", args.questions, args.max_new_tokens, args.tree, args.threads)
    report = {"rows": count_rows(files["dataset"]), "steps": args.steps, "tree": args.tree,
              "questions": args.questions, "max_new_tokens": args.max_new_tokens, "arms": results}
    (out / "gain.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gain.md").write_text(table(report) + "\n")
    print(table(report))


def write_arm_files(self_distilled: Path, source: str | None, out: Path) -> dict[str, Path]:
    """Two JSONL files, same prompts in the same order: {"messages": [user, answer]}."""
    from medusa_train.data import load_conversations

    meta = json.loads(self_distilled.with_name(self_distilled.name + ".meta.json").read_text())
    info = meta["info"]
    sources = [source] if source else info["data_sources"]
    conversations = load_conversations(sources, format=info.get("data_format", "auto"), max_rows=info.get("max_rows"),
                                       require_assistant=False)["messages"]  # indexed as the recipe indexed them
    files = {arm: out / f"{arm}.jsonl" for arm in ARMS}
    with open(files["dataset"], "w") as fd, open(files["self_distilled"], "w") as fs:
        for line in open(self_distilled):
            row = json.loads(line)
            messages = conversations[row["id"]]
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            answer = next(m for m in messages[first_user:] if m["role"] == "assistant")
            own = next(m for m in row["messages"] if m["role"] == "assistant")
            if messages[first_user]["content"] != next(m for m in row["messages"] if m["role"] == "user")["content"]:
                raise ValueError(f"row id {row['id']}: the prompt differs from the source's; wrong --source?")
            fd.write(json.dumps({"messages": [messages[first_user], answer]}) + "\n")
            fs.write(json.dumps({"messages": [messages[first_user], own]}) + "\n")
    return files


def table(report: dict) -> str:
    title = (f"Medusa-1 heads, {report['steps']} steps on the same {report['rows']} prompts; MT-bench first turns "
             f"({report['questions']}), the base model's own greedy answers, tree {report['tree']}")
    return heads_table([{**r, "name": arm} for arm, r in report["arms"].items()], title)


def count_rows(path: Path) -> int:
    return sum(1 for _ in open(path))


if __name__ == "__main__":
    main()
