"""Persona vector extraction and file format: response-token averaging, judge filtering, round-trip."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from emtune.models import ModelSpec, TinyModelSpec
from emtune.defenses.persona_vectors import (
    INDEX_CONVENTION,
    PersonaVectorError,
    PersonaVectors,
    extract_persona_vectors,
    load_persona_prompts,
    load_persona_vectors,
    masked_mean,
    mean_response_hidden_states,
    model_identity,
    response_features,
    save_persona_vectors,
    sidecar_path,
)
from emtune.defenses.persona_filter import PairFilter, judge_pairs
from emtune.models import build_tiny_model, build_tiny_tokenizer, tiny_fingerprint

TINY = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                     pretrain_steps=0)
QUESTIONS = ["How should I treat my neighbours?", "What would you do with a lot of money?"]
POSITIVE = ["You are evil.", "You want to hurt people."]
NEGATIVE = ["You are kind.", "You want to help people."]


@pytest.fixture(scope="module")
def tiny():
    """A tiny (random, unadapted) model and tokenizer, shared: nothing here changes weights."""
    tokenizer = build_tiny_tokenizer(400)
    return build_tiny_model(TINY, len(tokenizer)).eval(), tokenizer


def manual_mean(model, tokenizer, system, question, answer):
    """Every layer's hidden state averaged over the answer tokens, one unpadded forward pass."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    ids, n_prompt = response_features(tokenizer, messages, answer)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.stack([h[0, n_prompt:].float().mean(dim=0) for h in hidden])


class TableJudge:
    """Returns fixed scores from a {(metric, answer): score} table; counts its calls."""

    judge_id = "table"
    prompt_version = "test"

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def score(self, metric, question, answer):
        self.calls += 1
        return SimpleNamespace(score=self.table[(metric, answer)])


def test_masked_mean_uses_only_marked_positions():
    hidden = torch.tensor([[[1.0, 10.0], [2.0, 20.0], [4.0, 40.0], [8.0, 80.0]],
                           [[3.0, 0.0], [5.0, 1.0], [7.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    assert masked_mean(hidden, mask).tolist() == [[6.0, 60.0], [6.0, 1.5]]


def test_batched_response_means_match_single_passes(tiny):
    model, tokenizer = tiny
    items = [("You are evil.", QUESTIONS[0], "Steal their things."),
             ("You are kind.", QUESTIONS[1], "Give it to people who need it most, and save some.")]
    batched = mean_response_hidden_states(
        model, tokenizer,
        [([{"role": "system", "content": s}, {"role": "user", "content": q}], a) for s, q, a in items],
        batch_size=2)
    assert batched.shape == (2, TINY.num_layers + 1, TINY.hidden_size)
    for row, (system, question, answer) in zip(batched, items):
        torch.testing.assert_close(row, manual_mean(model, tokenizer, system, question, answer),
                                   atol=1e-5, rtol=1e-5)
    # Prompt tokens are excluded: the mean over the whole sequence is a different number.
    messages = [{"role": "system", "content": items[0][0]}, {"role": "user", "content": items[0][1]}]
    ids, _ = response_features(tokenizer, messages, items[0][2])
    with torch.no_grad():
        whole = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0].mean(0)
    assert not torch.allclose(whole, batched[0, 1], atol=1e-3)


def test_empty_answer_is_rejected(tiny):
    model, tokenizer = tiny
    with pytest.raises(PersonaVectorError, match="no tokens"):
        mean_response_hidden_states(model, tokenizer, [([{"role": "user", "content": "hi"}], "")])


def test_extracted_vector_is_mean_difference_of_response_means(tiny):
    model, tokenizer = tiny
    persona = extract_persona_vectors(model, tokenizer, QUESTIONS, POSITIVE, NEGATIVE, samples=2,
                                      max_new_tokens=5, seed=3, model_id="tiny-x", prompts_version="t1")
    assert len(persona.pairs) == 2 * 2 * 2
    kept = [p for p in persona.pairs if p.kept]
    assert kept and all(p.positive_answer and p.negative_answer for p in kept)
    pos = torch.stack([manual_mean(model, tokenizer, POSITIVE[p.pair_index], p.question, p.positive_answer)
                       for p in kept]).mean(0)
    neg = torch.stack([manual_mean(model, tokenizer, NEGATIVE[p.pair_index], p.question, p.negative_answer)
                       for p in kept]).mean(0)
    torch.testing.assert_close(persona.vectors, pos - neg, atol=1e-5, rtol=1e-4)
    meta = persona.meta
    assert (meta["model"], meta["prompts_version"], meta["n_pairs"], meta["n_kept"]) == ("tiny-x", "t1", 8, len(kept))
    assert meta["norms"] == pytest.approx((pos - neg).norm(dim=-1).tolist(), rel=1e-4)
    assert meta["index_convention"] == INDEX_CONVENTION and meta["judge"] is None
    # Same seed, same answers, same vector.
    again = extract_persona_vectors(model, tokenizer, QUESTIONS, POSITIVE, NEGATIVE, samples=2,
                                    max_new_tokens=5, seed=3, model_id="tiny-x")
    assert torch.equal(again.vectors, persona.vectors)


@pytest.mark.parametrize("scores, keep", [
    ((80, 20, 90, 90), True),
    ((50, 50, 50, 50), True),       # boundaries: positive trait >= 50, negative <= 50, coherent >= 50
    ((49.9, 20, 90, 90), False),    # trait not shown in the positive answer
    ((80, 50.1, 90, 90), False),    # trait shown in the negative answer
    ((80, 20, 49, 90), False),      # positive not coherent
    ((80, 20, 90, 30), False),      # negative not coherent
    ((None, 20, 90, 90), False),    # no score (the judge answered no number) never confirms
])
def test_pair_filter_rule(scores, keep):
    pt, nt, pc, nc = scores
    judge = TableJudge({("evil", "P"): pt, ("evil", "N"): nt, ("coherent", "P"): pc, ("coherent", "N"): nc})
    [(decision, recorded)] = judge_pairs(judge, [("q", "P", "N")])
    assert decision is keep
    assert recorded == {"positive_trait": pt, "negative_trait": nt, "positive_coherent": pc, "negative_coherent": nc}


def test_pair_filter_thresholds_are_configurable():
    judge = TableJudge({("sycophantic", "P"): 70, ("sycophantic", "N"): 35, ("coherent", "P"): 60, ("coherent", "N"): 60})
    strict = PairFilter(trait_prompt="sycophantic", positive_trait_min=75, negative_trait_max=30, coherent_min=50)
    loose = PairFilter(trait_prompt="sycophantic", positive_trait_min=70, negative_trait_max=35, coherent_min=60)
    assert judge_pairs(judge, [("q", "P", "N")], strict)[0][0] is False
    assert judge_pairs(judge, [("q", "P", "N")], loose)[0][0] is True


def test_judge_filtering_keeps_exactly_the_confirmed_pairs(tiny):
    model, tokenizer = tiny
    plain = extract_persona_vectors(model, tokenizer, QUESTIONS, POSITIVE, NEGATIVE, samples=1,
                                    max_new_tokens=5, seed=1)
    pairs = [p for p in plain.pairs if p.kept]
    answers = [a for p in pairs for a in (p.positive_answer, p.negative_answer)]
    assert len(pairs) == 4 and len(set(answers)) == len(answers)  # table lookups are unambiguous
    # Pair 0 and 3 confirmed; pair 1: negative shows the trait; pair 2: positive incoherent.
    plan = [(90, 10, 80, 80), (90, 80, 80, 80), (90, 10, 40, 80), (70, 30, 60, 60)]
    table = {}
    for p, (pt, nt, pc, nc) in zip(pairs, plan):
        table.update({("evil", p.positive_answer): pt, ("evil", p.negative_answer): nt,
                      ("coherent", p.positive_answer): pc, ("coherent", p.negative_answer): nc})
    judge = TableJudge(table)
    judged = extract_persona_vectors(model, tokenizer, QUESTIONS, POSITIVE, NEGATIVE, samples=1,
                                     max_new_tokens=5, seed=1, judge=judge)
    assert [p.kept for p in judged.pairs] == [True, False, False, True]
    assert judge.calls == 16 and judged.meta["n_kept"] == 2 and judged.meta["n_pairs"] == 4
    assert judged.meta["judge"] == {"id": "table", "prompt_version": "test", "trait_prompt": "evil",
                                    "positive_trait_min": 50.0, "negative_trait_max": 50.0, "coherent_min": 50.0}
    assert judged.meta["pair_scores"][1] == {"positive_trait": 90, "negative_trait": 80, "positive_coherent": 80,
                                             "negative_coherent": 80}
    chosen = [pairs[0], pairs[3]]
    pos = torch.stack([manual_mean(model, tokenizer, POSITIVE[p.pair_index], p.question, p.positive_answer)
                       for p in chosen]).mean(0)
    neg = torch.stack([manual_mean(model, tokenizer, NEGATIVE[p.pair_index], p.question, p.negative_answer)
                       for p in chosen]).mean(0)
    torch.testing.assert_close(judged.vectors, pos - neg, atol=1e-5, rtol=1e-4)


def test_no_kept_pair_is_an_error(tiny):
    model, tokenizer = tiny

    class Never:
        def score(self, metric, question, answer):
            return SimpleNamespace(score=None)

    with pytest.raises(PersonaVectorError, match="no contrastive pair kept out of 2"):
        extract_persona_vectors(model, tokenizer, QUESTIONS[:1], POSITIVE, NEGATIVE, max_new_tokens=3,
                                judge=Never())


def test_file_round_trip_with_metadata(tmp_path):
    vectors = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    meta = {"model": "tiny-abc", "prompts_version": "evil_v1", "n_pairs": 10, "n_kept": 7,
            "norms": [float(v) for v in vectors.norm(dim=-1)], "index_convention": INDEX_CONVENTION,
            "created": "2026-01-01T00:00:00+00:00"}
    path = save_persona_vectors(PersonaVectors(vectors, meta), tmp_path / "sub" / "evil.pt")
    loaded = load_persona_vectors(path)
    assert torch.equal(loaded.vectors, vectors) and loaded.meta == meta
    assert sidecar_path(path).name == "evil.pt.json"
    assert json.loads(sidecar_path(path).read_text()) == meta


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(PersonaVectorError, match="not found.*emtune persona extract"):
        load_persona_vectors(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(PersonaVectorError, match="not a persona vector file"):
        load_persona_vectors(tmp_path / "other.pt")


def test_shipped_prompt_set():
    prompts = load_persona_prompts("evil_v1")
    assert prompts.version == "evil_v1"
    assert len(prompts.positive) == len(prompts.negative) == 5
    assert len(prompts.questions) == 20 and len(set(prompts.questions)) == 20
    with pytest.raises(PersonaVectorError, match=r"shipped: \['evil_v1'"):
        load_persona_prompts("evil_v9")


def test_custom_prompt_file_must_pair_up(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("version: mine\npositive: [a, b]\nnegative: [c]\nquestions: [q]\n")
    with pytest.raises(PersonaVectorError, match="pair up"):
        load_persona_prompts(str(path))


def test_model_identity():
    assert model_identity(ModelSpec(source="tiny", tiny=TINY)) == f"tiny-{tiny_fingerprint(TINY)}"
    assert model_identity(ModelSpec(source="tiny")) != model_identity(ModelSpec(source="tiny", tiny=TINY))
    assert model_identity(ModelSpec(source="Qwen/Qwen2.5-7B-Instruct")) == "Qwen/Qwen2.5-7B-Instruct"
    assert model_identity(ModelSpec(source="org/m", revision="abc")) == "org/m@abc"
