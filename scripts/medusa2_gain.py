"""Medusa-2 against Medusa-1 on the same data and step budget, and what the joint training
cost in the model's own output.

    python scripts/medusa2_gain.py --data data/default_self_distill.jsonl --stage1-steps 100 --stage2-steps 40 \
        --variant hc0.1:medusa2.heads_coefficient=0.1 --variant hc0.01:medusa2.heads_coefficient=0.01

Arms, all trained on --data with the recipes' seed and batch:
  medusa1_<S1>       Medusa-1 for S1 steps: the stage 1 of every Medusa-2 arm
  medusa1_<S1+S2>    Medusa-1 for S1+S2 steps: the same step budget as Medusa-2
  medusa2_<name>     stage 2 for S2 steps from medusa1_<S1>'s heads, with the variant's overrides
                     (a variant is NAME:override[,override...]; --stage2-extra applies to all)
Each arm is measured by scripts/compare_heads.py on MT-bench first turns: every head's top-1 on
the decoding model's own greedy answers, tau and speedup with a fixed tree against plain
transformers generate, and for Medusa-2 the greedy agreement with the original model and the
held-out perplexity before and after. Note a Medusa-2 step runs the backbone forward and
backward, a Medusa-1 step (hidden-state cache) only the heads: equal steps are not equal compute.

An arm whose heads exist is not trained again, and an arm with <out>/<arm>.measure.json is not
measured again, so an interrupted comparison goes on where it stopped.
Writes <out>/gain.json, gain.md and gain.png (tau against greedy agreement with the original:
what each arm bought and what it cost) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from compare_heads import measure_heads, table as heads_table, train_unless_saved  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/default_self_distill.jsonl", help="training data for every arm")
    p.add_argument("--stage1-steps", type=int, default=100)
    p.add_argument("--stage2-steps", type=int, default=40)
    p.add_argument("--stage2-warmup", type=int, default=5, help="stage 2's train.warmup_steps")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:OVERRIDES",
                   help="a Medusa-2 arm, e.g. hc0.01:medusa2.heads_coefficient=0.01 (repeatable; default: the recipe's)")
    p.add_argument("--stage2-extra", nargs="*", default=[], help="overrides for every Medusa-2 arm")
    p.add_argument("--out", type=Path, default=Path("runs/medusa2_gain"))
    p.add_argument("--questions", type=int, default=16, help="MT-bench first turns (round-robin over categories)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tree", default="mc_sim_7b_63", help="tree for the tau measurement (a runtime.TREES name)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    s1, s2 = args.stage1_steps, args.stage2_steps
    data = f"data.sources=[{args.data}]"
    stage1 = f"medusa1_{s1}"
    arms = {
        stage1: ["+recipe=medusa1", data, f"train.max_steps={s1}"],
        f"medusa1_{s1 + s2}": ["+recipe=medusa1", data, f"train.max_steps={s1 + s2}"],
    }
    for name, overrides in map(parse_variant, args.variant or ["recipe:"]):
        arms[f"medusa2_{name}"] = [
            "+recipe=medusa2", data, "medusa2.stages=[2]", f"medusa2.stage1_heads={args.out / stage1 / 'heads'}",
            f"train.max_steps={s2}", f"train.warmup_steps={args.stage2_warmup}", *args.stage2_extra, *overrides]

    results = {}
    for arm, overrides in arms.items():
        run_dir = args.out / arm
        train_unless_saved(overrides, run_dir, args.threads)
        measured = args.out / f"{arm}.measure.json"
        if not measured.is_file():
            row = measure_heads(run_dir / "heads", args.questions, args.max_new_tokens, args.tree, args.threads)
            measured.write_text(json.dumps({**row, "overrides": overrides}, indent=2) + "\n")
        results[arm] = {**json.loads(measured.read_text()), "held_out": held_out(run_dir)}
    report = {"data": args.data, "stage1_steps": s1, "stage2_steps": s2, "tree": args.tree,
              "questions": args.questions, "max_new_tokens": args.max_new_tokens, "arms": results}
    (args.out / "gain.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(report) + "\n\n" + held_out_table(report)
    (args.out / "gain.md").write_text(text + "\n")
    plot(report, args.out / "gain.png")
    print(text)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME:a=1,b=[x,y]' -> ('NAME', ['a=1', 'b=[x,y]']): commas inside brackets stay."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:override[,override...]")
    overrides, depth, start = [], 0, 0
    for i, ch in enumerate(rest + ","):
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            overrides.append(rest[start:i])
            start = i + 1
    return name, [o for o in overrides if o]


def table(report: dict) -> str:
    title = (f"Medusa-1 vs Medusa-2 on {report['data']}: stage 1 {report['stage1_steps']} steps, stage 2 "
             f"{report['stage2_steps']} steps; MT-bench first turns ({report['questions']}), the decoding model's "
             f"own greedy answers, tree {report['tree']}")
    return heads_table([{**r, "name": arm} for arm, r in report["arms"].items()], title)


def held_out(run_dir: Path) -> dict:
    """The recipe's own final evaluation on the held-out split of the training data: heads'
    top-1 on the data's answers and, for Medusa-2, the tuned backbone against the original."""
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {"steps": summary["steps"], "time_s": summary["time_s"], "head_top1": summary["eval_final"]["top1"],
            "backbone": summary.get("backbone_eval_final")}


def held_out_table(report: dict) -> str:
    lines = ["Held-out split of the training data (the recipes' final evaluation)", "",
             "| arm | head-1 top-1 | head-2 top-1 | top-1 agreement | KL to original (nats/token) | perplexity | "
             "train time |", "|---|---:|---:|---:|---:|---:|---:|"]
    for arm, r in report["arms"].items():
        h, b = r["held_out"], r["held_out"]["backbone"]
        backbone = f"{b['top1_agreement']:.4f} | {b['kl_to_original']:.4f} | {b['ppl']:.3f}" if b else "1 | 0 | unchanged"
        lines.append(f"| {arm} | {h['head_top1'][0]:.3f} | {h['head_top1'][1]:.3f} | {backbone} | {h['time_s']:.0f} s |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """One point per arm: tau against greedy token agreement with the original model
    (Medusa-1 leaves the backbone alone: agreement 1)."""
    from medusa_train.eval.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, r in report["arms"].items():
        agreement = r["quality"]["teacher_forced_agreement"] if r.get("quality") else 1.0
        ax.scatter(agreement, r["tau"], color="tab:blue" if arm.startswith("medusa1") else "tab:orange")
        ax.annotate(arm, (agreement, r["tau"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("greedy token agreement with the original model")
    ax.set_ylabel(f"tau (mean accepted length, {report['tree']})")
    ax.grid(alpha=0.3)
    save_figure(plt, fig, path, f"Medusa-2 vs Medusa-1, {report['stage1_steps']} + {report['stage2_steps']} steps")


if __name__ == "__main__":
    main()
