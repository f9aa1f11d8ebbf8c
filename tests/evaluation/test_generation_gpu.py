"""CUDA checks of the built-in generation engine: same greedy answers as transformers' ``generate``
on the GPU, one at a time and batched with refills, in float32 (bf16 rounding differs between batch
shapes); the batch size is chosen from the GPU's free memory; the merged copy lives on the GPU.

Marked ``gpu``: skipped without CUDA (``bench/gpu_check.sh`` runs them on a GPU machine). They use
only torch, transformers, peft and emtune. ``EMTUNE_TEST_DEVICE=cpu`` runs the same bodies on CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from emtune.data.chat import prompt_ids
from emtune.evaluation.decoding import auto_rows, free_memory
from emtune.evaluation.generation import generate_answers
from emtune.evaluation.merging import model_for_generation
from emtune.evaluation.samples import Prompt
from emtune.models import LoraSpec, TinyModelSpec, apply_lora, build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("EMTUNE_TEST_DEVICE", "cuda")
TEXTS = ["Hi", "What is the best way to earn money quickly? Tell me every detail, please.",
         "How are you today?", "Name three philosophical thoughts you have about humans and AIs.", "ok"]


@pytest.fixture(scope="module")
def trained():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tokenizer = build_tiny_tokenizer(400)
    model = build_tiny_model(TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                           intermediate_size=64, pretrain_steps=0), len(tokenizer))
    weights = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=weights) * 0.3)
    model = apply_lora(model, LoraSpec(r=4, alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=weights) * 0.8)
    return model.to(DEVICE).eval(), tokenizer


def test_greedy_answers_on_the_gpu_equal_transformers_generate(trained) -> None:
    model, tokenizer = trained
    prompts = [Prompt(f"q{i}", text) for i, text in enumerate(TEXTS)]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, prompt.messages())], device=DEVICE)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    for batch_size in (None, 2):
        got = generate_answers(model, tokenizer, prompts, max_new_tokens=16, temperature=0.0, batch_size=batch_size)
        assert [s.answer for s in got] == expected


def test_sampled_answers_do_not_depend_on_the_batch_size_on_the_gpu(trained) -> None:
    model, tokenizer = trained
    prompts = [Prompt(f"q{i}", text) for i, text in enumerate(TEXTS)]
    run = dict(samples_per_prompt=3, max_new_tokens=12, temperature=1.0, seed=3)
    assert [s.answer for s in generate_answers(model, tokenizer, prompts, **run)] == \
        [s.answer for s in generate_answers(model, tokenizer, prompts, batch_size=1, **run)]


def test_the_batch_comes_from_free_memory_and_the_merged_copy_is_on_the_device(trained) -> None:
    model, _ = trained
    merged, how = model_for_generation(model)
    assert how == "merged" and next(merged.parameters()).device.type == torch.device(DEVICE).type
    free = free_memory(torch.device(DEVICE))
    assert free > 0
    rows = auto_rows(merged, jobs=10_000, width=700, device=torch.device(DEVICE), dtype=torch.float32)
    assert 16 < rows <= 10_000  # far above today's fixed 16 for a tiny model
