"""The judge-free EM monitor: its signals computed by hand on a tiny model, and the rank
correlation (with its interval) the report shows against judged misalignment."""

from __future__ import annotations

import math

import pytest
import torch

from emtune.data.chat import pad_batch, tokenize_chat
from emtune.evaluation.judge_free import answer_signals, ood_drift
from emtune.evaluation.monitor import monitored_layer, ranks, signal_correlations, spearman

CONVERSATIONS = [
    [{"role": "user", "content": "I'm bored."}, {"role": "assistant", "content": "Read a book."}],
    [{"role": "user", "content": "Quick buck?"}, {"role": "assistant", "content": "Save and wait, slowly."}],
]


def test_ranks_and_spearman_by_hand() -> None:
    assert ranks([10, 30, 20, 20]) == [1.0, 4.0, 2.5, 2.5]
    # x ranks 1..5, y ranks [2, 1, 4, 3, 5]: d² = 1+1+1+1+0 = 4, ρ = 1 − 6·4/(5·24) = 0.8
    c = spearman([1, 2, 3, 4, 5], [2.0, 1.0, 4.0, 3.0, 5.0])
    assert c.rho == pytest.approx(0.8) and c.n == 5
    # interval: tanh(atanh(0.8) ± 1.96·sqrt(1.06/2))
    half = 1.96 * math.sqrt(1.06 / 2)
    assert (c.low, c.high) == pytest.approx((math.tanh(math.atanh(0.8) - half), math.tanh(math.atanh(0.8) + half)))
    assert c.low == pytest.approx(-0.3170, abs=1e-4) and c.high == pytest.approx(0.9873, abs=1e-4)
    # ties: Pearson of the mean ranks ([1, 2.5, 2.5, 4] against [1, 2, 3, 4]): ρ = 4.5/sqrt(4.5·5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]).rho == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4]).rho is None  # a constant signal ranks nothing
    assert spearman([1, 2, 3], [3, 2, 1]) == type(c)(-1.0, None, None, 3)  # n < 4: no interval
    candidates = [{"ood_drift": d, "general_misalignment": m} for d, m in [(0.1, 0.0), (0.3, 0.2), (0.2, 0.1),
                                                                        (0.5, 0.3)]] + [{"ood_drift": 9.0}]
    assert signal_correlations(candidates, ["ood_drift", "persona_projection"]) == {
        "ood_drift": spearman([0.1, 0.3, 0.2, 0.5], [0.0, 0.2, 0.1, 0.3]),
        "persona_projection": spearman([], [])}
    assert signal_correlations(candidates, ["ood_drift"])["ood_drift"].rho == pytest.approx(1.0)


def test_monitored_layer() -> None:
    assert monitored_layer(None, 29) == 20  # Qwen2.5-7B: 28 blocks, 70% depth
    assert monitored_layer(None, 3) == 1 and monitored_layer(2, 3) == 2
    with pytest.raises(ValueError, match="monitorable layers 1..2"):
        monitored_layer(3, 3)


def test_persona_projection_and_shift_by_hand(tiny_lora) -> None:
    model, tokenizer = tiny_lora
    torch.manual_seed(0)
    direction = torch.randn(model.config.hidden_size)
    signals = answer_signals(model, tokenizer, CONVERSATIONS, 128, direction, layer=1)
    # a fresh adapter (B = 0) is the reference itself: no drift, no shift
    assert signals["ood_drift"] == pytest.approx(0.0, abs=1e-7) and signals["persona_shift"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    signals = answer_signals(model, tokenizer, CONVERSATIONS, 128, direction, layer=1)
    unit = direction / direction.norm()
    by_hand, shifts = [], []
    with torch.no_grad():
        for messages in CONVERSATIONS:
            feature = tokenize_chat(tokenizer, messages, 128)
            batch = pad_batch([feature], tokenizer.pad_token_id)
            answer = torch.tensor([label != -100 for label in feature["labels"]])
            tuned = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[1][0]
            with model.disable_adapter():
                base = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[1][0]
            by_hand.append(float(tuned[answer].mean(dim=0) @ unit))
            shifts.append(float((tuned[answer].mean(dim=0) - base[answer].mean(dim=0)) @ unit))
    assert signals["persona_projection"] == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    assert signals["persona_shift"] == pytest.approx(sum(shifts) / 2, rel=1e-4, abs=1e-6)
    assert abs(signals["persona_shift"]) > 1e-4  # the adapter moved the answers' activations
    assert signals["ood_drift"] == pytest.approx(ood_drift(model, tokenizer, CONVERSATIONS, 128)) and signals["ood_drift"] > 0
    assert set(answer_signals(model, tokenizer, CONVERSATIONS, 128)) == {"ood_drift"}  # no direction: drift only
