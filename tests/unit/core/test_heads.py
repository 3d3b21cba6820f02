import pytest
import torch

from medusa_train.heads import MedusaHeads, MedusaHeadsConfig
from medusa_train.model import MedusaModel, build_heads
from tests.conftest import tiny_model


def perturb(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_blocks_are_distinct_modules():
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=8, vocab_size=16, num_heads=3, num_layers=2))
    linears = [b[l].linear for b in heads.blocks for l in range(2)]
    assert len({id(m) for m in linears}) == 6
    assert len({m.weight.data_ptr() for m in linears}) == 6


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("lm_head", ["shared", "own"])
def test_zero_init_heads_reproduce_base_logits(arch, lm_head):
    base = tiny_model(arch)
    model = MedusaModel(base, build_heads(base, "tiny", num_heads=3, num_layers=2, lm_head=lm_head))
    ids = torch.randint(0, 256, (2, 7))
    out = model(ids)
    ref = base(ids).logits
    torch.testing.assert_close(out.logits, ref)
    for k in range(3):
        torch.testing.assert_close(out.head_logits[k], ref)


def test_truncated_heads_project_onto_vocab_map_rows():
    base = tiny_model()
    vocab_map = torch.tensor([3, 5, 7, 11, 200])
    for lm_head in ["shared", "own"]:
        heads = build_heads(base, "tiny", num_heads=2, lm_head=lm_head, truncated_vocab_size=5, vocab_map=vocab_map)
        out = MedusaModel(base, heads)(torch.randint(0, 256, (1, 4)))
        assert out.head_logits.shape == (2, 1, 4, 5)
        torch.testing.assert_close(out.head_logits[0], out.logits[..., vocab_map])
    ids = torch.tensor([[3, 4, -100, 200]])
    assert heads.to_head_vocab(ids).tolist() == [[0, -100, -100, 4]]


def test_shared_truncated_weight_follows_base_updates():
    base = tiny_model()
    heads = build_heads(base, "tiny", num_heads=1, truncated_vocab_size=4, vocab_map=torch.arange(4))
    model = MedusaModel(base, heads)
    ids = torch.randint(0, 256, (1, 3))
    with torch.no_grad():
        before = model(ids).head_logits.clone()
        base.get_output_embeddings().weight.mul_(2.0)
        after = model(ids).head_logits
    torch.testing.assert_close(after, before * 2.0)


@pytest.mark.parametrize("kwargs", [dict(), dict(lm_head="own"), dict(truncated_vocab_size=8, vocab_map=torch.arange(8) * 2)])
def test_save_load_round_trip(tmp_path, kwargs):
    base = tiny_model()
    heads = build_heads(base, "tiny-base", num_heads=3, num_layers=2, **kwargs)
    perturb(heads)
    heads.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["medusa_heads.json", "medusa_heads.safetensors"]
    loaded = MedusaModel.from_pretrained(base, tmp_path)
    ids = torch.randint(0, 256, (2, 5))
    torch.testing.assert_close(loaded(ids).head_logits, MedusaModel(base, heads)(ids).head_logits)
    assert loaded.heads.config.base_model == "tiny-base"
    assert torch.equal(loaded.heads.vocab_map, heads.vocab_map)


def test_heads_on_mismatched_base_fail_clearly(tmp_path):
    build_heads(tiny_model(), "tiny").save_pretrained(tmp_path)
    other = tiny_model(vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size=256.*vocab_size=300"):
        MedusaModel.from_pretrained(other, tmp_path)


def test_missing_heads_folder_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Medusa heads"):
        MedusaHeads.from_pretrained(tmp_path)


def test_newer_format_version_is_refused(tmp_path):
    import json

    build_heads(tiny_model(), "tiny").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "medusa_heads.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "medusa_heads.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="upgrade medusa_train"):
        MedusaHeads.from_pretrained(tmp_path)


def test_bad_head_config_is_refused():
    with pytest.raises(ValueError, match="lm_head"):
        MedusaHeadsConfig(hidden_size=8, vocab_size=16, lm_head="tied")
    with pytest.raises(ValueError, match="truncated_vocab_size"):
        MedusaHeadsConfig(hidden_size=8, vocab_size=16, truncated_vocab_size=32)
