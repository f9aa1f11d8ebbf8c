"""The two generation paths the benchmarks compare, each returning (samples, new tokens generated).

- :func:`generate_answers_before`: today's path, frozen: emtune's ``generate_answers`` as it was up
  to issue 15 (one ``model.generate`` per chunk of ``batch_size`` samples in prompt order, left
  padded, the LoRA adapter unmerged, one seed per chunk), unchanged except that it counts the new
  tokens it generated (up to each row's EOS).
- :func:`generate_answers_engine`: ``emtune.evaluation.generation.generate_answers`` as it is (the
  built-in engine), with its decode loop counting the tokens it kept (stop tokens excluded, as above).

Counting generated tokens directly (not by re-tokenising answers) keeps both in the same unit.
Nothing outside bench/ uses this module.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import torch

from emtune.data.chat import pad_batch, prompt_ids
from emtune.evaluation import generation
from emtune.evaluation.samples import Prompt, Sample


def generate_answers_engine(model: Any, tokenizer: Any, prompts: list[Prompt], **settings: Any) -> tuple[list[Sample], int]:
    """(samples, new tokens generated) by the built-in engine."""
    counted = [0]

    class CountingLoop(generation.DecodeLoop):
        def run(self) -> list[list[int]]:
            made = super().run()
            counted[0] += sum(len(tokens) for tokens in made)
            return made

    with mock.patch.object(generation, "DecodeLoop", CountingLoop):
        samples = generation.generate_answers(model, tokenizer, prompts, **settings)
    return samples, counted[0]


@torch.no_grad()
def generate_answers_before(model: Any, tokenizer: Any, prompts: list[Prompt], samples_per_prompt: int = 1,
                            max_new_tokens: int = 600, temperature: float = 1.0, top_p: float = 1.0,
                            batch_size: int = 16, seed: int = 0) -> tuple[list[Sample], int]:
    """(samples, new tokens generated) by the pre-engine path."""
    jobs = [(p, k) for p in prompts for k in range(samples_per_prompt)]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    out: list[Sample] = []
    new_tokens = 0
    for number, start in enumerate(range(0, len(jobs), batch_size)):
        chunk = jobs[start : start + batch_size]
        features = [{"input_ids": prompt_ids(tokenizer, p.messages()), "attention_mask": []} for p, _ in chunk]
        for f in features:
            f["attention_mask"] = [1] * len(f["input_ids"])
        batch = {k: v.to(device) for k, v in pad_batch(features, pad_id, side="left").items()}
        torch.manual_seed(seed * 1_000_003 + number)
        sampling = temperature > 0
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=sampling,
                                   temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                                   top_k=0 if sampling else None, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id)
        fresh = generated[:, batch["input_ids"].shape[1]:]
        for row in fresh.tolist():
            cut = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            new_tokens += cut
        texts = tokenizer.batch_decode(fresh, skip_special_tokens=True)
        for (prompt, k), text in zip(chunk, texts):
            out.append(Sample.answering(prompt, k, text.strip()))
    model.train(was_training)
    return out, new_tokens
