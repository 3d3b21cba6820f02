"""The draft recipe end to end on a tiny random Llama with SmolLM2's tokenizer (seconds, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from medusa_train.draft.vocab import load_vocab_map
from medusa_train.recipes import draft as draft_recipe
from tests.recipes.recipe_helpers import compose_config, run_overrides, write_counting_chats


@pytest.fixture(scope="module")
def draft_chat_file(tmp_path_factory):
    return write_counting_chats(tmp_path_factory.mktemp("draft_data") / "chat.jsonl", rows=48, words=30)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, smol_tokenizer):
    """A tiny 4-layer Llama (the draft keeps 2 of its layers) with SmolLM2's tokenizer."""
    import transformers as tf

    path = tmp_path_factory.mktemp("draft_target")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=True, bos_token_id=smol_tokenizer.bos_token_id,
                            eos_token_id=smol_tokenizer.eos_token_id, pad_token_id=smol_tokenizer.pad_token_id)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    # Random init gives near-uniform distributions and layers that barely change the residual.
    # Scaled-up embeddings sharpen the target; scaled-up middle layers make dropping them
    # matter, so the draft (layers 0 and 3) starts at about a third agreement.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8)
        for layer in model.model.layers[1:3]:
            layer.self_attn.o_proj.weight.mul_(20)
            layer.mlp.down_proj.weight.mul_(20)
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def overrides(model_dir, data_file, out, *extra):
    return [
        *run_overrides("draft", model_dir, data_file, out), "data.max_length=80", "data.eval_fraction=0.2",
        "train.micro_batch_size=4", "train.max_steps=8", "train.warmup_steps=1", "train.lr=1e-2",
        "train.eval_every=1000", "train.save_every=4", "train.log_every=1", "draft.layers=[0,3]",
        "draft.measure_latency=false", "draft.cache_dtype=float32", *extra,
    ]


def run(args):
    return draft_recipe.main(compose_config(args))


def test_distillation_raises_agreement_and_saves_an_hf_folder(target_dir, draft_chat_file, tmp_path):
    summary = run(overrides(target_dir, draft_chat_file, tmp_path / "run", "train.max_steps=16"))
    print(summary["eval_untrained"], summary["eval_final"], summary["train_loss"])
    assert summary["train_loss"][-1] < summary["train_loss"][0]
    assert summary["eval_final"]["loss"] < summary["eval_untrained"]["loss"]
    assert summary["eval_final"]["top1_agreement"] > summary["eval_untrained"]["top1_agreement"]
    saved = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert saved["steps"] == 16
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "draft")
    assert draft.config.num_hidden_layers == 2


def draft_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "draft" / "model.safetensors"))


def test_saved_draft_is_an_hf_assistant_that_keeps_greedy_output(target_dir, draft_chat_file, tmp_path,
                                                                  smol_tokenizer):
    run(overrides(target_dir, draft_chat_file, tmp_path / "run", "train.max_steps=4",
                  "draft.truncated_vocab_size=512"))
    folder = tmp_path / "run" / "draft"
    assert load_vocab_map(folder).shape == (512,)
    draft = AutoModelForCausalLM.from_pretrained(folder).eval()
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    assert draft.config.medusa_train_draft["target"] == str(target_dir)
    prompt = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Say the words from 3."}],
                                                add_generation_prompt=True, return_tensors="pt")["input_ids"]
    common = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": smol_tokenizer.pad_token_id}
    plain = target.generate(prompt, **common)
    assisted = target.generate(prompt, assistant_model=draft, **common)
    assert torch.equal(plain, assisted)


def test_resume_after_an_interrupt_matches_an_uninterrupted_run(target_dir, draft_chat_file, tmp_path):
    full = run(overrides(target_dir, draft_chat_file, tmp_path / "full"))
    stopped = run(overrides(target_dir, draft_chat_file, tmp_path / "cut", "train.stop_after_steps=5"))
    assert stopped == {"stopped_at": 5} and not (tmp_path / "cut" / "draft").exists()
    resumed = run(overrides(target_dir, draft_chat_file, tmp_path / "cut", "resume=true"))
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
    assert resumed["eval_untrained"] == full["eval_untrained"]
    a, b = draft_weights(tmp_path / "full"), draft_weights(tmp_path / "cut")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["fkl", "rkl", "tvd", "ce"])
def test_cached_targets_give_the_online_losses_when_k_covers_the_vocabulary(target_dir, draft_chat_file, tmp_path,
                                                                            loss):
    # k = the truncated training vocabulary (the full 49k one would make a large cache).
    common = ["train.max_steps=3", "draft.truncated_vocab_size=256", "draft.cache_top_k=256", f"draft.loss={loss}",
              "draft.temperature=2.0"]
    online = run(overrides(target_dir, draft_chat_file, tmp_path / "online", *common))
    cached = run(overrides(target_dir, draft_chat_file, tmp_path / "cached", "draft.target_logits=cache", *common))
    assert cached["train_loss"] == pytest.approx(online["train_loss"], rel=1e-4, abs=1e-6)
    assert list((tmp_path / "cached" / "target_cache").glob("train-*/meta.json"))
    # A second run on the same data reuses the cache instead of running the target again.
    again = run(overrides(target_dir, draft_chat_file, tmp_path / "again", "draft.target_logits=cache",
                          f"draft.cache_dir={tmp_path / 'cached' / 'target_cache'}", *common))
    assert again["train_loss"] == cached["train_loss"]


@pytest.mark.parametrize("bad, message", [
    ("draft.loss=kl", "draft.loss must be one of fkl, rkl, tvd, ce"),
    ("draft.temperature=0", "draft.temperature must be > 0"),
    ("draft.init=prune", "draft.init must be one of layers, config, model"),
    ("draft.target_logits=disk", "target_logits online or cache"),
    ("draft.layers=[0,7]", r"draft.layers \[7\] out of range: the target has 4 layers"),
    ("draft.init=model", "draft.init=model needs draft.model"),
])
def test_bad_settings_fail_with_a_clear_error(target_dir, draft_chat_file, tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        run(overrides(target_dir, draft_chat_file, tmp_path / "bad", bad))


def test_nan_loss_stops_naming_the_step(target_dir, draft_chat_file, tmp_path, monkeypatch):
    real = draft_recipe.per_token_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(draft_recipe, "per_token_loss", poisoned)
    with pytest.raises(draft_recipe.NonFiniteLossError, match="at step 2"):
        run(overrides(target_dir, draft_chat_file, tmp_path / "stop"))


def test_config_init_from_the_command_line(target_dir, draft_chat_file, tmp_path):
    summary = run(overrides(target_dir, draft_chat_file, tmp_path / "cfg", "train.max_steps=2", "draft.init=config",
                            "+draft.config_overrides={num_hidden_layers: 2, intermediate_size: 96}"))
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "cfg" / "draft")
    assert (draft.config.num_hidden_layers, draft.config.intermediate_size) == (2, 96)
    assert "num_hidden_layers" in summary["draft"]
