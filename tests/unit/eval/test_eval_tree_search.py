"""Greedy tree construction, expected accepted length and the budget choice, on hand-worked numbers."""

from __future__ import annotations

import itertools

import pytest
import torch

from medusa_train.eval.accuracy import MISS, NO_TARGET, HeadRanks, chain_targets, product_probability, rank_table
from medusa_train.eval.latency import LatencyProfile, fit_overhead, isotonic
from medusa_train.eval.tree_search import (choose_budget, expected_accept_length, greedy_nodes, num_internal,
                                           search_tree)
from medusa_train.runtime import build_tree

# Per-depth rank accuracies: head 1 right at rank 0 with 0.6, rank 1 with 0.2; head 2: 0.5, 0.1.
ACC = torch.tensor([[0.6, 0.2], [0.5, 0.1]])
# Path probabilities: [0] .6, [1] .2, [0,0] .3, [0,1] .06, [1,0] .1, [1,1] .02
ORDER = [((0,), 0.6), ((0, 0), 0.3), ((1,), 0.2), ((1, 0), 0.1), ((0, 1), 0.06), ((1, 1), 0.02)]


def test_greedy_order_on_hand_worked_example():
    nodes = greedy_nodes(product_probability(ACC), num_heads=2, topk=2, max_nodes=64)
    assert [p for p, _ in nodes] == [p for p, _ in ORDER]
    assert [q for _, q in nodes] == pytest.approx([q for _, q in ORDER])
    # Every prefix is a valid tree (the runtime accepts it): each node's parent came before it.
    for n in range(len(nodes) + 1):
        build_tree(tuple(p for p, _ in nodes[:n]))


def test_expected_accept_length():
    prob = product_probability(ACC)
    assert expected_accept_length([], prob) == 1.0
    assert expected_accept_length([[0], [0, 0], [1]], prob) == pytest.approx(2.1)
    assert expected_accept_length([p for p, _ in ORDER], prob) == pytest.approx(2.28)


def test_greedy_respects_max_nodes_and_skips_zero_probability():
    prob = product_probability(torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    assert greedy_nodes(prob, 2, 2, max_nodes=64) == [((0,), 0.5)]
    assert len(greedy_nodes(product_probability(ACC), 2, 2, max_nodes=3)) == 2


def test_greedy_trees_are_optimal_for_their_size():
    """Brute force over every valid tree of 2 heads x top-2: greedy's n-node tree has the largest expected length."""
    g = torch.Generator().manual_seed(0)
    ranks = torch.randint(-1, 2, (400, 2), generator=g).to(torch.int16)
    prob = HeadRanks(ranks, topk=2, source="test").path_probability("joint")
    nodes = greedy_nodes(prob, 2, 2, 64)
    all_paths = [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]
    for n in range(1, len(nodes) + 1):
        best = max(sum(prob(p) for p in subset) for subset in itertools.combinations(all_paths, n)
                   if all(len(p) == 1 or p[:-1] in subset for p in subset))
        assert sum(q for _, q in nodes[:n]) == pytest.approx(best)


def test_budget_choice_maximises_tokens_per_second():
    expected = [1.0, 1.6, 1.9, 2.1, 2.2]
    latency = [10.0, 11.0, 12.0, 14.0, 20.0]  # tokens/ms: .100 .145 .158 .150 .110
    assert choose_budget(expected, latency) == 3
    assert choose_budget(expected, [10.0] * 5) == 5  # free nodes: take them all
    assert choose_budget(expected, [10.0, 100, 100, 100, 100]) == 1  # expensive trees: plain decoding
    with pytest.raises(ValueError):
        choose_budget(expected, latency[:2])


def test_search_tree_with_fake_latency_table():
    # forward(n) grows 1 ms per node, lm_head(m) 0.5 ms per row, next 1 ms; see LatencyProfile.step_ms.
    profile = LatencyProfile(context_len=8, forward_ms=[10.0 + n for n in range(8)],
                             lm_head_ms=[0.5 * (m + 1) for m in range(8)], next_ms=1.0)
    result = search_tree(product_probability(ACC), 2, 2, profile.step_ms, max_nodes=8)
    # n=1: 1/10.5; n=2 ([0]): 1.6/(11+.5+1); n=3 (+[0,0]): 1.9/(12+1+1); n=4 (+[1]): 2.1/(13+1+1) ...
    assert [row["step_ms"] for row in result.curve[:4]] == pytest.approx([10.5, 12.5, 14.0, 15.0])
    assert result.num_nodes == 4 and result.choices == [[0], [0, 0], [1]]
    assert result.expected_accept_length == pytest.approx(2.1)
    assert result.tokens_per_s == pytest.approx(1000 * 2.1 / 15.0)
    assert len(result.curve) == 7  # root + the 6 nodes with p > 0


def test_num_internal_matches_runtime_tree():
    for choices in ([[0]], [[0], [0, 0], [1]], [[0], [1], [2], [0, 0], [0, 1], [0, 0, 0]]):
        assert num_internal(choices) == len(build_tree(tuple(map(tuple, choices))).internal)


def test_rank_statistics_and_joint_probability():
    # 4 positions x 2 heads; NO_TARGET for head 2 at the last position.
    ranks = torch.tensor([[0, 0], [0, 1], [1, MISS], [MISS, NO_TARGET]], dtype=torch.int16)
    r = HeadRanks(ranks, topk=2, source="test")
    assert r.positions() == [4, 3]
    assert r.topk_accuracy() == [[0.5, 0.75], [pytest.approx(1 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4)]]
    torch.testing.assert_close(r.rank_accuracy(), torch.tensor([[0.5, 0.25], [1 / 3, 1 / 3]]))
    # Head 2 given head 1 in its top-2: the same 3 positions (all have head 1 in its top-2).
    torch.testing.assert_close(r.conditional_accuracy()[1], torch.tensor([1 / 3, 1 / 3]))
    joint = r.path_probability("joint")
    assert joint((0,)) == 0.5 and joint((0, 0)) == pytest.approx(1 / 3) and joint((1, 0)) == 0.0
    assert r.path_probability("independent")((0, 0)) == pytest.approx(0.5 / 3)


def test_chain_targets_need_every_token_from_the_root_on():
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8, -100, 9]])
    targets, keep = chain_targets(labels, num_heads=2)
    # Position 1 drafts from root 5 (t+1=2): head 1 -> 6, head 2 -> 7. Position 0: t+1 is a prompt token.
    assert targets[0, 0].tolist() == [-100, 6, 7, 8, -100, -100, -100, -100]
    assert targets[1, 0].tolist() == [-100, 7, 8, -100, -100, -100, -100, -100]
    assert keep[0].tolist() == [False, True, True, True, False, False, False, False]


def test_rank_table():
    logits = torch.tensor([[[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]]])  # (K=1, N=2, V=3)
    targets = torch.tensor([[2, -100]])
    assert rank_table(logits, targets, topk=2).tolist() == [[1], [MISS]]
    assert rank_table(logits, torch.tensor([[0, 0]]), topk=2).tolist() == [[MISS], [0]]


def test_latency_fit_is_non_decreasing():
    assert isotonic([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([5.0, 1.0, 1.0, 9.0]) == [7 / 3, 7 / 3, 7 / 3, 9.0]
    profile = LatencyProfile(context_len=8, forward_ms=[10.0, 14.0, 12.0], lm_head_ms=[1.0, 1.0, 1.0], next_ms=2.0)
    assert profile.step_ms(2, 1) == profile.step_ms(3, 1) == 13.0 + 1.0 + 2.0  # the dip at 3 is noise


def test_overhead_fit():
    assert fit_overhead([0, 3, 15, 63], [2.0 + 0.5 * x for x in (0, 3, 15, 63)]) == pytest.approx((2.0, 0.5))
    assert fit_overhead([0, 0], [3.0, 5.0]) == (4.0, 0.0)  # one size: the median, no slope
    assert fit_overhead([0, 10], [5.0, 1.0]) == (3.0, 0.0)  # bigger trees cheaper: noise, no negative slope
    a, b = fit_overhead([0, 10], [-4.0, 6.0])  # negative intercept: a line through the origin
    assert a == 0.0 and b == pytest.approx(0.6)
    profile = LatencyProfile(context_len=8, forward_ms=[10.0] * 4, lm_head_ms=[1.0] * 4, next_ms=2.0,
                             overhead_ms=1.0, overhead_ms_per_node=0.5)
    assert profile.step_ms(1, 0) == 12.0 and profile.step_ms(4, 1) == 10.0 + 1.0 + 2.0 + 1.0 + 1.5
