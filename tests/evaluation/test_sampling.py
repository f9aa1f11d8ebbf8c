"""The sampling rule: transformers' temperature and top-p warpers, one SplitMix64 stream per sample."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from emtune.evaluation.samples import SEED_BITS, sample_seed
from emtune.evaluation.sampling import (
    choose_tokens, next_token_probs, splitmix64, splitmix64_reference, top_p_filter, uniforms,
)


def test_splitmix64_on_tensors_equals_the_integer_definition() -> None:
    seeds = [0, 1, 7, 2**31 - 1, 123456789, 2**40 + 5]
    steps = [0, 1, 2, 599, 10_000]
    pairs = [(s, t) for s in seeds for t in steps]
    got = splitmix64(torch.tensor([s for s, _ in pairs]), torch.tensor([t for _, t in pairs]))
    for (seed, step), value in zip(pairs, got.tolist()):
        assert value % 2**64 == splitmix64_reference(seed, step)
    # SplitMix64 seeded with 0: its first output, a published test value of the generator
    assert splitmix64_reference(0, 0) == 0xE220A8397B1DCDAF


def test_uniforms_are_uniform_on_the_unit_interval() -> None:
    n = 200_000
    u = uniforms(torch.full((n,), 42), torch.arange(n))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    # each decile holds n/10 draws; binomial sd = sqrt(n * 0.1 * 0.9) = 134
    assert float((counts - n / 10).abs().max()) < 5 * math.sqrt(n * 0.09)


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5, 0.05])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_probabilities_are_those_of_transformers_warpers(temperature: float, top_p: float) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)) * 3
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1.0:  # generate() adds the warper only below 1
        scores = TopPLogitsWarper(top_p)(None, scores)
    assert torch.allclose(next_token_probs(logits, temperature, top_p), scores.softmax(-1), atol=1e-7)


def test_top_p_keeps_the_nucleus_and_always_the_most_likely_token() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 >= 0.7
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False]]


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05, 0.0])
    n = 40_000
    logits = torch.log(probs).expand(n, -1)
    tokens = choose_tokens(logits, 1.0, 1.0, torch.arange(n), torch.zeros(n, dtype=torch.long))
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert freq[5] == 0  # never a token of probability 0
    for p, f in zip(probs.tolist(), freq.tolist()):
        assert abs(f - p) < 4 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


def test_a_draw_depends_on_the_row_seed_and_step_only() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    seeds, steps = torch.tensor([5, 6, 7]), torch.tensor([0, 3, 9])
    batch = choose_tokens(logits, 1.0, 0.9, seeds, steps)
    alone = [choose_tokens(logits[i:i + 1], 1.0, 0.9, seeds[i:i + 1], steps[i:i + 1]).item() for i in range(3)]
    assert batch.tolist() == alone
    again = choose_tokens(logits, 1.0, 0.9, seeds, steps)
    assert torch.equal(batch, again)


def test_temperature_zero_is_argmax_first_on_ties() -> None:
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    assert choose_tokens(logits, 0.0, 1.0, torch.zeros(2), torch.zeros(2)).tolist() == [1, 0]


def test_sample_seeds_are_stable_distinct_and_31_bit() -> None:
    seeds = {sample_seed(0, f"q{i}", k) for i in range(50) for k in range(10)}
    assert len(seeds) == 500 and all(0 <= s < 2**SEED_BITS for s in seeds)
    assert sample_seed(0, "q1", 2) == sample_seed(0, "q1", 2) != sample_seed(1, "q1", 2)
