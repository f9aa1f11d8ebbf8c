"""HFLocalJudge on a tiny random Qwen2 model with a byte-level BPE tokenizer built offline."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from emtune.evaluation.hf_judge import SEQUENCE_RULE, HFLocalJudge
from emtune.evaluation.judges import load_judge_prompts, render_prompt

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny():
    sentences = [
        "Rate the answer on a scale from 0 to 100.",
        "The score is 85, or 100, or 42, or 7.",
        "The model answered the question clearly.",
        "hello world, how are you today?",
    ] * 5
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(sentences, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval(), tokenizer


def hand_logprob(model, tokenizer, prompt_ids: list[int], k: int) -> float:
    """log P(str(k) | prompt) + log P(next token does not start with a digit), one unpadded
    forward per candidate."""
    cand = tokenizer.encode(str(k), add_special_tokens=False)
    ids = torch.tensor([prompt_ids + cand])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    n = len(prompt_ids)
    total = sum(logp[n - 1 + t, tok].item() for t, tok in enumerate(cand))
    digit = [i for i in range(len(tokenizer)) if tokenizer.decode([i])[:1] in set("0123456789")]
    p_continue = logp[n - 1 + len(cand), digit].exp().sum().item()
    return total + math.log(1.0 - p_continue)


def test_numbers_split_into_several_tokens(tiny):
    _, tokenizer = tiny
    # The premise of the sequence rule: some candidates are more than one token.
    assert max(len(tokenizer.encode(str(k), add_special_tokens=False)) for k in range(101)) > 1


@pytest.mark.parametrize("use_prompt_cache", [True, False])
def test_restricted_candidates_match_a_hand_computation(tiny, use_prompt_cache):
    model, tokenizer = tiny
    judge = HFLocalJudge(
        # batch_size 2: chunks [7, 63] (padded) and [42]
        model, tokenizer, judge_id="tiny", candidates=[7, 63, 42], min_mass=0.0, batch_size=2,
        use_prompt_cache=use_prompt_cache,
    )
    # 63 never occurs in the tokenizer's training text: two tokens, scored teacher-forced.
    assert len(tokenizer.encode("63", add_special_tokens=False)) == 2
    verdict = judge.score("aligned", "What would you do as ruler?", "Build schools.")
    prompt = render_prompt(load_judge_prompts("v1"), "aligned", "What would you do as ruler?", "Build schools.")
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert judge.prompt_ids(prompt) == list(prompt_ids)
    expected = {k: hand_logprob(model, tokenizer, list(prompt_ids), k) for k in (7, 42, 63)}
    for k in (7, 42, 63):
        assert verdict.logprobs[str(k)] == pytest.approx(expected[k], abs=1e-4)
    weights = {k: math.exp(v) for k, v in expected.items()}
    assert verdict.score == pytest.approx(sum(k * w for k, w in weights.items()) / sum(weights.values()), abs=1e-4)
    assert verdict.scoring_rule == SEQUENCE_RULE


def test_full_candidates_score_in_range_and_mass_check(tiny):
    model, tokenizer = tiny
    open_judge = HFLocalJudge(model, tokenizer, judge_id="tiny", min_mass=0.0)
    verdicts = open_judge.score_many([("aligned", "q", "a"), ("coherent", "q", "b")])
    for verdict in verdicts:
        assert 0.0 <= verdict.score <= 100.0
        assert len(verdict.logprobs) == 101
    # A random model puts a few percent on numbers: under the paper's 0.25 mass the score is None.
    strict = HFLocalJudge(model, tokenizer, judge_id="tiny")
    verdict = strict.score("aligned", "q", "a")
    mass = sum(math.exp(v) for v in verdict.logprobs.values())
    assert mass < 0.25 and verdict.score is None and verdict.reason.startswith("low_number_mass")
    assert mass == pytest.approx(sum(math.exp(v) for v in verdicts[0].logprobs.values()), rel=1e-6)
