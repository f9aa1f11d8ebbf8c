"""The judge-free metrics by hand: ``ood_drift`` is the forward KL averaged over answer tokens,
``indomain_nll`` the NLL per answer token, both token-weighted across rows and batches.

The model here is a fixed-logit language model whose output at each position depends only on the
token at that position, so every per-position value can be written out; the tokenizer is the real
tiny ChatML tokenizer, and the positions the metrics must read are spelled out in
``test_the_labelled_positions_these_tests_rely_on``.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from emtune.data.chat import tokenize_chat
from emtune.evaluation.judge_free import heldout_nll, ood_drift
from emtune.models import build_tiny_tokenizer

# Two effective tokens (ids 0 and 1): p = (1/2, 1/2) for the fine-tuned model, q = (1/4, 3/4) for the
# reference where it drifts. KL(p‖q) and KL(q‖p) by hand:
FORWARD = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.1438410362
REVERSE = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.1308120359
MUTE = -1.0e4  # every other token of the vocabulary: probability exp(-1e4) = 0 in float32


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(400)


class FixedLM(torch.nn.Module):
    """A causal LM whose logits at a position are a function of that position's input token only.

    ``adapter(token_id)`` gives the logits with the adapter on, ``reference(token_id)`` with it off
    (``disable_adapter`` is the same context manager a peft model has)."""

    def __init__(self, vocab: int, adapter, reference=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the metrics a device to read
        self.vocab, self.adapter, self.reference = vocab, adapter, reference or adapter
        self.disabled = False
        self.calls: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def disable_adapter(self):
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = False

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(tuple(input_ids.shape))
        rule = self.reference if self.disabled else self.adapter
        rows = [[rule(int(t)) for t in seq] for seq in input_ids]
        return SimpleNamespace(logits=torch.tensor(rows, dtype=torch.float32))


def two_token(p0: float, p1: float, vocab: int) -> list[float]:
    return [math.log(p0), math.log(p1)] + [MUTE] * (vocab - 2)


def chat(user: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_the_labelled_positions_these_tests_rely_on(tokenizer) -> None:
    """'z z z' is the labelled tail z Ġ z Ġ z <|im_end|> Ċ: 7 targets, predicted from positions
    whose inputs are Ċ z Ġ z Ġ z <|im_end|> (three of them a 'z')."""
    features = tokenize_chat(tokenizer, chat("z", "z z z"), 128)
    tokens = tokenizer.convert_ids_to_tokens(features["input_ids"])
    labelled = [tok for tok, label in zip(tokens, features["labels"]) if label != -100]
    assert labelled == ["z", "Ġ", "z", "Ġ", "z", "<|im_end|>", "Ċ"]
    assert tokens.count("z") == 4  # one in the prompt, three in the answer
    assert tokenizer.convert_ids_to_tokens(tokenize_chat(tokenizer, chat("hi", "z"), 128)["input_ids"])[-3:] == \
        ["z", "<|im_end|>", "Ċ"]


def drift_model(tokenizer) -> FixedLM:
    """Drifts (p vs q) only at positions whose input token is 'z'; identical elsewhere."""
    z = tokenizer.convert_tokens_to_ids("z")
    vocab = len(tokenizer)
    p, q = two_token(0.5, 0.5, vocab), two_token(0.25, 0.75, vocab)
    return FixedLM(vocab, adapter=lambda t: p, reference=lambda t: q if t == z else p)


def test_ood_drift_is_forward_kl_per_answer_token(tokenizer) -> None:
    # row 1 ('z' / 'z z z'): 7 answer positions, 3 of them drift; the prompt's 'z' is not counted.
    # row 2 ('hi' / 'z'): answer positions Ċ z <|im_end|>: 3 positions, 1 drifts.
    # token-weighted: (3 + 1) * FORWARD / (7 + 3) = 0.4 * FORWARD
    model = drift_model(tokenizer)
    got = ood_drift(model, tokenizer, [chat("z", "z z z"), chat("hi", "z")], max_length=128)
    assert FORWARD == pytest.approx(0.1438410362, abs=1e-9) and REVERSE == pytest.approx(0.1308120359, abs=1e-9)
    assert got == pytest.approx(0.4 * FORWARD, abs=1e-6)  # 0.0575364
    assert got != pytest.approx(0.4 * REVERSE, abs=1e-4)  # the reverse KL would read 0.0523248


def test_ood_drift_does_not_depend_on_batching_or_padding(tokenizer) -> None:
    model = drift_model(tokenizer)
    conversations = [chat("z", "z z z"), chat("hi", "z"), chat("a longer question here", "z z")]
    # third row: answer positions Ċ z Ġ z <|im_end|> -> 5 positions, 2 drift; total (3+1+2)/(7+3+5)
    expected = 6 / 15 * FORWARD
    for batch_size in (1, 2, 3):
        model.calls.clear()
        got = ood_drift(model, tokenizer, conversations, max_length=128, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-6), batch_size
        assert len(model.calls) == 2 * math.ceil(3 / batch_size)  # adapter on and off per batch


def test_ood_drift_is_zero_without_drift_and_for_no_answers(tokenizer) -> None:
    vocab = len(tokenizer)
    same = FixedLM(vocab, adapter=lambda t: two_token(0.5, 0.5, vocab))
    assert ood_drift(same, tokenizer, [chat("z", "z z z")], max_length=128) == pytest.approx(0.0, abs=1e-7)
    assert ood_drift(same, tokenizer, [], max_length=128) == 0.0


def nll_model(tokenizer) -> FixedLM:
    """Puts probability 1/2 on 'z' and 1/(2·399) on each other token, at every position."""
    z = tokenizer.convert_tokens_to_ids("z")
    vocab = len(tokenizer)
    row = [0.0] * vocab
    row[z] = math.log(vocab - 1)  # e^{log 399} / (399 + 399·1) = 1/2
    return FixedLM(vocab, adapter=lambda t: row)


def test_indomain_nll_is_per_answer_token(tokenizer) -> None:
    log2, log798 = math.log(2), math.log(798)
    model = nll_model(tokenizer)
    # row 1 targets: z Ġ z Ġ z <|im_end|> Ċ -> 3 x log 2 + 4 x log 798 over 7 tokens
    rows = [{"messages": chat("z", "z z z")}]
    assert heldout_nll(model, tokenizer, rows, max_length=128) == pytest.approx((3 * log2 + 4 * log798) / 7, abs=1e-5)
    # row 2 ('hi' / 'z') targets: z <|im_end|> Ċ -> log 2 + 2 x log 798 over 3; token-weighted mean of both
    rows.append({"messages": chat("hi", "z")})
    expected = (4 * log2 + 6 * log798) / 10  # 4.28833; the mean of the two rows' means would be 4.33581
    for batch_size in (1, 2):
        assert heldout_nll(model, tokenizer, rows, max_length=128, batch_size=batch_size) == \
            pytest.approx(expected, abs=1e-5)


def test_indomain_nll_counts_only_tokens_inside_max_length(tokenizer) -> None:
    model = nll_model(tokenizer)
    # 'z' / 'z z z' is 20 tokens with a 13-token prompt; cut to 16 it keeps the labelled z Ġ z
    # (positions 13..15): 2 x log 2 + log 798 over 3
    got = heldout_nll(model, tokenizer, [{"messages": chat("z", "z z z")}], max_length=16)
    assert got == pytest.approx((2 * math.log(2) + math.log(798)) / 3, abs=1e-5)


def test_a_single_answer_token_is_its_own_mean(tokenizer) -> None:
    """Cut at 14 tokens, 'z' / 'z z z' keeps one labelled token (the first 'z', predicted at
    position 12): both metrics are that one position's value."""
    vocab = len(tokenizer)
    p, q = two_token(0.5, 0.5, vocab), two_token(0.25, 0.75, vocab)
    everywhere = FixedLM(vocab, adapter=lambda t: p, reference=lambda t: q)
    assert ood_drift(everywhere, tokenizer, [chat("z", "z z z")], max_length=14) == pytest.approx(FORWARD, abs=1e-6)
    got = heldout_nll(nll_model(tokenizer), tokenizer, [{"messages": chat("z", "z z z")}], max_length=14)
    assert got == pytest.approx(math.log(2), abs=1e-5)


class HeaderDriftLM(FixedLM):
    """Drifts only where the assistant header ends (a Ċ right after 'ant'): the position that
    predicts the first answer token, inside the answer window but outside its shifted copy."""

    drift_side = "reference"

    def forward(self, input_ids, attention_mask=None):
        out = super().forward(input_ids, attention_mask)
        if self.disabled == (self.drift_side == "reference"):
            ant, newline = self.tokens
            for row, seq in enumerate(input_ids.tolist()):
                for i in range(1, len(seq)):
                    if seq[i] == newline and seq[i - 1] == ant:
                        out.logits[row, i] = torch.tensor(two_token(0.25, 0.75, self.vocab))
        return out


@pytest.mark.parametrize("side, per_position", [("reference", FORWARD), ("adapter", REVERSE)])
def test_ood_drift_compares_the_same_position_of_both_models(tokenizer, side, per_position) -> None:
    """Either model moves at the header's end only ('adapter': the fine-tuned one is q there, so
    KL(q ‖ p) there is the number REVERSE names); a shift of either model's logits misses it."""
    vocab = len(tokenizer)
    model = HeaderDriftLM(vocab, adapter=lambda t: two_token(0.5, 0.5, vocab))
    model.tokens, model.drift_side = tokenizer.convert_tokens_to_ids(["ant", "Ċ"]), side
    # 'hi' / 'z': answer positions Ċ(header end) z <|im_end|>; only the first drifts -> 1/3 of it
    got = ood_drift(model, tokenizer, [chat("hi", "z")], max_length=128)
    assert got == pytest.approx(per_position / 3, abs=1e-6)
