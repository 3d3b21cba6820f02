"""Medusa-2 on tiny random models: LoRA mechanics, loss pieces, and both stages end to end
on a tiny random Llama with SmolLM2's tokenizer (seconds, CPU)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from medusa_train.heads import MedusaHeads
from medusa_train.model import MedusaModel, build_heads
from medusa_train.recipes import medusa2
from medusa_train.training.lora import add_lora, backbone_dir_for, load_backbone
from tests.conftest import tiny_model
from tests.recipes.recipe_helpers import ROOT, compose_config, run_overrides, write_counting_chats

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- LoRA mechanics and loss pieces (no recipe) ------------------------------------------------


def lora_tiny(dropout: float = 0.0):
    model = tiny_model("llama", vocab_size=256)
    return model, add_lora(model, r=4, alpha=8, dropout=dropout, target_modules=["all-linear"])


def test_param_groups_give_backbone_the_base_lr_and_heads_the_multiplied_lr():
    model, _ = lora_tiny()
    heads = build_heads(model, num_heads=2)
    optimizer = torch.optim.AdamW(medusa2.param_groups(model, heads, lr=1e-3, head_lr_multiplier=4.0), lr=1e-3)
    backbone_group, heads_group = optimizer.param_groups
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert lora and {id(p) for p in backbone_group["params"]} == lora  # only the adapter, no base weight
    assert {id(p) for p in heads_group["params"]} == {id(p) for p in heads.parameters()}
    assert backbone_group["lr"] == 1e-3 and heads_group["lr"] == pytest.approx(4e-3)


def test_lora_training_leaves_base_weights_and_the_adapter_disabled_model_unchanged():
    model = tiny_model("llama", vocab_size=256)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = add_lora(model, r=4, alpha=8, dropout=0.05, target_modules=["all-linear"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        logits = peft_model(x).logits  # (B, T, V)
        F.cross_entropy(logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys()
    for name, weight in before.items():
        assert torch.equal(after[name], weight), name
    peft_model.eval()
    with torch.no_grad():
        tuned = peft_model(x).logits
        with peft_model.disable_adapter():
            original = peft_model(x).logits
    assert torch.equal(original, reference)
    assert (tuned - reference).abs().max() > 1e-4


def test_kl_to_the_adapter_disabled_model_is_zero_before_the_first_update():
    model, peft_model = lora_tiny(dropout=0.05)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    keep = torch.ones_like(x, dtype=torch.bool)
    targets = medusa2.next_token_targets(x)[keep]
    peft_model.train()
    tuned = medusa2.base_logits(model, x, None, keep)  # (N, V), with grad, dropout on
    with torch.no_grad(), peft_model.disable_adapter(), medusa2.eval_mode(model):
        original = medusa2.base_logits(model, x, None, keep)
    assert model.training  # eval_mode restored the flag
    kl = medusa2.backbone_loss_sum(tuned, targets, original)
    assert kl.item() == 0.0  # LoRA B starts at zero: the tuned model is the original
    kl.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    ce = medusa2.backbone_loss_sum(tuned, targets)
    assert ce.item() / (targets != -100).sum() == pytest.approx(math.log(256), rel=0.1)  # random model


def test_next_token_targets():
    labels = torch.tensor([[-100, 5, 6, 7]])
    assert medusa2.next_token_targets(labels).tolist() == [[5, 6, 7, -100]]


def test_backbone_loss_auto_detects_self_distilled_data(tmp_path):
    data = tmp_path / "sd.jsonl"
    data.write_text("")
    assert medusa2.resolve_backbone_loss("auto", [str(data)], False) == "ce"
    assert medusa2.resolve_backbone_loss("auto", [str(data)], True) == "kl"
    assert medusa2.resolve_backbone_loss("ce", [str(data)], True) == "ce"
    (tmp_path / "sd.jsonl.meta.json").write_text("{}")  # what the self_distill recipe writes
    assert medusa2.resolve_backbone_loss("auto", [str(data), "someone/hub-dataset"], False) == "kl"


# ---- the recipe end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_counting_chats(tmp_path_factory.mktemp("data") / "chat.jsonl", rows=40, words=30)


def overrides(model_dir, data_file, out, *extra):
    return [
        *run_overrides("medusa2", model_dir, data_file, out), "data.max_length=80", "data.eval_fraction=0.1",
        "train.micro_batch_size=4", "train.max_steps=3", "train.warmup_steps=1", "train.lr=1e-3",
        "train.eval_every=1000", "train.save_every=1000", "train.log_every=1", "heads.num_heads=2",
        "heads.truncated_vocab_size=null", "medusa2.lora_r=4", "medusa2.lora_alpha=8", *extra,
    ]


def run_in_process(args, record: list | None = None):
    """Run the recipe; `record` receives the live (backbone + heads) model it trained."""
    cfg = compose_config(args)
    with pytest.MonkeyPatch.context() as mp:
        if record is not None:
            class Recorded(medusa2.SelectedLogits):
                def __init__(self, medusa):
                    super().__init__(medusa)
                    record.append(medusa)
            mp.setattr(medusa2, "SelectedLogits", Recorded)
        return medusa2.main(cfg)


def assert_loads_back_as_trained(out: Path, model_dir: Path, live: MedusaModel):
    """The saved heads + backbone, loaded as for inference, give the live model's logits."""
    heads = MedusaHeads.from_pretrained(out / "heads")
    loaded = MedusaModel(load_backbone(str(model_dir), backbone_dir_for(out / "heads", heads.config)), heads)
    x = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    live.eval()
    with torch.no_grad():
        want, got = live(x), loaded(x)
        original = load_backbone(str(model_dir))(x).logits
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.head_logits, want.head_logits, rtol=1e-4, atol=1e-5)
    assert (got.logits - original).abs().max() > 1e-6  # the backbone did train


@pytest.fixture(scope="module")
def two_stages(tiny_model_dir, chat_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("medusa2") / "run"
    live: list = []
    summary = run_in_process(overrides(tiny_model_dir, chat_file, out, "medusa2.stage1_max_steps=2"), live)
    return out, summary, live[-1]


def test_both_stages_train_and_save_adapter_and_heads(two_stages, tiny_model_dir):
    out, summary, live = two_stages
    assert summary["stage1"]["steps"] == 2 and (out / "stage1" / "heads" / "medusa_heads.safetensors").is_file()
    assert summary["steps"] == 3 and summary["backbone_loss_kind"] == "ce"
    assert all(math.isfinite(v) for v in summary["train_loss"] + summary["backbone_loss"])
    assert summary["backbone_eval_untrained"]["top1_agreement"] == 1.0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "backbone").iterdir()}
    assert json.loads((out / "heads" / "medusa_heads.json").read_text())["extra"] == {"backbone": "../backbone"}
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["train_loss"] == summary["train_loss"]
    assert_loads_back_as_trained(out, tiny_model_dir, live)


def test_stage2_alone_from_saved_heads_with_kl_on_self_distilled_data_and_merged_save(
        two_stages, tiny_model_dir, chat_file, tmp_path):
    data = tmp_path / "self_distilled.jsonl"
    shutil.copy(chat_file, data)
    (tmp_path / "self_distilled.jsonl.meta.json").write_text(json.dumps({"settings": {}}))
    live: list = []
    summary = run_in_process(overrides(tiny_model_dir, data, tmp_path / "run", "medusa2.stages=[2]",
                                       f"medusa2.stage1_heads={two_stages[0] / 'stage1' / 'heads'}",
                                       "medusa2.save=merged"), live)
    assert summary["stage1"] is None and summary["backbone_loss_kind"] == "kl"
    assert summary["backbone_loss"][0] == 0.0  # KL at step 0: the adapter starts as a no-op
    assert summary["backbone_loss"][-1] > 0.0
    assert summary["min_agreement"] == 0.95 and "top1_agreement" in summary["backbone_eval_final"]
    moved = {**summary, "backbone_eval_final": {**summary["backbone_eval_final"], "top1_agreement": 0.9}}
    assert "WARNING: greedy agreement 0.900 is below medusa2.min_agreement 0.95" in medusa2.format_backbone_summary(moved)
    kept = {**moved, "min_agreement": 0.85}
    assert "WARNING" not in medusa2.format_backbone_summary(kept)
    assert (tmp_path / "run" / "backbone" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "stage1").exists()
    assert_loads_back_as_trained(tmp_path / "run", tiny_model_dir, live[-1])


def test_resume_after_stop_matches_uninterrupted_run(two_stages, tiny_model_dir, chat_file, tmp_path):
    common = ["medusa2.stages=[2]", f"medusa2.stage1_heads={two_stages[0] / 'stage1' / 'heads'}",
              "train.max_steps=4", "train.save_every=2"]
    full = run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "full", *common))
    stopped = run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "cut", *common,
                                       "train.stop_after_steps=2"))
    assert stopped["stopped_at"] == 2 and not (tmp_path / "cut" / "heads").exists()
    resumed = run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "cut", *common, "resume=true"))
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
    for name in ("backbone/adapter_model.safetensors", "heads/medusa_heads.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_qlora_without_bitsandbytes_is_a_clear_error(tiny_model_dir, chat_file, tmp_path):
    pytest.importorskip("pytest")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "q", "medusa2.qlora=true"))


def test_stage2_alone_needs_heads(tiny_model_dir, chat_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="stage1_heads"):
        run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "none", "medusa2.stages=[2]"))


def test_full_finetuning_with_kl_keeps_a_frozen_original_and_saves_the_whole_model(
        two_stages, tiny_model_dir, chat_file, tmp_path):
    live: list = []
    summary = run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "full", "medusa2.stages=[2]",
                                       f"medusa2.stage1_heads={two_stages[0] / 'stage1' / 'heads'}",
                                       "medusa2.backbone=full", "medusa2.backbone_loss=kl", "train.max_steps=2",
                                       "train.lr=1e-4"), live)
    assert summary["backbone"] == "full" and summary["backbone_saved_as"] == "full"
    assert summary["backbone_loss"][0] == 0.0 and math.isfinite(summary["train_loss"][-1])
    assert summary["backbone_eval_final"]["top1_agreement"] <= 1.0  # compared with the frozen copy
    assert (tmp_path / "full" / "backbone" / "model.safetensors").is_file()
    assert_loads_back_as_trained(tmp_path / "full", tiny_model_dir, live[-1])


def test_non_finite_loss_stops_naming_the_step_or_is_skipped(two_stages, tiny_model_dir, chat_file, tmp_path,
                                                             monkeypatch):
    real = medusa2.medusa_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        loss, ce, counts = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan"), ce * float("nan"), counts) if calls["n"] == 2 else (loss, ce, counts)

    monkeypatch.setattr(medusa2, "medusa_loss", poisoned)
    common = ["medusa2.stages=[2]", f"medusa2.stage1_heads={two_stages[0] / 'stage1' / 'heads'}"]
    with pytest.raises(medusa2.NonFiniteLossError, match="at step 2"):
        run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "stop", *common))
    calls["n"] = 0
    summary = run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "skip", *common, "train.on_nan=skip"))
    assert summary["skipped_batches"] == 1
    saved = load_file(str(tmp_path / "skip" / "backbone" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in saved.values())


def test_eval_measures_the_tuned_backbone_against_the_original(two_stages, chat_file, tmp_path):
    from medusa_train.eval.__main__ import run_eval

    out, _, _ = two_stages
    (out / ".hydra").mkdir(exist_ok=True)  # the held-out split of the run's own data
    (out / ".hydra" / "config.yaml").write_text(f"data:\n  sources: [{chat_file}]\n  eval_fraction: 0.1\n")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "x", "turns": ["Say the words from 3."]}) + "\n")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            f"heads_dir={out / 'heads'}", f"bench={questions}", "max_new_tokens=4", "methods=[medusa]", "tree=[[0],[0,0]]",
            "quality.num_prompts=3", "quality.max_new_tokens=6", "progress=false", "warmup=false",
            f"output_dir={tmp_path / 'eval'}"])
    result = run_eval(cfg)["result"]
    quality = result["quality"]
    assert quality["prompts"] == 3 and quality["answer_tokens"] > 0
    assert quality["original_self_agreement"] == 1.0
    assert 0.0 <= quality["teacher_forced_agreement"] <= 1.0
    assert math.isfinite(quality["perplexity_original"]) and math.isfinite(quality["perplexity_tuned"])
    assert quality["perplexity_tuned"] != quality["perplexity_original"]  # the backbone did train
    assert "greedy token agreement" in (tmp_path / "eval" / "results.md").read_text()
