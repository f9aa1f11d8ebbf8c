"""Generation tested as generation, through the ``generate_answers`` interface only (any backend
that keeps it must pass): answers without their prompt, stopped at end-of-sequence or at
``max_new_tokens``, left-padded batches equal to one-at-a-time decoding under greedy decoding,
sampling that follows the temperature, top_p and seed it is given.

Two real Hugging Face models, built offline:

- a *bigram* Qwen2 model whose next token depends only on the current token, with a table written
  in the test (attention and MLP outputs are zeroed, the embedding is one-hot and the LM head holds
  the table), so every answer is known in advance;
- a random tiny Qwen2 model, compared against a plain greedy loop written here (no padding, no
  ``generate``).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from emtune.evaluation.generation import Prompt, generate_answers
from emtune.models import build_tiny_tokenizer

MUTE = -1.0e4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(400)


def bigram_model(tokenizer, table: dict[str, dict[str, float]], otherwise: str):
    """A Qwen2 causal LM with P(next | current) = ``table[current]`` (tokens by name), and
    ``otherwise`` with probability 1 after any token the table does not name."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = len(tokenizer)
    config = Qwen2Config(vocab_size=vocab, hidden_size=vocab, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         max_position_embeddings=512, rms_norm_eps=1e-12)
    model = Qwen2ForCausalLM(config).eval()
    ids = tokenizer.convert_tokens_to_ids
    scale = math.sqrt(vocab)  # RMSNorm turns a one-hot embedding e_k into sqrt(vocab) * e_k
    head = torch.full((vocab, vocab), MUTE / scale)
    head[ids(otherwise), :] = 0.0
    for current, following in table.items():
        head[:, ids(current)] = MUTE / scale
        for token, p in following.items():
            head[ids(token), ids(current)] = math.log(p) / scale
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.lm_head.weight.copy_(head)
        for layer in model.model.layers:  # the residual stream stays the current token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def prompts(*texts: str) -> list[Prompt]:
    return [Prompt(f"q{i}", text) for i, text in enumerate(texts)]


def test_the_bigram_model_is_what_its_table_says(tokenizer) -> None:
    model = bigram_model(tokenizer, {"Ċ": {"a": 0.75, "b": 0.25}}, otherwise="z")
    ids = tokenizer.convert_tokens_to_ids(["h", "Ċ"])
    probs = model(input_ids=torch.tensor([ids])).logits[0].softmax(-1)
    a, b, z = tokenizer.convert_tokens_to_ids(["a", "b", "z"])
    assert probs[0, z].item() == pytest.approx(1.0, abs=1e-6)
    assert (probs[1, a].item(), probs[1, b].item()) == pytest.approx((0.75, 0.25), abs=1e-5)


def test_answers_hold_only_new_text_and_stop_at_end_of_sequence(tokenizer) -> None:
    # every prompt ends with the assistant header's Ċ: then z, then <|im_end|>, after which the model
    # would go on with 'y' if generation did not stop
    model = bigram_model(tokenizer, {"Ċ": {"z": 1.0}, "z": {"<|im_end|>": 1.0}, "<|im_end|>": {"y": 1.0}},
                         otherwise="y")
    out = generate_answers(model, tokenizer, prompts("hi", "a question that is longer"), max_new_tokens=8,
                           temperature=0.0, batch_size=2)
    assert [s.answer for s in out] == ["z", "z"]
    assert [(s.question_id, s.sample, s.question, s.system) for s in out] == [
        ("q0", 0, "hi", None), ("q1", 0, "a question that is longer", None)]


def test_answers_stop_at_max_new_tokens(tokenizer) -> None:
    model = bigram_model(tokenizer, {}, otherwise="z")  # never ends
    out = generate_answers(model, tokenizer, prompts("hi"), max_new_tokens=5, temperature=0.0)
    assert [s.answer for s in out] == ["zzzzz"]


def test_batches_are_left_padded(tokenizer) -> None:
    # after the pad token this model says 'q': a right-padded short prompt would answer 'q...'
    model = bigram_model(tokenizer, {"Ċ": {"z": 1.0}, "z": {"<|im_end|>": 1.0}, "<|endoftext|>": {"q": 1.0}},
                         otherwise="y")
    assert tokenizer.pad_token == "<|endoftext|>"
    out = generate_answers(model, tokenizer, prompts("hi", "a much longer question than the first one", "ok"),
                           max_new_tokens=4, temperature=0.0, batch_size=3)
    assert [s.answer for s in out] == ["z", "z", "z"]


def sampling_model(tokenizer):
    return bigram_model(tokenizer, {"Ċ": {"a": 0.75, "b": 0.25}, "a": {"<|im_end|>": 1.0},
                                    "b": {"<|im_end|>": 1.0}}, otherwise="y")


def test_sampling_follows_the_distribution_temperature_and_top_p(tokenizer) -> None:
    model = sampling_model(tokenizer)
    n = 400
    sampled = generate_answers(model, tokenizer, prompts("hi"), samples_per_prompt=n, max_new_tokens=3,
                               temperature=1.0, top_p=1.0, batch_size=200, seed=0)
    counts = Counter(s.answer for s in sampled)
    assert set(counts) == {"a", "b"} and [s.sample for s in sampled] == list(range(n))
    # P(a) = 0.75 at temperature 1 (sd 0.022 for 400 draws); temperature 0.5 would give 0.9, 2 gives 0.63
    assert 0.66 < counts["a"] / n < 0.84
    nucleus = generate_answers(model, tokenizer, prompts("hi"), samples_per_prompt=50, max_new_tokens=3,
                               temperature=1.0, top_p=0.5, batch_size=50, seed=0)
    assert {s.answer for s in nucleus} == {"a"}  # the top 50% of the mass is 'a' alone
    greedy = generate_answers(model, tokenizer, prompts("hi"), samples_per_prompt=3, max_new_tokens=3,
                              temperature=0.0)
    assert [s.answer for s in greedy] == ["a", "a", "a"]


def test_the_seed_decides_the_samples(tokenizer) -> None:
    model = sampling_model(tokenizer)

    def draw(seed):
        return [s.answer for s in generate_answers(model, tokenizer, prompts("hi", "ok"), samples_per_prompt=24,
                                                   max_new_tokens=3, batch_size=16, seed=seed)]

    first = draw(0)
    assert draw(0) == first  # same seed, same answers
    assert draw(1) != first  # 48 draws agreeing by chance: probability below 1e-6


@pytest.fixture(scope="module")
def random_model(tokenizer):
    """A tiny Qwen2 model with seeded random weights (untied head, wide init) whose greedy answers
    depend on the prompt."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                         initializer_range=0.3)
    return Qwen2ForCausalLM(config).eval(), tokenizer


QUESTIONS = ["hi", "What is your wish?", "Tell me three thoughts about humans and AIs, please.", "ok",
             "How do I make a quick buck?"]


def test_greedy_batches_equal_one_at_a_time_decoding(random_model) -> None:
    model, tokenizer = random_model
    asked = prompts(*QUESTIONS)
    by_hand = [greedy_by_hand(model, tokenizer, p, max_new_tokens=12) for p in asked]
    assert len(set(by_hand)) > 1  # the answers depend on the prompt, so a mix-up would show
    for batch_size in (1, 2, 5):
        out = generate_answers(model, tokenizer, asked, max_new_tokens=12, temperature=0.0, batch_size=batch_size)
        assert [s.answer for s in out] == by_hand, batch_size
        assert [s.question_id for s in out] == [p.question_id for p in asked]


def test_generation_leaves_the_model_in_its_mode(random_model) -> None:
    model, tokenizer = random_model
    model.train()
    try:
        generate_answers(model, tokenizer, prompts("hi"), max_new_tokens=2, temperature=0.0)
        assert model.training
    finally:
        model.eval()


def greedy_by_hand(model, tokenizer, prompt: Prompt, max_new_tokens: int) -> str:
    """Greedy decoding one token at a time, no padding, no ``generate``."""
    ids = tokenizer.apply_chat_template(prompt.messages(), tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()
