"""Draft-model speculative decoding: greedy exactness against transformers' generate, exact
sampling (statistical), cache bookkeeping, the gamma controller, input errors."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from medusa_train.runtime.acceptance import Acceptance
from medusa_train.runtime.generate import Clock
from medusa_train.runtime.speculative import (
    GammaController,
    accept_drafts,
    draft_generate,
    expected_tokens,
)
from tests.conftest import tiny_model
from tests.sampling_checks import chi_square_z, exact_joint

pytestmark = pytest.mark.usefixtures("one_thread")


def prompt(n=10, seed=0, vocab=256):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, ids, n, **kwargs):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         pad_token_id=0, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def layer_subset_draft(target, layers):
    """An early-exit draft: some of the target's layers with its embeddings, norm and head (so
    it agrees with the target often, and the long-acceptance paths get exercised)."""
    fields = {**target.config.to_dict(), "num_hidden_layers": len(layers)}
    if fields.get("layer_types"):
        fields["layer_types"] = [fields["layer_types"][i] for i in layers]
    config = target.config.__class__(**fields)
    draft = tf.AutoModelForCausalLM.from_config(config).eval()
    state = {k: v for k, v in target.state_dict().items() if ".layers." not in k}
    for new, old in enumerate(layers):
        prefix = f"model.layers.{old}."
        state.update({k.replace(prefix, f"model.layers.{new}."): v for k, v in target.state_dict().items()
                      if k.startswith(prefix)})
    draft.load_state_dict(state)
    return draft


def sharpened(model, factor=8.0):
    """Peaked next-token distributions: a random tiny model's are nearly uniform, so its greedy
    choices would hinge on rounding."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("gamma", [0, 1, 3, "auto"])
def test_greedy_identical_to_generate(arch, gamma):
    target = sharpened(tiny_model(arch, seed=0))
    ids = prompt(seed=1)
    reference = hf_greedy(target, ids, 48, min_new_tokens=48)
    for draft in [sharpened(tiny_model(arch, seed=5)), target, layer_subset_draft(target, [0])]:
        out = draft_generate(target, draft, ids, gamma=gamma, max_new_tokens=48, eos_token_id=[])
        assert out.new_tokens[0] == reference
        assert out.sequences[0, ids.shape[1]:].tolist() == reference
        stats = out.stats
        assert 1 + stats.steps + sum(stats.accept_lengths[0]) == 48  # prefill: 1, a round: kept drafts + 1
        assert all(k <= g for k, g in zip(stats.accept_lengths[0], stats.gammas))
        if draft is target and gamma not in (0, "auto"):
            assert stats.acceptance_rate > 0.9  # a draft equal to the target is (almost) always right


def test_truncated_vocabulary_draft_is_still_exact():
    target = sharpened(tiny_model("llama", seed=0))
    ids = prompt(seed=2)
    reference = hf_greedy(target, ids, 40, min_new_tokens=40)
    frequent = torch.tensor(sorted(set(reference)))  # a subset that holds the right answers: high acceptance
    out = draft_generate(target, target, ids, gamma=4, vocab_map=frequent, max_new_tokens=40, eos_token_id=[])
    assert out.new_tokens[0] == reference
    assert out.stats.acceptance_rate > 0.9
    sparse = torch.arange(0, 256, 7)  # mostly the wrong tokens: low acceptance, same output
    out = draft_generate(target, target, ids, gamma=4, vocab_map=sparse, max_new_tokens=40, eos_token_id=[])
    assert out.new_tokens[0] == reference


def test_eos_stops_mid_round_and_budget_is_exact():
    target = sharpened(tiny_model("llama", seed=3))
    ids = prompt(seed=4)
    full = hf_greedy(target, ids, 30, min_new_tokens=30)
    eos = full[10]
    cut = full.index(eos) + 1
    out = draft_generate(target, target, ids, gamma=6, max_new_tokens=30, eos_token_id=eos)
    assert out.new_tokens[0] == full[:cut]
    for n in [1, 2, 5, 9]:
        out = draft_generate(target, target, ids, gamma=4, max_new_tokens=n, eos_token_id=[])
        assert out.new_tokens[0] == full[:n]


def test_caches_hold_exactly_the_sequence():
    """After decoding, the target's and the draft's caches give the logits a fresh forward does."""
    from medusa_train.runtime import speculative

    target = sharpened(tiny_model("llama", seed=0))
    draft = sharpened(tiny_model("llama", seed=5))
    seen = {}
    original = speculative.Drafter.keep

    def spy(self, tokens):
        original(self, tokens)
        seen["drafter"] = self

    speculative.Drafter.keep = spy
    try:
        ids = prompt(seed=6)
        out = draft_generate(target, draft, ids, gamma=3, max_new_tokens=20, eos_token_id=[])
    finally:
        speculative.Drafter.keep = original
    drafter = seen["drafter"]
    sequence = out.sequences[0]
    # Everything before the last emitted token is in the draft's cache or pending.
    assert drafter.length == len(sequence) - 1
    assert drafter.cache.get_seq_length() + len(drafter.pending) == drafter.length
    with torch.no_grad():
        cached = drafter.feed(sequence[-1:])  # the root goes on top of cache + pending
        fresh = draft.get_decoder()(input_ids=sequence[None]).last_hidden_state[0, -1]
    torch.testing.assert_close(cached, fresh, rtol=1e-4, atol=1e-5)


def test_accept_drafts_keeps_the_target_distribution():
    """For any draft q, the first token out is distributed as p_1, and the second (when the first
    draft was kept) as p_2: the rejection rule alone, 12,000 rounds on fixed distributions."""
    V, g, N = 6, 2, 12000
    gen = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3], [0.0, 1.5, -0.5, 1.0, 0.2, 0.0], [0.0] * 6])
    q = torch.tensor([[0.05, 0.5, 0.05, 0.3, 0.05, 0.05], [0.4, 0.1, 0.1, 0.1, 0.2, 0.1]])
    rule = Acceptance("sample", temperature=1.0, generator=gen)
    p = rule.probs(p_logits)
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(N):
        drafts = torch.stack([torch.multinomial(q[i], 1, generator=gen)[0] for i in range(g)])
        kept, token = accept_drafts(p_logits, drafts, q, rule)
        out = torch.cat([drafts[:kept], token.view(1)])
        first[out[0]] += 1
        if kept >= 1:
            second[out[1]] += 1
    assert chi_square_z(first, p[0]) < 4.5
    assert chi_square_z(second, p[1]) < 4.5
    assert chi_square_z(first, q[0]) > 6  # the test can tell the draft's law from the target's


def test_sampling_matches_the_target_distribution():
    """End to end on a 16-token model: the joint law of the first 2 tokens equals plain sampling's."""
    V, rows, new = 16, 3000, 3  # 3 tokens: the budget leaves room for a draft after the first
    torch.manual_seed(3)
    config = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1)
    target = sharpened(tf.LlamaForCausalLM(config).eval(), 6.0)
    draft = layer_subset_draft(target, [1])  # close to the target but not equal to it
    ids = torch.tensor([[1, 5, 9, 3, 12]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V, V)
    kept = proposed = 0
    for _ in range(rows):
        out = draft_generate(target, draft, ids, gamma=2, max_new_tokens=new, acceptance="sample",
                             temperature=0.9, top_p=0.95, eos_token_id=[], generator=gen)
        counts[tuple(out.new_tokens[0][:2])] += 1
        kept += sum(out.stats.accept_lengths[0])
        proposed += sum(out.stats.gammas)
    assert kept / proposed > 0.3  # drafts were kept often: the acceptance path is what is tested
    z = chi_square_z(counts, exact_joint(target, ids, 0.9, 0.95, V).sum(-1))
    z_hotter = chi_square_z(counts, exact_joint(target, ids, 0.9 * 1.4, 0.95, V).sum(-1))
    print(f"z {z:.2f}, against a 1.4x temperature {z_hotter:.2f}")
    assert z < 4.5
    assert z_hotter > 6


class FakeClock(Clock):
    def __init__(self):
        super().__init__(torch.device("cpu"), sections=("prefill", "draft", "forward", "logits"))

    def spend(self, draft, verify):
        self.totals["draft"] += draft
        self.totals["forward"] += verify


def run_controller(controller, clock, acceptance, t_draft, t_verify, rounds=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for _ in range(rounds):
        g = controller.choose()
        kept = 0
        while kept < g and float(torch.rand(1, generator=gen)) < acceptance:
            kept += 1
        clock.spend(g * t_draft, t_verify(g))
        controller.update(g, kept, clock)
        chosen.append(g)
    return chosen


def test_gamma_controller_follows_what_pays():
    # A good, cheap draft and a verification that costs about the same for any size: draft long.
    clock = FakeClock()
    chosen = run_controller(GammaController("auto", max_gamma=8), clock, 0.9, 0.002, lambda g: 0.05 + 0.001 * g)
    assert sum(chosen[-20:]) / 20 >= 6
    # A poor draft on hardware where verifying more tokens costs much more: mostly plain steps.
    clock = FakeClock()
    chosen = run_controller(GammaController("auto", max_gamma=8), clock, 0.1, 0.01, lambda g: 0.05 * (1 + 0.8 * g))
    assert chosen[-20:].count(0) >= 15
    assert 1 in chosen[-40:]  # ...with a probe now and then
    # A fixed gamma is a fixed gamma.
    clock = FakeClock()
    assert set(run_controller(GammaController(3), clock, 0.5, 0.01, lambda g: 0.05)) == {3}


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-9


def test_input_errors():
    target = tiny_model("llama")
    ids = prompt()
    with pytest.raises(ValueError, match="one sequence"):
        draft_generate(target, target, ids.expand(2, -1))
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        draft_generate(target, tiny_model("llama", vocab_size=128), ids)
    with pytest.raises(ValueError, match="vocab_map"):
        draft_generate(target, target, ids, vocab_map=torch.tensor([1, 300]))
    with pytest.raises(ValueError, match="gamma"):
        draft_generate(target, target, ids, gamma=-1)
    with pytest.raises(ValueError, match="greedy"):
        draft_generate(target, target, ids, acceptance="typical")
