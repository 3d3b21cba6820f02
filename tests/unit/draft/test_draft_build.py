"""Building drafts from a target: layer subsets, smaller configs, other models (tiny, CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as tf

from medusa_train.draft.build import (
    build_draft,
    check_compatible,
    draft_from_config,
    draft_from_layers,
    spread_layers,
    subset_config,
)

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


def four_layer(arch: str = "llama", vocab_size: int = 256, **extra):
    """A tiny random 4-layer model (tests/conftest.py's tiny models have 2)."""
    torch.manual_seed(0)
    if arch == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4)
    else:
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
        config = cls(vocab_size=vocab_size, num_hidden_layers=4, **TINY, **extra)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_layer_subset_copies_weights_exactly(arch):
    target = four_layer(arch)
    layers = [0, 3]
    draft = draft_from_layers(target, layers)
    assert type(draft) is type(target) and draft.config.num_hidden_layers == 2
    prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    t, d = target.state_dict(), draft.state_dict()
    for name, tensor in d.items():
        if name.startswith(prefix + "."):
            index, rest = name[len(prefix) + 1:].split(".", 1)
            source = f"{prefix}.{layers[int(index)]}.{rest}"
        else:
            source = name
        assert torch.equal(tensor, t[source]), name


def test_all_layers_give_the_target():
    target = four_layer()
    draft = draft_from_layers(target, [0, 1, 2, 3])
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(draft(x).logits, target(x).logits)


def test_layer_subset_equals_running_those_target_layers_by_hand():
    target = four_layer()
    draft = draft_from_layers(target, [0, 2])
    x = torch.randint(0, 256, (1, 10))
    m = target.model
    with torch.no_grad():
        h = m.embed_tokens(x)
        pos = torch.arange(10)[None]
        rope = m.rotary_emb(h, pos)
        mask = torch.full((10, 10), float("-inf")).triu(1)[None, None]
        for i in (0, 2):
            h = m.layers[i](h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        by_hand = target.lm_head(m.norm(h))
        torch.testing.assert_close(draft(x).logits, by_hand, rtol=1e-4, atol=1e-5)


def test_draft_kv_cache_matches_a_full_forward():
    """Each draft layer caches at its own index: incremental decoding equals one full pass."""
    target = four_layer("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=2)
    draft = draft_from_layers(target, [1, 3])
    assert draft.config.layer_types == [target.config.layer_types[1], target.config.layer_types[3]]
    assert [layer.self_attn.layer_idx for layer in draft.model.layers] == [0, 1]
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = draft(x).logits
        out = draft(x[:, :8], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(8, 12):
            out = draft(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_subset_config_cuts_per_layer_lists():
    config = tf.Qwen2Config(**TINY, num_hidden_layers=4, layer_types=["full_attention", "sliding_attention"] * 2,
                            use_sliding_window=True, sliding_window=8)
    cut = subset_config(config, [1, 2])
    assert cut.num_hidden_layers == 2 and cut.layer_types == ["sliding_attention", "full_attention"]
    assert config.num_hidden_layers == 4  # the target's config is untouched


def test_bad_layers_are_refused():
    target = four_layer()
    with pytest.raises(ValueError, match=r"\[4\] out of range"):
        draft_from_layers(target, [0, 4])
    with pytest.raises(ValueError, match="repeats"):
        draft_from_layers(target, [1, 1])
    with pytest.raises(ValueError, match="empty"):
        draft_from_layers(target, [])


def test_spread_layers():
    assert spread_layers(30, 4) == [0, 10, 19, 29]
    assert spread_layers(4, 2) == [0, 3]
    assert spread_layers(4, 1) == [0]


def test_config_init_copies_every_matching_shape():
    target = four_layer()
    draft = draft_from_config(target, {"num_hidden_layers": 2, "intermediate_size": 96})
    assert draft.config.num_hidden_layers == 2 and draft.config.intermediate_size == 96
    t = target.state_dict()
    for name, tensor in draft.state_dict().items():
        if ".mlp." in name:  # other intermediate size: freshly initialised
            assert tensor.shape != t[name.replace("layers.1.", "layers.3.")].shape
            continue
        source = name.replace("layers.1.", "layers.3.")  # spread: draft layers (0, 1) <- target (0, 3)
        assert torch.equal(tensor, t[source]), name


def test_config_init_with_an_unknown_key_fails():
    with pytest.raises(ValueError, match="has no num_layerz"):
        draft_from_config(four_layer(), {"num_layerz": 2})


def test_build_draft_dispatches_and_rejects_unknown_inits():
    target = four_layer()
    assert build_draft(target, SimpleNamespace(init="layers", layers=[0])).config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="draft.init must be one of"):
        build_draft(target, SimpleNamespace(init="prune"))


def test_model_init_loads_a_folder_sharing_the_tokenizer(tiny_model_dir, smol_tokenizer):
    target = tf.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    draft = build_draft(target, SimpleNamespace(init="model", model=str(tiny_model_dir)), smol_tokenizer)
    assert draft.config.num_hidden_layers == target.config.num_hidden_layers


def test_vocabulary_mismatch_names_the_difference(smol_tokenizer, tmp_path):
    target = four_layer(vocab_size=len(smol_tokenizer))
    small = four_layer()
    with pytest.raises(ValueError, match=f"256 embedding rows but the target's tokenizer has {len(smol_tokenizer)}"):
        check_compatible(target, small, smol_tokenizer, None, "small")
    other = tf.PreTrainedTokenizerFast(tokenizer_object=smol_tokenizer.backend_tokenizer)
    other.add_tokens(["<extra_token>"])
    with pytest.raises(ValueError, match="tokenizer has .* tokens, the target's"):
        check_compatible(target, target, smol_tokenizer, other, "other")
