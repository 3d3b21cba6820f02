import torch

from medusa_train.loss import IGNORE_INDEX, head_targets, head_weights, medusa_loss, topk_correct

X = IGNORE_INDEX


def test_head_targets_hand_worked():
    # tokens:  a  b  c  d  e  f   (ids 10..15); the prompt (a, b) carries no loss.
    labels = torch.tensor([[X, X, 12, 13, 14, 15]])
    t = head_targets(labels, num_heads=2)
    # base at position t predicts t+1; head 1 (k=0) predicts t+2; head 2 (k=1) predicts t+3.
    assert t[0, 0].tolist() == [12, 13, 14, 15, X, X]
    assert t[1, 0].tolist() == [13, 14, 15, X, X, X]


def test_head_targets_short_sequence():
    assert head_targets(torch.tensor([[5, 6]]), 3).eq(X).all()


def test_head_weights_decay():
    assert head_weights(3, 0.8, 0.5) == [0.5, 0.5 * 0.8, 0.5 * 0.8**2]


def test_medusa_loss_weights_and_ignores():
    logits = torch.zeros(2, 1, 3, 4)
    logits[0, 0, 0, 1] = 10.0  # head 1 confident and right at position 0
    targets = torch.tensor([[[1, X, 2]], [[X, X, 3]]])
    loss, ce_sums, counts = medusa_loss(logits, targets, [1.0, 0.5])
    assert counts.tolist() == [2, 1]
    ce_uniform = torch.log(torch.tensor(4.0))
    expected_h1 = (torch.nn.functional.cross_entropy(logits[0, 0, 0:1], torch.tensor([1])) + ce_uniform) / 2
    torch.testing.assert_close(loss, expected_h1 + 0.5 * ce_uniform)
    # a global normaliser: the same sums divided by other counts
    loss2, _, _ = medusa_loss(logits, targets, [1.0, 0.5], torch.tensor([4, 2]))
    torch.testing.assert_close(loss2, loss / 2)


def test_topk_correct():
    logits = torch.tensor([[[0.0, 3.0, 2.0, 1.0], [3.0, 0.0, 1.0, 2.0]]])  # (K=1, N=2, V=4)
    targets = torch.tensor([[2, X]])
    hits = topk_correct(logits, targets, ks=(1, 2))
    assert hits[1].tolist() == [0] and hits[2].tolist() == [1]


def test_frequent_tokens_ranks_by_count_then_id():
    from medusa_train.training.head_batches import frequent_tokens

    labels = [[X, 5, 5, 7], [7, 7, 2, X], [9]]
    assert frequent_tokens(labels, vocab_size=10, n=3).tolist() == [2, 5, 7]  # 7 x3, 5 x2, then 2 < 9
