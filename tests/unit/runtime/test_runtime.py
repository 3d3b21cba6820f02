"""Runtime: tree buffers, greedy exactness against transformers' generate, batching, cache, stopping."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from medusa_train.model import MedusaModel, build_heads
from medusa_train.runtime import TREES, medusa_generate, resolve_tree
from medusa_train.runtime.acceptance import Acceptance
from medusa_train.runtime.generate import Clock, decode_step, next_inputs, prefill, tree_forward
from tests.conftest import TINY, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- helpers -------------------------------------------------------------------------


def medusa(arch="llama", seed=0, config=None, **head_kwargs) -> MedusaModel:
    if config is None:
        base = tiny_model(arch, seed=seed)
    else:
        torch.manual_seed(seed)
        base = tf.AutoModelForCausalLM.from_config(config).eval()
    head_kwargs.setdefault("num_heads", 4)
    return MedusaModel(base, build_heads(base, **head_kwargs)).eval()


def prompts(lengths, seed=0, vocab=256):
    """Left-padded random prompts (pad id 0) -> input_ids, attention_mask."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.zeros(len(lengths), P, dtype=torch.long)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, P - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, P - n :] = 1
    return ids, mask


def hf_greedy(model, ids, mask, max_new_tokens, **kwargs):
    return model.base.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, **kwargs
    )


def new_tokens(sequences, prompt_len, eos):
    """Rows of generated ids, cut after the first EOS (what both decoders promise)."""
    rows = []
    for row in sequences[:, prompt_len:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


class OracleHeads:
    """Stand-in for `MedusaModel.logits_from_hidden` whose heads often know the future.

    It finds the reference position whose hidden state is nearest to the query, and head k
    puts that position's true token t+k+2 at rank 0 (70%), at rank 1 (20%) or nowhere. Long
    acceptances, through non-top-1 branches too, then really happen; a wrong lookup only lowers
    acceptance, never correctness.
    """

    def __init__(self, model: MedusaModel, sequences: torch.Tensor, mask: torch.Tensor, seed: int = 0):
        self.model, self.K = model, model.heads.num_heads
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            hidden = model.decoder(input_ids=sequences, attention_mask=mask, position_ids=positions).last_hidden_state
        real = mask.bool()
        self.library = hidden[real]  # (M, H)
        L = sequences.shape[1]
        future = torch.full((*sequences.shape, self.K), -1)
        for k in range(self.K):
            future[:, : L - k - 2, k] = torch.where(real[:, k + 2 :], sequences[:, k + 2 :], -1)
        self.future = future[real]  # (M, K)
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, hidden: torch.Tensor, return_base_logits: bool = True):
        logits = self.model.lm_head(hidden)  # (B, 1, V)
        heads = self.model.heads
        Vh = heads.vocab_map.numel()
        nearest = torch.cdist(hidden[:, 0], self.library).argmin(-1)  # (B,)
        targets = heads.to_head_vocab(self.future[nearest].T.clamp(min=0), -1)  # (K, B) head-vocab ids
        targets = torch.where(self.future[nearest].T >= 0, targets, -1)
        head_logits = torch.rand(self.K, hidden.shape[0], 1, Vh, generator=self.g)
        for k in range(self.K):
            for b in range(hidden.shape[0]):
                t, u = int(targets[k, b]), float(torch.rand((), generator=self.g))
                if t < 0 or u > 0.9:
                    continue
                head_logits[k, b, 0, t] = 3.0 if u < 0.7 else 2.0
                if u >= 0.7:  # someone else is top-1, the truth is rank 1
                    head_logits[k, b, 0, (t + 1) % Vh] = 4.0
        return logits, head_logits


class CharTokenizer:
    """Token t decodes to one letter; enough for stop strings and transformers' TextStreamer."""

    def decode(self, tokens, **kwargs):
        return "".join(chr(ord("a") + t % 26) if t % 5 else " " for t in tokens)


def with_oracle(model, ids, mask, max_new_tokens, **kwargs):
    reference = hf_greedy(model, ids, mask, max_new_tokens, **kwargs)
    full_mask = torch.cat([mask, torch.ones_like(reference[:, ids.shape[1] :])], 1)
    model.logits_from_hidden = OracleHeads(model, reference, full_mask)
    return reference


# ---- tree ----------------------------------------------------------------------------


def test_tree_buffers_hand_drawn():
    #            root(0)
    #          /        \
    #      [0](1)       [1](2)
    #      /    \          \
    # [0,0](3) [0,1](4)  [1,0](5)
    #    |
    # [0,0,0](6)
    tree = resolve_tree([[1, 0], [0], [0, 0, 0], [1], [0, 1], [0, 0]])  # any order
    assert tree.choices == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    ancestors = {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 4], 5: [0, 2, 5], 6: [0, 1, 3, 6]}
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for i, seen in ancestors.items():
        expected[i, seen] = True
    assert torch.equal(tree.mask, expected)
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.parents.tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert (tree.topk, tree.depth, tree.num_nodes) == (2, 3, 7)
    # pool = [root, head0 top0, head0 top1, head1 top0, head1 top1, head2 top0, head2 top1]
    assert tree.proposal_index.tolist() == [0, 1, 2, 3, 4, 3, 5]
    assert tree.paths.tolist() == [[0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]]
    assert tree.internal.tolist() == [0, 1, 2, 3]
    assert tree.internal_slot.tolist() == [0, 1, 2, 3, -1, -1, -1]


def test_tree_validation_and_named_trees():
    with pytest.raises(ValueError, match="parent"):
        resolve_tree([[0, 0]])
    with pytest.raises(ValueError, match="distinct"):
        resolve_tree([[0], [0]])
    with pytest.raises(ValueError, match="unknown tree"):
        resolve_tree("nope")
    for name in TREES:
        resolve_tree(name)
    big = resolve_tree("mc_sim_7b_63")
    assert (big.num_nodes, big.depth, big.topk) == (64, 4, 10)
    single = resolve_tree("autoregressive")
    assert single.num_nodes == 1 and single.depth == 0 and single.paths.tolist() == [[0]]
    assert resolve_tree(None, default=[[0]]).choices == ((0,),)


def test_tree_mask_and_positions_in_the_step(monkeypatch):
    """The 4-D mask / position ids that reach the decoder: left pads and ragged rows hidden."""
    model = medusa("llama")
    ids, mask = prompts([3, 5])
    kv, _ = prefill(model, ids, mask)
    kv.length = torch.tensor([5, 4])  # as if row 1 had accepted fewer tokens: slot 4 is a hole
    tree = resolve_tree([[0], [1], [0, 0]])
    seen = {}
    real_forward = model.base.model.forward

    def spy(**kwargs):
        seen.update(kwargs)
        return real_forward(**kwargs)

    monkeypatch.setattr(model.base.model, "forward", spy)
    tree_forward(model, kv, torch.zeros(2, 4, dtype=torch.long), tree)
    assert seen["position_ids"].tolist() == [[3, 4, 4, 5], [4, 5, 5, 6]]
    visible = seen["attention_mask"][:, 0] == 0  # (B, T, S+T)
    assert seen["attention_mask"].dtype == torch.float32
    # row 0: 2 left pads, real slots 2..4; row 1: real slots 0..3, slot 4 a hole
    ctx = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    for b in range(2):
        assert torch.equal(visible[b, :, :5], ctx[b].expand(4, 5))
        assert torch.equal(visible[b, :, 5:], tree.mask)


# ---- greedy exactness ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_matches_generate_untrained_heads(arch):
    model = medusa(arch)
    eos = [2]
    for seed, length in [(0, 7), (1, 12)]:
        ids, mask = prompts([length], seed=seed)
        reference = hf_greedy(model, ids, mask, 24, eos_token_id=eos)
        for tree in ["autoregressive", "chain4", "cpu_small", "mc_sim_7b_63"]:
            out = medusa_generate(model, ids, mask, tree=tree, max_new_tokens=24, eos_token_id=eos)
            assert out.new_tokens == new_tokens(reference, ids.shape[1], eos), (arch, seed, tree)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_matches_generate_with_long_acceptances(arch):
    model = medusa(arch, seed=1)
    ids, mask = prompts([9], seed=3)
    reference = with_oracle(model, ids, mask, 40, eos_token_id=[])
    expected = new_tokens(reference, ids.shape[1], [])
    for tree in ["chain4", "cpu_small", "mc_sim_7b_63", [[0], [1], [1, 0], [1, 1], [1, 1, 1]]]:
        out = medusa_generate(model, ids, mask, tree=tree, max_new_tokens=40, eos_token_id=[])
        assert out.new_tokens == expected, (arch, tree)
        stats = out.stats
        assert stats.mean_accept_length > 0.8 and max(stats.accept_lengths[0]) >= 2
        assert stats.tau == pytest.approx(40 / stats.forwards[0]) and stats.tau > 1.5


def test_greedy_batch_left_padding_equals_rows_alone():
    model = medusa("llama", seed=2)
    ids, mask = prompts([4, 11, 7], seed=5)
    eos = [2, 7]  # several EOS ids: rows stop at different steps
    reference = with_oracle(model, ids, mask, 30, eos_token_id=eos)
    expected = new_tokens(reference, ids.shape[1], eos)
    batch = medusa_generate(model, ids, mask, tree="mc_sim_7b_63", max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    assert batch.new_tokens == expected
    assert torch.equal(batch.sequences, reference)  # same layout and pad ids as transformers
    assert len({tuple(r) for r in batch.stats.accept_lengths}) > 1  # rows really accepted differently
    for b in range(3):
        row = mask[b].bool()
        alone = medusa_generate(model, ids[b : b + 1, row], tree="mc_sim_7b_63", max_new_tokens=30, eos_token_id=eos)
        assert alone.new_tokens[0] == expected[b]


def test_eager_attention():
    """Eager attention adds a 4-D mask to the scores: the runtime's additive float mask must do there too."""
    config = tf.LlamaConfig(vocab_size=256, **TINY)
    config._attn_implementation = "eager"
    model = medusa(config=config, seed=11)
    assert model.config._attn_implementation == "eager"
    ids, mask = prompts([5, 9], seed=13)
    reference = with_oracle(model, ids, mask, 24, eos_token_id=[])
    out = medusa_generate(model, ids, mask, tree="mc_sim_7b_63", max_new_tokens=24, eos_token_id=[])
    assert out.new_tokens == new_tokens(reference, ids.shape[1], [])
    assert out.stats.mean_accept_length > 0.5


def test_sliding_window_model():
    config = tf.MistralConfig(vocab_size=256, sliding_window=8, **TINY)
    model = medusa(config=config, seed=4)
    ids, mask = prompts([6], seed=6)
    reference = with_oracle(model, ids, mask, 30, eos_token_id=[])
    out = medusa_generate(model, ids, mask, tree="cpu_small", max_new_tokens=30, eos_token_id=[])
    assert out.new_tokens == new_tokens(reference, ids.shape[1], [])
    assert out.stats.mean_accept_length > 0.5


def test_truncated_head_vocab_maps_to_full_ids():
    base = tiny_model("llama", seed=5)
    vocab_map = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:200]
    heads = build_heads(base, num_heads=3, lm_head="own", truncated_vocab_size=200, vocab_map=vocab_map)
    model = MedusaModel(base, heads).eval()
    ids, mask = prompts([8], seed=7)
    reference = hf_greedy(model, ids, mask, 30, eos_token_id=[])
    out = medusa_generate(model, ids, mask, tree="cpu_small", max_new_tokens=30, eos_token_id=[])
    assert out.new_tokens == new_tokens(reference, ids.shape[1], [])  # untrained truncated heads
    with_oracle(model, ids, mask, 30, eos_token_id=[])
    out = medusa_generate(model, ids, mask, tree="cpu_small", max_new_tokens=30, eos_token_id=[])
    assert out.new_tokens == new_tokens(reference, ids.shape[1], [])
    assert out.stats.mean_accept_length > 0.5  # proposals only match when mapped back to full ids

    hidden = torch.zeros(1, 1, 64)
    head_logits = torch.full((3, 1, 1, 200), -1.0)
    head_logits[:, 0, 0, 17] = 5.0
    model.logits_from_hidden = lambda h, return_base_logits=True: (model.lm_head(h), head_logits)
    _, proposals = next_inputs(model, hidden, resolve_tree([[0]]))
    assert proposals.tolist() == [[[int(vocab_map[17])]]]


# ---- cache ---------------------------------------------------------------------------


def test_cache_after_many_steps_matches_full_forward():
    model = medusa("qwen2", seed=6)
    ids, mask = prompts([5, 9], seed=8)
    with_oracle(model, ids, mask, 40, eos_token_id=[])
    tree = resolve_tree("mc_sim_7b_63")
    rule = Acceptance("greedy")
    clock = Clock(torch.device("cpu"))
    with torch.no_grad():
        kv, hidden = prefill(model, ids, mask)
        logits, proposals = next_inputs(model, hidden, tree)
        root = rule.choose(logits)
        generated = [[r] for r in root.tolist()]
        accepted_total = 0
        for _ in range(8):
            emitted, accepted, root, proposals = decode_step(model, kv, tree, rule, root, proposals, clock)
            for b in range(2):
                generated[b] += emitted[b, : int(accepted[b]) + 1].tolist()
            accepted_total += int(accepted.sum())
        assert accepted_total > 8
        # The next root through the runtime's cache vs a fresh forward over the whole sequence.
        step_logits = model.lm_head(tree_forward(model, kv, root[:, None], resolve_tree("autoregressive")))[:, -1]
        for b in range(2):
            sequence = torch.cat([ids[b, mask[b].bool()], torch.tensor(generated[b])])[None]
            full = model.base(sequence).logits[0, -1]
            assert generated[b][-1] == int(root[b])
            torch.testing.assert_close(step_logits[b], full, atol=1e-5, rtol=1e-5)


# ---- stopping, streaming, stats ------------------------------------------------------


def test_max_new_tokens_is_never_exceeded():
    model = medusa("llama", seed=7)
    ids, mask = prompts([6, 10], seed=9)
    reference = with_oracle(model, ids, mask, 40, eos_token_id=[])
    for n in [1, 2, 5, 7, 13]:
        out = medusa_generate(model, ids, mask, tree="chain4", max_new_tokens=n, eos_token_id=[])
        assert [len(r) for r in out.new_tokens] == [n, n]
        assert out.sequences.shape == (2, ids.shape[1] + n)
        assert torch.equal(out.sequences, reference[:, : ids.shape[1] + n])


def test_eos_and_stop_strings():
    model = medusa("llama", seed=8)
    ids, mask = prompts([6], seed=10)
    reference = with_oracle(model, ids, mask, 30, eos_token_id=[])
    full = reference[0, ids.shape[1] :].tolist()
    eos = [full[9], full[12]]  # the 10th new token (or an earlier occurrence) ends the row
    cut = next(i + 1 for i, t in enumerate(full) if t in eos)
    out = medusa_generate(model, ids, mask, tree="chain4", max_new_tokens=30, eos_token_id=eos)
    assert out.new_tokens[0] == full[:cut]

    text = CharTokenizer().decode(full)
    stop = text[7:10]
    end = text.index(stop) + len(stop)
    out = medusa_generate(
        model, ids, mask, tree="chain4", max_new_tokens=30, eos_token_id=[], stop_strings=stop,
        tokenizer=CharTokenizer(),
    )  # fmt: skip
    assert out.new_tokens[0] == full[:end]
    with pytest.raises(ValueError, match="tokenizer"):
        medusa_generate(model, ids, mask, stop_strings=["x"])


def test_streamer_and_stats(capsys):
    model = medusa("llama", seed=9)
    ids, mask = prompts([6], seed=11)
    with_oracle(model, ids, mask, 20, eos_token_id=[])

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    streamer = Recorder()
    out = medusa_generate(model, ids, mask, tree="chain4", max_new_tokens=20, eos_token_id=[], streamer=streamer)
    assert streamer.puts[0] == ids.tolist() and streamer.ended
    assert sum(streamer.puts[1:], []) == out.new_tokens[0]
    assert any(len(p) > 1 for p in streamer.puts[1:])  # several tokens per step
    stats = out.stats
    assert stats.steps == len(stats.accept_lengths[0]) == stats.forwards[0] - 1
    assert stats.accepted_at_depth[0] >= stats.accepted_at_depth[-1]
    assert stats.accepted_at_depth[0] == sum(a >= 1 for a in stats.accept_lengths[0])
    assert set(stats.time) == {"prefill", "forward", "logits", "other", "total"}
    plain = medusa_generate(model, ids, mask, tree="autoregressive", max_new_tokens=20, eos_token_id=[])
    assert plain.stats.tau == 1.0 and plain.stats.steps == 19 and plain.new_tokens == out.new_tokens

    capsys.readouterr()
    text_streamer = tf.TextStreamer(CharTokenizer(), skip_prompt=True)
    medusa_generate(model, ids, mask, tree="chain4", max_new_tokens=20, eos_token_id=[], streamer=text_streamer)
    assert capsys.readouterr().out == CharTokenizer().decode(out.new_tokens[0]) + "\n"


def test_typical_acceptance():
    model = medusa("llama", seed=10)
    ids, mask = prompts([6, 8], seed=12)
    reference = with_oracle(model, ids, mask, 20, eos_token_id=[])
    kwargs = dict(acceptance="typical", max_new_tokens=20, eos_token_id=[])
    greedy = medusa_generate(model, ids, mask, temperature=0.0, **kwargs)
    assert torch.equal(greedy.sequences, reference)  # temperature 0 is greedy
    oracle = model.logits_from_hidden
    runs = [
        oracle.g.manual_seed(0) and medusa_generate(
            model, ids, mask, temperature=0.7, generator=torch.Generator().manual_seed(0), **kwargs
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)  # seeded
    assert [len(r) for r in runs[0].new_tokens] == [20, 20]
    with pytest.raises(ValueError, match="acceptance"):
        medusa_generate(model, ids, mask, acceptance="nope")


def test_input_validation():
    model = medusa("llama")
    ids, mask = prompts([3, 5])
    with pytest.raises(ValueError, match="left padding"):
        medusa_generate(model, ids, mask.flip(-1))
    with pytest.raises(ValueError, match="heads"):
        medusa_generate(model, ids, mask, tree=[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="one row"):
        medusa_generate(model, ids, mask, streamer=object())
