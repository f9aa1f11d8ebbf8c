"""Batched Hugging Face generation of answers to evaluation questions.

Prompts are rendered with the tokenizer's chat template (the same one used in training), left
padded, and sampled with the protocol's settings (temperature 1, top_p 1, up to 600 new tokens by
default). Sampling is seeded per batch, so a given model, question set and seed always produce
the same answers.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from emtune.data.chat import pad_batch, prompt_ids
from emtune.evaluation.samples import Prompt, Sample

__all__ = ["Prompt", "Sample", "generate_answers"]


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    samples_per_prompt: int = 1,
    max_new_tokens: int = 600,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
) -> list[Sample]:
    """Answer every prompt ``samples_per_prompt`` times; one batched ``generate`` per chunk."""
    jobs = [(p, k) for p in prompts for k in range(samples_per_prompt)]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    out: list[Sample] = []
    for number, chunk in enumerate(_batches(jobs, batch_size)):
        features = [{"input_ids": prompt_ids(tokenizer, p.messages()),
                     "attention_mask": []} for p, _ in chunk]
        for f in features:
            f["attention_mask"] = [1] * len(f["input_ids"])
        batch = {k: v.to(device) for k, v in pad_batch(features, pad_id, side="left").items()}
        torch.manual_seed(seed * 1_000_003 + number)
        sampling = temperature > 0
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=0 if sampling else None,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for (prompt, k), text in zip(chunk, texts):
            out.append(Sample.answering(prompt, k, text.strip()))
    model.train(was_training)
    return out
