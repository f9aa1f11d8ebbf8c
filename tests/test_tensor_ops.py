"""The chunked KL (``masked_kl_sum``) against the full-vocabulary formula: value and gradient, both
directions, masked and padded positions, chunks of one position up to the whole batch."""

from __future__ import annotations

import math

import pytest
import torch

from emtune.tensor_ops import kl_per_token, masked_kl_sum


def _case(seed: int = 0, batch: int = 3, seq: int = 5, hidden: int = 6, vocab: int = 11):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64).float().mul_(3)
    ref_hidden = torch.randn(batch, seq, hidden, generator=gen)
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen))
        head.bias.copy_(torch.randn(vocab, generator=gen))
    weights = (torch.rand(batch, seq, generator=gen) > 0.3).float()
    weights[-1] = 0.0  # a whole example of padding
    return logits, ref_hidden, head, weights


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_chunked_kl_equals_the_full_formula_value_and_gradient(direction: str, chunk_rows: int) -> None:
    logits, ref_hidden, head, weights = _case()
    vocab = logits.shape[-1]
    full_logits = logits.clone().requires_grad_(True)
    with torch.no_grad():
        ref_logits = head(ref_hidden)
    expected = (kl_per_token(full_logits, ref_logits, direction) * weights).sum()
    expected.backward()

    chunked_logits = logits.clone().requires_grad_(True)
    got = masked_kl_sum(chunked_logits, ref_hidden, head, weights, direction, chunk_bytes=4 * vocab * chunk_rows)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(chunked_logits.grad, full_logits.grad, rtol=1e-5, atol=1e-6)
    assert head.weight.grad is None  # the reference side is a constant


def test_chunked_kl_by_hand_and_zero_weights_cost_nothing() -> None:
    # p = softmax([0, 0]) = (0.5, 0.5); the head maps hidden [1] to log(0.25, 0.75): q = (0.25, 0.75)
    head = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.log(torch.tensor([[0.25], [0.75]])))
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    hidden = torch.ones(1, 2, 1)
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    weights = torch.tensor([[1.0, 0.0]])
    assert masked_kl_sum(logits, hidden, head, weights).item() == pytest.approx(forward, abs=1e-6)
    assert masked_kl_sum(logits, hidden, head, weights, "reverse").item() == pytest.approx(reverse, abs=1e-6)
    total = masked_kl_sum(logits, hidden, head, torch.tensor([[2.0, 1.0]]))
    assert total.item() == pytest.approx(3 * forward, abs=1e-6)
    total.backward()
    # d KL(p||q) / dz_j = p_j((log p_j - log q_j) - KL), times each position's weight
    by_hand = [0.5 * (math.log(0.5 / 0.25) - forward), 0.5 * (math.log(0.5 / 0.75) - forward)]
    torch.testing.assert_close(logits.grad[0, 0], 2 * torch.tensor(by_hand), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad[0, 1], torch.tensor(by_hand), rtol=1e-5, atol=1e-6)

    calls = []
    counting_head = lambda h: calls.append(h.shape[0]) or head(h)  # noqa: E731
    none = masked_kl_sum(logits, hidden, counting_head, torch.zeros(1, 2))
    assert none.item() == 0.0 and calls == []  # no selected position: the head never runs


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("chunk_bytes", [1, 4 * 5 * 3])
def test_chunks_of_several_positions_past_the_vocabulary_size(direction: str, chunk_bytes: int) -> None:
    # 64 positions over a 5-word vocabulary, every one selected: chunks of 3 positions (4 bytes x 5 x 3;
    # a 64-position batch allows up to 64 / 16 = 4), or of 1 when the byte budget is below one position
    logits, ref_hidden, head, _ = _case(seed=1, batch=2, seq=32, vocab=5)
    weights = torch.rand(2, 32, generator=torch.Generator().manual_seed(2)) + 0.5
    with torch.no_grad():
        expected = (kl_per_token(logits, head(ref_hidden), direction) * weights).sum()
    got = masked_kl_sum(logits.clone().requires_grad_(True), ref_hidden, head, weights, direction, chunk_bytes)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
