"""python -m medusa_train.eval heads=PATH [bench=mt_bench|PATH] [tree=auto|NAME|[[0],...]] [key=value ...]

    python -m medusa_train.eval heads=runs/medusa1/heads num_questions=16 max_turns=1
    python -m medusa_train.eval heads=runs/medusa1/heads tree=auto                   # search, save, bench
    python -m medusa_train.eval heads=runs/medusa1/heads tree=auto skip_bench=true   # search and save only

Benchmarks HF generate (the baseline), the runtime's 1-node path and Medusa decoding,
interleaved per prompt, greedy; writes results.json / results.md / results.png (and, with
tree=auto, tree_search.json / .md / .png) into output_dir (default: the run's eval/ folder).
Config: conf/eval.yaml (schema medusa_train/eval/config.py).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from medusa_train.eval.config import register_eval_configs
from medusa_train.eval.questions import QuestionFileError

log = logging.getLogger("medusa_train.eval")

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

register_eval_configs()


def run_eval(cfg: DictConfig) -> dict:
    """Search a tree (tree=auto) and/or benchmark, as `cfg` says; returns what was written."""
    from medusa_train.base_model import load_base_model, load_tokenizer
    from medusa_train.config import ModelConfig
    from medusa_train.draft.vocab import load_vocab_map
    from medusa_train.eval.bench import by_category, chat_prompt, run_bench
    from medusa_train.eval.methods import MethodContext, build_method
    from medusa_train.eval.questions import (
        load_questions,
        resolve_bench,
        select_questions,
    )
    from medusa_train.eval.report import markdown_table, summary_lines, write_results
    from medusa_train.model import MedusaModel, resolve_heads_path
    from medusa_train.runtime import resolve_tree

    # ---- set-up -------------------------------------------------------------------------
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    tree_arg = OmegaConf.to_container(cfg.tree) if OmegaConf.is_config(cfg.tree) else cfg.tree
    if cfg.skip_bench and tree_arg != "auto":
        raise ValueError("skip_bench=true only makes sense with tree=auto (search and save the tree only)")
    if cfg.heads_dir is None and cfg.draft is None:
        raise ValueError("nothing to evaluate: pass heads=PATH (Medusa heads) and/or draft=PATH (a draft model)")
    if cfg.heads_dir is None and tree_arg is not None:
        raise ValueError(f"tree={tree_arg} is a tree for Medusa heads: pass heads=PATH")
    heads_path = resolve_heads_path(cfg.heads_dir) if cfg.heads_dir else None
    output_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(heads_path, cfg.draft)
    questions = None
    if not cfg.skip_bench:  # read the questions first: a bad file fails before any model loads
        bench_file = resolve_bench(cfg.bench)
        questions = select_questions(load_questions(bench_file), cfg.num_questions)

    # ---- model and tokenizer ------------------------------------------------------------
    if heads_path is not None:
        model = MedusaModel.from_pretrained(cfg.base_model, heads_path, dtype=cfg.dtype, device=device)
        base, base_name = model.base, cfg.base_model or model.heads.config.base_model
    else:
        model, base_name = None, cfg.base_model or ModelConfig().name_or_path
        base = load_base_model(base_name, dtype=cfg.dtype, device=device)
    tokenizer = load_tokenizer(base_name)
    written: dict = {"output_dir": output_dir}
    quality = None
    if model is not None and cfg.quality.enabled and tuned_backbone(heads_path, model):
        quality = measure_quality(model, tokenizer, heads_path, base_name, cfg, device)
        written["quality"] = quality

    # ---- tree ---------------------------------------------------------------------------
    search = None
    if tree_arg == "auto":
        search = search_tree_for(model, tokenizer, heads_path, cfg, output_dir)
        tree_arg = search["search"]["choices"]
        written["search"] = search
        if cfg.skip_bench:
            return written
    tree_info, choices = None, None
    if model is not None:
        tree = resolve_tree(tree_arg, model.heads.config.tree)
        choices = [list(c) for c in tree.choices]
        tree_info = {"source": ("searched" if search else "given" if tree_arg is not None else
                                "heads config" if model.heads.config.tree is not None else "runtime default"),
                     "num_nodes": tree.num_nodes, "choices": choices,
                     **expected_acceptance(output_dir / "head_ranks.pt", heads_path, choices, cfg.search.estimator)}

    # ---- methods ------------------------------------------------------------------------
    draft = draft_vocab_map = None
    if cfg.draft:
        draft = load_base_model(cfg.draft, dtype=cfg.dtype, device=device)
        draft_vocab_map = load_vocab_map(cfg.draft) if Path(cfg.draft).is_dir() else None
    names = method_names(list(cfg.methods), with_heads=model is not None, with_draft=draft is not None)
    ctx = MethodContext(base, tokenizer, cfg.max_new_tokens, model=model, tree=choices, draft=draft,
                        draft_vocab_map=draft_vocab_map)
    methods = {name: build_method(name, ctx) for name in names}

    # ---- benchmark ----------------------------------------------------------------------
    if cfg.warmup:
        ctx.max_new_tokens = 8
        ids = chat_prompt(tokenizer, [{"role": "user", "content": questions[0].turns[0]}]).to(device)
        for method in methods.values():
            method(ids)
        ctx.max_new_tokens = cfg.max_new_tokens
    env = environment(device)  # load average before the benchmark; after it below
    records = run_bench(methods, questions, tokenizer, cfg.max_turns, device, cfg.progress)
    env["load_average_after"] = environment(device)["load_average_1_5_15_min"]
    categories = by_category(records)

    # ---- report -------------------------------------------------------------------------
    with_what = " + ".join([f"Medusa heads ({heads_path})"] * (model is not None) + [f"draft ({cfg.draft})"] * bool(cfg.draft))
    title = (f"{base_name} + {with_what}: {cfg.bench}, {len(records)} prompts, "
             f"{cfg.max_new_tokens} new tokens, greedy, {env['device']}")
    result = {
        "title": title,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "environment": env,
        "heads": str(heads_path) if heads_path else None,
        "draft": cfg.draft,
        "base_model": base_name,
        "tree": tree_info,
        "quality": quality,
        "search": search["search"] if search else None,
        "categories": categories,
        "records": records,
    }
    written["results"] = write_results(output_dir, result, title)
    written["result"] = result
    notes = "\n".join(summary_lines(result))
    print(f"\n{title}\n\n{markdown_table(categories)}\n\n{notes}\n\nwritten to {output_dir}/")
    return written


def tuned_backbone(heads_path: Path, model) -> bool:
    """Whether the heads were trained with their own backbone (a Medusa-2 run)."""
    from medusa_train.training.lora import backbone_dir_for

    return backbone_dir_for(heads_path, model.heads.config) is not None


def measure_quality(model, tokenizer, heads_path: Path, base_name: str, cfg: DictConfig, device) -> dict:
    """Greedy agreement and perplexity of the tuned backbone against the original model."""
    from medusa_train.base_model import load_base_model
    from medusa_train.eval.quality import backbone_quality

    original = load_base_model(base_name, dtype=cfg.dtype, device=device)
    q = cfg.quality
    quality = backbone_quality(original, model.base, tokenizer, heads_path, q.num_prompts, q.max_new_tokens,
                               q.batch_size, cfg.progress)
    del original
    log.info("tuned backbone vs original (%d held-out prompts): greedy agreement %.4f (teacher-forced), "
             "identical answers %.3f, perplexity %.3f -> %.3f", quality["prompts"], quality["teacher_forced_agreement"],
             quality["identical_answers"], quality["perplexity_original"], quality["perplexity_tuned"])
    return quality


DRAFT_METHODS = ("hf_assisted", "hf_prompt_lookup", "draft")


def method_names(requested: list[str], with_heads: bool, with_draft: bool) -> list[str]:
    """The baseline first, then the requested methods. Without heads the default list (which
    times Medusa) becomes the baseline alone; a draft adds the draft methods unless some were asked for."""
    from medusa_train.eval.config import EvalConfig
    from medusa_train.eval.methods import BASELINE

    if not with_heads and requested == EvalConfig().methods:
        requested = [BASELINE]
    if with_draft and not any(n.partition(":")[0] in DRAFT_METHODS for n in requested):
        requested = requested + list(DRAFT_METHODS)
    return list(dict.fromkeys([BASELINE, *requested]))


def default_output_dir(heads_path: Path | None, draft: str | None) -> Path:
    """A run's eval/ folder: next to the heads, else next to a local draft, else runs/eval."""
    if heads_path is not None:
        return heads_path.resolve().parent / "eval"
    if draft and Path(draft).is_dir():
        return Path(draft).resolve().parent / "eval"
    return Path("runs/eval")


def search_tree_for(model, tokenizer, heads_path: Path, cfg: DictConfig, output_dir: Path) -> dict:
    """Head accuracy -> latency profile -> greedy tree of the best size; saved into the heads' config."""
    from medusa_train.eval.accuracy import head_accuracy
    from medusa_train.eval.latency import calibrate_overhead, profile_latency
    from medusa_train.eval.report import search_table, write_search
    from medusa_train.eval.tree_search import greedy_nodes, search_tree

    acc, lat, sc = cfg.accuracy, cfg.latency, cfg.search
    device = next(model.parameters()).device
    ranks = head_accuracy(model, tokenizer, heads_path, acc.source, acc.num_prompts, acc.max_new_tokens, acc.topk,
                          acc.batch_size, cfg.progress, acc.cache)
    output_dir.mkdir(parents=True, exist_ok=True)
    ranks.save(output_dir / "head_ranks.pt")
    prob = ranks.path_probability(sc.estimator)
    K = model.heads.num_heads

    profile = profile_latency(model, lat.context_len, sc.max_nodes, lat.repeats, progress=cfg.progress)
    if lat.calibrate:
        nodes = [list(p) for p, _ in greedy_nodes(prob, K, ranks.topk, sc.max_nodes)]
        sizes = sorted({0, min(3, len(nodes)), min(15, len(nodes)), len(nodes)})
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, model.lm_head.weight.shape[0], (1, lat.context_len), generator=g).to(device)
        calibrate_overhead(model, profile, prompt, [nodes[:s] for s in sizes])
    result = search_tree(prob, K, ranks.topk, profile.step_ms, sc.max_nodes)

    info = {"num_nodes": result.num_nodes, "expected_accept_length": round(result.expected_accept_length, 4),
            "expected_tokens_per_s": round(result.tokens_per_s, 2), "device": profile.device,
            "estimator": sc.estimator, "accuracy_source": ranks.source}
    report = {"search": result.to_dict(), "latency": profile.to_dict(), "accuracy": ranks.summary(),
              "estimator": sc.estimator, "environment": environment(device)}
    write_search(output_dir, report, f"Tree search for {heads_path} on {profile.device}")
    print(f"\n{search_table(result.to_dict(), every=4)}\n\nchosen tree ({result.num_nodes} nodes): {result.choices}")
    if sc.save:
        report["saved_to"] = str(save_tree(heads_path, result.choices, info))
    return report


def expected_acceptance(ranks_file: Path, heads_path: Path, choices: list[list[int]], estimator: str) -> dict:
    """What the measured head accuracy predicts for this tree, if the eval folder holds a rank
    table newer than the heads' weights: expected tokens per step and acceptance rate per depth."""
    from medusa_train.eval.accuracy import HeadRanks
    from medusa_train.heads import WEIGHTS_NAME

    weights = Path(heads_path) / WEIGHTS_NAME
    if not ranks_file.is_file() or (weights.is_file() and weights.stat().st_mtime > ranks_file.stat().st_mtime):
        return {}
    prob = HeadRanks.load(ranks_file).path_probability(estimator)
    depth = max((len(c) for c in choices), default=0)
    return {"expected_accept_length": round(1.0 + sum(prob(tuple(c)) for c in choices), 4),
            "expected_accept_rate_at_depth": [round(sum(prob(tuple(c)) for c in choices if len(c) == d), 4)
                                              for d in range(1, depth + 1)],
            "expected_from": f"{ranks_file} ({estimator})"}


def save_tree(heads_path: Path, choices: list[list[int]], info: dict) -> Path | None:
    """Write `tree` (and how it was chosen, under extra.tree_search) into the heads' medusa_heads.json."""
    from medusa_train.heads import CONFIG_NAME
    from medusa_train.training.checkpoint import atomic_write

    config_file = Path(heads_path) / CONFIG_NAME
    if not config_file.is_file():
        log.warning("no %s in %s (not native heads): the tree is not saved; pass tree=... to use it", CONFIG_NAME,
                    heads_path)
        return None
    raw = json.loads(config_file.read_text())
    raw["tree"] = choices
    raw.setdefault("extra", {})["tree_search"] = info
    atomic_write(config_file, lambda tmp: tmp.write_text(json.dumps(raw, indent=2)))
    log.info("saved the %d-node tree into %s", len(choices) + 1, config_file)
    return config_file


def environment(device: torch.device) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "load_average_1_5_15_min": load}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    logging.getLogger("medusa_train").setLevel(logging.INFO)
    try:
        run_eval(cfg)
    except (QuestionFileError, ValueError, FileNotFoundError) as e:
        log.error("eval failed: %s", e)
        sys.exit(1)


def heads_alias(argv: list[str]) -> list[str]:
    """`heads=PATH` -> `heads_dir=PATH`: Hydra reads `heads=` as a choice in the config group conf/heads/."""
    return [f"heads_dir={a.split('=', 1)[1]}" if a.startswith("heads=") else a for a in argv]


if __name__ == "__main__":
    sys.argv = heads_alias(sys.argv)
    main()
