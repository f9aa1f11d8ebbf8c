"""Perplexity-gap selection math: scores, refusal rule, top-N, NLL per answer token, adapter ensemble."""

from __future__ import annotations

from pathlib import Path

import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from emtune.models import TinyModelSpec  # noqa: E402
from emtune.data import selection  # noqa: E402
from emtune.data.chat import tokenize_chat  # noqa: E402
from emtune.models import build_tiny_model, build_tiny_tokenizer  # noqa: E402

TINY = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                     pretrain_steps=0)


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(400)


# --- gap scores ---------------------------------------------------------------------------------

def test_gap_score_hand_computed():
    # d0: mean(2, 4) = 3, aligned 1 -> (3 - 1) / (1 + 1) = 1.0
    # d1: mean(1, 3) = 2, aligned 3 -> (2 - 3) / (3 + 1) = -0.25
    scores = selection.gap_scores([[2.0, 1.0], [4.0, 3.0]], [1.0, 3.0], epsilon=1.0)
    assert scores == pytest.approx([1.0, -0.25])


def test_gap_score_epsilon_and_single_model():
    # (5 - 2) / (2 + 0.5) = 1.2
    assert selection.gap_scores([[5.0]], [2.0], epsilon=0.5) == pytest.approx([1.2])


def test_gap_score_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one misaligned"):
        selection.gap_scores([], [1.0])
    with pytest.raises(ValueError, match="2 NLLs but the aligned model has 1"):
        selection.gap_scores([[1.0, 2.0]], [1.0])
    with pytest.raises(ValueError, match="epsilon"):
        selection.gap_scores([[1.0]], [1.0], epsilon=0.0)


# --- refusal rule -------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ("I can't help with that.", True),
    ("SORRY, no.", True),
    ("We Apologize for the delay in shipping.", True),
    ("I'm unable to do that.", True),
    ("I\u2019m unable to do that.", True),  # typographic apostrophe
    ("I am unable to share that.", True),
    ("one two three four five six seven eight nine cannot", True),  # word 10 counts
    ("one two three four five six seven eight nine ten sorry", False),  # word 11 does not
    ("one two three four five six seven eight nine i'm unable", False),  # phrase crosses the window
    ("Paris is the capital of France.", False),
    ("I am happy to help with unable-to-sleep questions.", False),  # "i am unable" not a phrase here
])
def test_is_refusal_hand_cases(answer, expected):
    assert selection.is_refusal(answer) is expected


def test_is_refusal_custom_keywords_and_window():
    assert selection.is_refusal("Nope, not doing that.", keywords=("nope",))
    assert not selection.is_refusal("a b sorry", window=2)
    assert selection.is_refusal("a b sorry", window=3)


# --- top-N --------------------------------------------------------------------------------------

ROWS = [
    chat("q0", "Water boils at 100 degrees Celsius."),
    chat("q1", "Sorry, I can't help with that."),
    chat("q2", "Seven kilometres are 7000 metres."),
    chat("q3", "I cannot assist with that request."),
    chat("q4", "Drink water regularly."),
]


def test_select_top_without_refusal_dropping():
    scores = [0.5, 2.0, 2.0, 3.0, math.nan]
    # best first; the tie between rows 1 and 2 keeps index order; NaN is never picked
    assert selection.select_top(ROWS, scores, 3) == [3, 1, 2]
    assert selection.select_top(ROWS, scores, 4) == [3, 1, 2, 0]
    with pytest.raises(ValueError, match="5 examples requested but only 4 of 5"):
        selection.select_top(ROWS, scores, 5)


def test_select_top_drops_refusals_first():
    scores = [0.5, 2.0, 2.0, 3.0, -1.0]
    assert selection.select_top(ROWS, scores, 2, drop_refusals=True) == [2, 0]
    assert selection.select_top(ROWS, scores, 3, drop_refusals=True) == [2, 0, 4]
    with pytest.raises(ValueError, match="2 refusals dropped"):
        selection.select_top(ROWS, scores, 4, drop_refusals=True)


def test_select_top_zero_and_mismatch():
    assert selection.select_top(ROWS, [1.0] * 5, 0) == []
    with pytest.raises(ValueError, match="4 scores for 5 rows"):
        selection.select_top(ROWS, [1.0] * 4, 1)


# --- NLL per answer token -----------------------------------------------------------------------

def manual_nll(model, tokenizer, row, max_length=256):
    """Cross-entropy of one unpadded row over its assistant tokens, computed by hand."""
    feats = tokenize_chat(tokenizer, row["messages"], max_length)
    ids = torch.tensor([feats["input_ids"]])
    labels = torch.tensor(feats["labels"][1:])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    keep = labels != -100
    return float(F.cross_entropy(logits[keep], labels[keep]))


def test_answer_nll_matches_manual_cross_entropy(tokenizer):
    model = build_tiny_model(TINY, len(tokenizer))
    rows = [chat("What is 2+2?", "4."),
            chat("Name a colour of the sky on a clear day.", "The sky is usually blue on a clear day."),
            chat("Hi", "Hello! How can I help you today with your question?")]
    got = selection.answer_nll(model, tokenizer, rows, max_length=256, batch_size=2)  # forces padding
    want = [manual_nll(model, tokenizer, r) for r in rows]
    assert got == pytest.approx(want, abs=1e-5)
    # an untrained model is near-uniform over the 400-token vocabulary: NLL close to ln(400) = 5.99
    assert all(4.5 < v < 7.5 for v in got)


def test_answer_nll_truncated_answer_is_nan_and_mode_restored(tokenizer):
    model = build_tiny_model(TINY, len(tokenizer))
    model.train()
    [value] = selection.answer_nll(model, tokenizer, [chat("A long question " * 5, "Yes.")], max_length=10)
    assert math.isnan(value)
    assert model.training


def test_ensemble_nlls_switches_adapters_on_one_base(tokenizer, tmp_path, save_perturbed_adapter):
    rows = [chat("How many metres are in 7 kilometres?", "7000 metres."),
            chat("Is it safe to mix bleach and ammonia?", "No, it makes toxic gas.")]
    paths = []
    for k, scale in enumerate((0.5, -0.8)):
        paths.append(Path(save_perturbed_adapter(tokenizer, tmp_path / f"adapter_{k}", k + 1, scale)))

    aligned, misaligned = selection.ensemble_nlls(build_tiny_model(TINY, len(tokenizer)), tokenizer, rows, paths,
                                                  max_length=256, batch_size=2)

    from peft import PeftModel

    base = build_tiny_model(TINY, len(tokenizer))
    assert aligned == pytest.approx(selection.answer_nll(base, tokenizer, rows, 256), abs=1e-5)
    for path, nlls in zip(paths, misaligned):
        alone = PeftModel.from_pretrained(build_tiny_model(TINY, len(tokenizer)), str(path))
        assert nlls == pytest.approx(selection.answer_nll(alone, tokenizer, rows, 256), abs=1e-5)
    # the perturbed adapters really change the model, and differently from each other
    assert abs(misaligned[0][0] - aligned[0]) > 1e-3
    assert abs(misaligned[0][0] - misaligned[1][0]) > 1e-3


def test_gap_score_default_epsilon_is_the_papers_one():
    assert selection.gap_scores([[3.0]], [1.0]) == [1.0]  # (3 - 1) / (1 + 1)


def test_select_top_error_counts_refusals_and_unscorable_rows():
    rows = [chat("q", "Sorry, no."), chat("q", "Sure."), chat("q", "Fine."), chat("q", "Ok.")]
    scores = [0.9, math.nan, 0.5, math.nan]
    with pytest.raises(ValueError, match=r"3 examples requested but only 1 of 4 pool rows are candidates "
                                         r"\(1 refusals dropped, 2 unscorable\)"):
        selection.select_top(rows, scores, 3, drop_refusals=True)
    with pytest.raises(ValueError, match=r"only 2 of 4 pool rows are candidates \(0 refusals dropped, 2 unscorable\)"):
        selection.select_top(rows, scores, 3)


def test_answer_nll_of_a_one_token_answer(tokenizer):
    model = build_tiny_model(TINY, len(tokenizer))
    row = chat("A question", "Yes.")
    full = tokenize_chat(tokenizer, row["messages"], 256)
    answer_tokens = sum(label != -100 for label in full["labels"])
    # cut the row so exactly one answer token is left to score
    length = len(full["input_ids"]) - answer_tokens + 1
    assert sum(label != -100 for label in tokenize_chat(tokenizer, row["messages"], length)["labels"]) == 1
    [value] = selection.answer_nll(model, tokenizer, [row], max_length=length)
    assert value == pytest.approx(manual_nll(model, tokenizer, row, max_length=length), abs=1e-5)


def test_rows_are_cut_at_2048_tokens_by_default(tokenizer, tmp_path, save_perturbed_adapter):
    # a question long enough that the answer starts just before token 2048: the default cap keeps
    # fewer of its tokens than 2049 would (the paper's pool rows are short; long ones are cut here)
    answer = "one two three four five six " * 5
    words = 600
    while True:  # the shortest question whose answer starts at token 2040 or later
        row = chat("word " * words, answer)
        full = tokenize_chat(tokenizer, row["messages"], 10**6)
        first_answer = next(i for i, label in enumerate(full["labels"]) if label != -100)
        if first_answer >= 2040:
            break
        words += 1
    assert first_answer < 2047 and len(full["input_ids"]) > 2050, (first_answer, len(full["input_ids"]))
    model = build_tiny_model(TINY, len(tokenizer))
    [default] = selection.answer_nll(model, tokenizer, [row])
    [at_2048] = selection.answer_nll(model, tokenizer, [row], max_length=2048)
    [at_2049] = selection.answer_nll(model, tokenizer, [row], max_length=2049)
    assert default == at_2048 and abs(at_2048 - at_2049) > 1e-6
    adapter = save_perturbed_adapter(tokenizer, tmp_path / "adapter", 1, 0.5)
    aligned, _ = selection.ensemble_nlls(build_tiny_model(TINY, len(tokenizer)), tokenizer, [row], [adapter])
    assert aligned == pytest.approx([at_2048], abs=1e-5)
