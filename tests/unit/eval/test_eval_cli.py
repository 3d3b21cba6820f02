"""The evaluation end to end on a tiny random model: the CLI bench, the tree search, the config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from medusa_train.eval.__main__ import heads_alias, run_eval
from medusa_train.eval.questions import QuestionFileError
from medusa_train.heads import CONFIG_NAME

REPO = Path(__file__).resolve().parents[3]
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a poem about rain.", "Make it shorter."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2+2?"]},
    {"question_id": 3, "category": "math", "turns": ["What is 3+3?"]},
]


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    """runs/<name>/ with heads for the tiny model, its data config and a tiny conversation file."""
    from medusa_train.base_model import load_base_model
    from medusa_train.model import build_heads

    base = load_base_model(str(tiny_model_dir))
    build_heads(base, str(tiny_model_dir), num_heads=4).save_pretrained(tmp_path / "run" / "heads")
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {i}."},
                          {"role": "assistant", "content": f"{i} is a number."}]} for i in range(16)]
    (tmp_path / "conv.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "run" / ".hydra").mkdir()
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(
        f"data:\n  sources: [{tmp_path / 'conv.jsonl'}]\n  eval_fraction: 0.25\n")
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    return tmp_path / "run"


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def eval_config(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def test_cli_bench_tree_and_draft(run_dir, tiny_model_dir):
    cmd = [sys.executable, "-m", "medusa_train.eval", f"heads={run_dir / 'heads'}", f"bench={run_dir.parent / 'q.jsonl'}",
           "max_new_tokens=8", "tree=[[0],[0,0],[1]]", f"draft={tiny_model_dir}", "progress=false", "threads=1",
           "methods=[hf_generate,runtime_ar,medusa,medusa:chain4]"]
    # One thread: tiny matmuls on a shared 2-core machine are many times slower with two.
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    eval_dir = run_dir / "eval"  # default: the run's eval/ folder
    result = json.loads((eval_dir / "results.json").read_text())
    overall = result["categories"]["overall"]
    assert set(overall) == {"hf_generate", "runtime_ar", "medusa", "medusa:chain4", "hf_assisted", "hf_prompt_lookup",
                            "draft"}
    assert all(m["prompts"] == 4 and m["identical"] == 4 for m in overall.values())  # 2 turns + 2 questions
    assert overall["hf_generate"]["tau"] == 1.0 and overall["runtime_ar"]["tau"] == 1.0
    assert result["tree"] == {"source": "given", "num_nodes": 4, "choices": [[0], [1], [0, 0]]}
    assert [(r["question_id"], r["turn"]) for r in result["records"]] == [(1, 0), (1, 1), (2, 0), (3, 0)]
    assert [r["order"][0] for r in result["records"]] == ["hf_generate", "draft", "hf_generate", "draft"]
    assert set(result["categories"]) == {"writing", "math", "overall"}
    assert (eval_dir / "results.png").stat().st_size > 0
    md = (eval_dir / "results.md").read_text()
    assert "| **overall** | 4 |" in md and "| Medusa (tree) [chain4] (`medusa:chain4`) | 1.00 |" in md
    assert "| **overall** | 4 |" in out.stdout


def test_draft_methods_without_heads(run_dir, tiny_model_dir, tmp_path):
    """A draft alone: our draft decoding, HF assisted generation at chosen settings and prompt
    lookup, all token-identical to HF generate. The draft is the target itself here, so every
    draft is kept."""
    from medusa_train.draft.vocab import save_vocab_map

    draft_dir = tmp_path / "draft"
    import shutil

    shutil.copytree(tiny_model_dir, draft_dir)
    save_vocab_map(draft_dir, torch.arange(0, 49152, 3))  # a truncated vocabulary: fewer drafts kept
    cfg = eval_config([f"base_model={tiny_model_dir}", f"draft={draft_dir}", f"bench={run_dir.parent / 'q.jsonl'}",
                       "max_new_tokens=12", "max_turns=1", "progress=false", "threads=1",
                       "methods=[hf_generate,draft:3-full,draft:auto,hf_assisted:3-constant-c0,hf_prompt_lookup:2]"])
    result = run_eval(cfg)["result"]
    overall = result["categories"]["overall"]
    assert list(overall) == ["hf_generate", "draft:3-full", "draft:auto", "hf_assisted:3-constant-c0",
                             "hf_prompt_lookup:2"]
    assert all(m["identical"] == m["prompts"] == 3 for m in overall.values())
    assert overall["draft:3-full"]["acceptance_rate"] == 1.0 and overall["draft:3-full"]["tau"] > 2
    assert overall["draft:auto"]["acceptance_rate"] < 1.0  # a third of the vocabulary: some drafts miss
    assert result["heads"] is None and result["tree"] is None
    assert (tmp_path / "eval" / "results.md").is_file()  # default: next to the draft folder
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run_eval(eval_config([f"bench={run_dir.parent / 'q.jsonl'}"]))
    with pytest.raises(ValueError, match="schedule"):
        run_eval(eval_config([f"base_model={tiny_model_dir}", f"draft={draft_dir}", "methods=[hf_assisted:fast]",
                              f"bench={run_dir.parent / 'q.jsonl'}", "progress=false", "warmup=false"]))


def test_search_saves_tree_into_heads(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_TRAIN_CACHE", str(tmp_path / "cache"))
    cfg = eval_config([f"heads_dir={run_dir / 'heads'}", "tree=auto", "skip_bench=true", "progress=false", "threads=1",
                       "accuracy.num_prompts=4", "accuracy.max_new_tokens=8", "latency.repeats=1",
                       "latency.context_len=16", "latency.calibrate=false", "search.max_nodes=6"])
    written = run_eval(cfg)
    eval_dir = run_dir / "eval"
    search = json.loads((eval_dir / "tree_search.json").read_text())
    assert len(search["latency"]["forward_ms"]) == 6
    assert search["accuracy"]["positions"][0] > 0
    assert (eval_dir / "tree_search.md").is_file() and (eval_dir / "tree_search.png").is_file()
    assert (eval_dir / "head_ranks.pt").is_file()
    heads_config = json.loads((run_dir / "heads" / CONFIG_NAME).read_text())
    assert heads_config["tree"] == written["search"]["search"]["choices"]
    assert heads_config["extra"]["tree_search"]["num_nodes"] == search["search"]["num_nodes"]
    assert not (eval_dir / "results.json").exists()
    assert len(list((tmp_path / "cache" / "self_answers").glob("*.json"))) == 1  # reused by the next search

    # A later bench without tree= uses the saved tree, and compares it with what the rank table predicts.
    cfg = eval_config([f"heads_dir={run_dir / 'heads'}", f"bench={run_dir.parent / 'q.jsonl'}", "num_questions=2",
                       "max_turns=1", "max_new_tokens=4", "methods=[medusa]", "progress=false", "threads=1"])
    result = run_eval(cfg)["result"]
    assert result["tree"]["source"] == "heads config" and result["tree"]["choices"] == heads_config["tree"]
    assert result["tree"]["expected_accept_length"] == pytest.approx(search["search"]["expected_accept_length"])
    assert list(result["categories"]["overall"]) == ["hf_generate", "medusa"]


def test_calibrate_overhead(run_dir):
    from medusa_train.eval.latency import calibrate_overhead, profile_latency
    from medusa_train.model import MedusaModel

    torch.set_num_threads(1)
    model = MedusaModel.from_pretrained(None, run_dir / "heads")
    profile = profile_latency(model, context_len=8, max_nodes=3, repeats=1, progress=False)
    assert len(profile.forward_ms) == 3 and len(profile.lm_head_ms) == 3 and profile.next_ms > 0
    calibrate_overhead(model, profile, torch.randint(3, 100, (1, 8)), [[], [[0], [1]]], max_new_tokens=4, repeats=1)
    assert [c["num_nodes"] for c in profile.calibration] == [1, 3] and profile.overhead_ms >= 0
    assert profile.tree_step_ms([[0], [1]]) == pytest.approx(profile.step_ms(3, 1))


def test_bad_question_file_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "x", "turns": ["a"]}\n{"question_id": 2, "turns": ["b"]}\n')
    cfg = eval_config([f"heads_dir={tmp_path}", f"bench={bad}"])
    # The heads folder holds no heads: the question file's error must come first.
    with pytest.raises(QuestionFileError, match=r"bad.jsonl, row 2: missing field 'category'"):
        run_eval(cfg)


def test_config_schema():
    cfg = eval_config(["heads_dir=x", "num_questions=16", "tree=[[0],[0,0]]", "search.estimator=independent"])
    assert cfg.num_questions == 16 and list(map(list, cfg.tree)) == [[0], [0, 0]] and cfg.bench == "mt_bench"
    with pytest.raises(Exception, match="num_questionz"):
        eval_config(["heads_dir=x", "num_questionz=3"])
    with pytest.raises(Exception, match="max_new_tokens"):
        eval_config(["heads_dir=x", "max_new_tokens=many"])


def test_heads_alias():
    assert heads_alias(["prog", "heads=runs/x/heads", "tree=auto"]) == ["prog", "heads_dir=runs/x/heads", "tree=auto"]
    assert heads_alias(["prog", "heads_dir=a"]) == ["prog", "heads_dir=a"]
