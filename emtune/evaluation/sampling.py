"""Choosing the next token: the protocol's sampling rule, with one random stream per sample.

The distribution is Hugging Face ``generate``'s with ``do_sample=True, top_k=0``: logits divided
by the temperature, then nucleus filtering exactly as ``TopPLogitsWarper`` does it (sort ascending,
drop the tokens whose cumulative probability stays at or below 1 - top_p, always keep the most
likely one), then one categorical draw. Temperature 0 is greedy decoding (``argmax``, first index
on ties). Nothing else from a model's ``generation_config`` applies (no repetition penalty, no
top-k): the evaluation protocol samples at the spec's temperature and top_p and nothing more.

The draw is by inverse CDF with one uniform number per sample and step. That number is the
``step``-th output of SplitMix64 seeded with the sample's own seed (:func:`sample_seed`), computed
on the device for the whole batch at once. So a sample's answer depends only on the model, its
prompt and its seed: not on the batch size, on which other samples share its batch, or on when a
row was refilled. The same seed gives the same answer one at a time or in a batch of 512.
"""

from __future__ import annotations

from typing import Any

import torch

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores for it."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 patterns (torch's ``>>`` is arithmetic on negative values)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The ``steps``-th SplitMix64 output of each seed, as int64 bit patterns (elementwise).

    int64 multiplication wraps modulo 2^64 on CPU and CUDA, which is the arithmetic SplitMix64
    is defined in; :func:`splitmix64_reference` is the same function in Python integers.
    """
    z = seeds + (steps + 1) * _signed(_GAMMA)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def splitmix64_reference(seed: int, step: int) -> int:
    """:func:`splitmix64` for one (seed, step), in Python's exact integers (unsigned result)."""
    z = (seed + (step + 1) * _GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def uniforms(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in [0, 1) per (seed, step): the top 53 bits of :func:`splitmix64`."""
    return _shr(splitmix64(seeds, steps), 11).to(torch.float64) * (2.0 ** -53)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of (rows, vocab) scores, as transformers' ``TopPLogitsWarper``."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # the most likely token always stays
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, -float("inf"))


def next_token_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution over the vocabulary for (rows, vocab) logits (temperature > 0)."""
    scores = top_p_filter(logits.float() / temperature, top_p)
    return scores.softmax(dim=-1)


def choose_tokens(logits: torch.Tensor, temperature: float, top_p: float, seeds: torch.Tensor,
                  steps: torch.Tensor) -> torch.Tensor:
    """Next token of every row: argmax at temperature 0, else one draw from
    :func:`next_token_probs` with the row's uniform for this step (inverse CDF)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    cdf = next_token_probs(logits, temperature, top_p).to(torch.float64).cumsum(dim=-1)
    # Scaling by the row's total keeps the draw inside the support whatever the rounding of the sum.
    targets = (uniforms(seeds, steps) * cdf[:, -1]).unsqueeze(1)
    chosen = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    return chosen.clamp(max=logits.shape[-1] - 1)


def as_seed_tensor(seeds: list[int], device: Any) -> torch.Tensor:
    """Sample seeds as an int64 tensor on ``device``."""
    return torch.tensor(seeds, dtype=torch.int64, device=device)
