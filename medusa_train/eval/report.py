"""Result files: JSON (everything), a markdown table (what a README quotes) and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from medusa_train.eval.methods import BASELINE, label

RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "results.json", "results.md", "results.png"
SEARCH_JSON, SEARCH_MD, SEARCH_PNG = "tree_search.json", "tree_search.md", "tree_search.png"


def markdown_table(categories: dict[str, dict[str, dict]]) -> str:
    """Overall per method, then per category: tau, tokens/s, speedup, identical outputs."""
    overall = categories["overall"]
    lines = ["| method | tau | tokens/s | speedup | identical to HF |", "|---|---:|---:|---:|---:|"]
    for name, m in overall.items():
        lines.append(f"| {label(name)} (`{name}`) | {m['tau']:.2f} | {m['tokens_per_s']:.1f} | {m['speedup']:.2f}x | "
                     f"{m['identical']}/{m['prompts']} |")
    others = [n for n in overall if n != BASELINE]
    head = "| category | prompts | HF tokens/s | " + " | ".join(
        f"{n} tau | {n} tokens/s | {n} speedup | {n} identical" for n in others) + " |"
    lines += ["", head, "|---|---:|---:|" + "---:|" * (4 * len(others))]
    for cat, methods in categories.items():
        cells = [f"**{cat}**" if cat == "overall" else cat, str(methods[BASELINE]["prompts"]),
                 f"{methods[BASELINE]['tokens_per_s']:.1f}"]
        for n in others:
            m = methods[n]
            cells += [f"{m['tau']:.2f}", f"{m['tokens_per_s']:.1f}", f"{m['speedup']:.2f}x", f"{m['identical']}/{m['prompts']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    """The tree used, what head accuracy predicted for it, and the runtime's time per step."""
    lines = []
    overall = result["categories"]["overall"]
    tree = result.get("tree")
    if tree and "medusa" in overall:  # the plain `medusa` method's tree; `medusa:<name>` names its own
        lines.append(f"Tree of `medusa`: {tree['num_nodes']} nodes ({tree['source']}): `{json.dumps(tree['choices'])}`")
        if "expected_accept_length" in tree:
            lines.append(f"Expected tokens/step from head accuracy: {tree['expected_accept_length']:.2f} "
                         f"(per depth {tree['expected_accept_rate_at_depth']}); measured tau {overall['medusa']['tau']:.2f} "
                         f"(per depth {overall['medusa'].get('accept_rate_at_depth')})")
    q = result.get("quality")
    if q:
        lines.append(f"Tuned backbone vs the original ({q['prompts']} held-out prompts): greedy token agreement "
                     f"{q['teacher_forced_agreement']:.4f} (teacher-forced), identical answers {q['identical_answers']:.3f}, "
                     f"common prefix {q['common_prefix_fraction']:.3f}; perplexity on held-out references "
                     f"{q['perplexity_original']:.3f} -> {q['perplexity_tuned']:.3f}")
    for name, m in overall.items():
        if "acceptance_rate" in m:
            lines.append(f"`{name}`: draft acceptance rate {m['acceptance_rate']:.3f}, mean gamma {m['mean_gamma']:.2f}")
        if "ms_per_step" in m:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in m["ms_per_step"].items())
            lines.append(f"`{name}` ms per decode step: {parts}; {m['steps']} steps; prefill "
                         f"{m['prefill_ms_per_prompt']:.0f} ms per prompt")
    return lines


def plot_results(categories: dict[str, dict[str, dict]], path: Path, title: str = "") -> None:
    """Speedup (left) and tau (right) per category, one bar per method other than the baseline."""
    plt = pyplot()
    cats = list(categories)
    others = [n for n in categories["overall"] if n != BASELINE]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(cats) * 2), 4.2))
    width = 0.8 / max(len(others), 1)
    for ax, key, ylabel in [(axes[0], "speedup", "speedup vs HF generate (x)"), (axes[1], "tau", "tau (tokens / base forward)")]:
        for j, n in enumerate(others):
            xs = [i + (j - (len(others) - 1) / 2) * width for i in range(len(cats))]
            ax.bar(xs, [categories[c][n][key] for c in cats], width, label=label(n))
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=35, ha="right")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    save_figure(plt, fig, path, title)


def write_results(output_dir: str | Path, result: dict, title: str = "") -> dict[str, Path]:
    """result: {"categories": by_category(records), ...} -> results.json / .md / .png in output_dir."""
    table = markdown_table(result["categories"])
    paths = _write_json(output_dir, result, RESULTS_JSON, RESULTS_MD, RESULTS_PNG)
    notes = "".join(f"\n{line}\n" for line in summary_lines(result))
    paths["md"].write_text((f"# {title}\n\n" if title else "") + table + "\n" + notes)
    plot_results(result["categories"], paths["png"], title)
    return paths


# ---- tree search -----------------------------------------------------------------------------------


def search_table(search: dict, every: int = 1) -> str:
    """The search curve as markdown: size, added node, expected length, step latency, expected tokens/s."""
    lines = ["| nodes | added node | p(node) | E[tokens/step] | step ms | E[tokens/s] |", "|---:|---|---:|---:|---:|---:|"]
    for row in search["curve"]:
        n = row["num_nodes"]
        if n > 16 and n % every and n != search["num_nodes"]:
            continue
        mark = " **<- chosen**" if n == search["num_nodes"] else ""
        lines.append(f"| {n} | {row['added'] or '(root)'} | {row['p_added'] if row['p_added'] is not None else ''} | "
                     f"{row['expected_accept_length']:.3f} | {row['step_ms']:.1f} | {row['tokens_per_s']:.2f}{mark} |")
    return "\n".join(lines)


def plot_search(search: dict, latency: dict, path: Path, title: str = "") -> None:
    """Expected tokens/step, step latency and expected tokens/s against the tree size."""
    plt = pyplot()
    curve = search["curve"]
    n = [r["num_nodes"] for r in curve]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(n, [r["expected_accept_length"] for r in curve], marker=".")
    axes[0].set_ylabel("expected tokens / step")
    axes[1].plot(range(1, len(latency["forward_ms"]) + 1), latency["forward_ms"], marker=".", label="decoder forward")
    axes[1].plot(n, [r["step_ms"] for r in curve], marker=".", label="whole step (model)")
    axes[1].set_ylabel("ms")
    axes[1].legend(fontsize=8)
    axes[2].plot(n, [r["tokens_per_s"] for r in curve], marker=".")
    axes[2].set_ylabel("expected tokens / s")
    for ax in axes:
        ax.axvline(search["num_nodes"], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("tree nodes (root included)")
    save_figure(plt, fig, path, title)


def write_search(output_dir: str | Path, result: dict, title: str = "") -> dict[str, Path]:
    """result: {"search": SearchResult.to_dict(), "latency": LatencyProfile.to_dict(), "accuracy": ...}."""
    paths = _write_json(output_dir, result, SEARCH_JSON, SEARCH_MD, SEARCH_PNG)
    s, acc = result["search"], result.get("accuracy")
    text = [f"# {title}" if title else "# Tree search", ""]
    if acc:
        text += [f"Head accuracy ({acc['source']} answers, {acc['positions'][0]} positions), top-1 / top-5 / top-10:", ""]
        text += ["| head | top-1 | top-5 | top-10 |", "|---:|---:|---:|---:|"]
        for k, row in enumerate(acc["topk_accuracy"]):
            text.append(f"| {k + 1} | {row[0]:.3f} | {row[min(4, len(row) - 1)]:.3f} | {row[-1]:.3f} |")
        text.append("")
    text += [f"Chosen: {s['num_nodes']} nodes, expected {s['expected_accept_length']:.3f} tokens/step, "
             f"{s['step_ms']:.1f} ms/step, {s['tokens_per_s']:.2f} expected tokens/s.", "",
             f"Tree: `{json.dumps(s['choices'])}`", "", search_table(s, every=4)]
    paths["md"].write_text("\n".join(text) + "\n")
    plot_search(s, result["latency"], paths["png"], title)
    return paths


# ---- shared by both reports ------------------------------------------------------------------------


def _write_json(output_dir: str | Path, result: dict, json_name: str, md_name: str, png_name: str) -> dict[str, Path]:
    """Create output_dir, write `result` as its json file; the paths of all three files."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / json_name, "md": out / md_name, "png": out / png_name}
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    return paths


def pyplot():
    """matplotlib.pyplot on the file-only backend."""
    import matplotlib  # imported on use: only the plots need it

    matplotlib.use("Agg")  # files only, no display (runs on headless machines)
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: Path, title: str) -> None:
    """Title, lay out, write and close `fig`."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
