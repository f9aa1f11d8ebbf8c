"""Answers to evaluation questions from the model in memory: the built-in generation engine.

``generate_answers`` renders every prompt with the tokenizer's chat template (the one training
used), then decodes all ``prompts x samples_per_prompt`` answers with the static-cache loop of
:mod:`emtune.evaluation.decoding` on the adapter merged into a copy of the weights
(:mod:`emtune.evaluation.merging`; unmerged where that is not possible, and it says why). The
batch is as large as free memory allows unless ``batch_size`` caps it, prompts go longest first,
and a row whose answer ended takes the next prompt at once.

Sampling is the protocol's (temperature, top_p; greedy at temperature 0) with one seed per
sample, recorded in each :class:`Sample` (:func:`emtune.evaluation.samples.sample_seed`): the same
model, prompts and ``seed`` give the same answers at any batch size. Answers are the new tokens
up to the first stop token (the tokenizer's EOS and the model's ``generation_config`` EOS ids),
decoded without special tokens and stripped.

Models the loop does not fit (sliding-window or hybrid attention, encoder-decoder) are decoded
with ``model.generate`` instead, in length-sorted batches, each batch seeded from its first
sample's seed: the same distribution, but answers then depend on the batch size.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from emtune.data.chat import pad_batch, prompt_ids
from emtune.evaluation.decoding import DecodeLoop, Job, unsupported_reason
from emtune.evaluation.merging import model_for_generation
from emtune.evaluation.samples import Prompt, Sample, sample_seed

__all__ = ["Prompt", "Sample", "generate_answers", "generate_sets", "stop_token_ids"]

log = logging.getLogger(__name__)


def stop_token_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """Tokens that end an answer: the tokenizer's EOS and the model's generation-config EOS ids."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        stops |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return stops


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    samples_per_prompt: int = 1,
    max_new_tokens: int = 600,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int | None = None,
    seed: int = 0,
    on_sample: Callable[[Sample], None] | None = None,
) -> list[Sample]:
    """Answer every prompt ``samples_per_prompt`` times (see module docs); samples come back in
    prompt order, and ``on_sample`` is called with each one as soon as its answer ends.

    ``batch_size`` caps the rows decoded together (None: as many as free memory holds).
    """
    sink = None if on_sample is None else (lambda _set, sample: on_sample(sample))
    return _generate(model, tokenizer, {"": prompts}, samples_per_prompt=samples_per_prompt,
                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     batch_size=batch_size, seed=seed, on_sample=sink)[""]


def generate_sets(model: Any, tokenizer: Any, prompt_sets: dict[str, list[Prompt]],
                  on_sample: Callable[[str, Sample], None] | None = None, **settings: Any) -> dict[str, list[Sample]]:
    """:func:`generate_answers` for several sets of prompts with the same ``settings`` (its keyword
    arguments), in one batch (so one set's tail decodes beside the next set's answers instead of
    alone); each set's answers are those it would get on its own. ``on_sample(set_name, sample)``
    sees each as it ends."""
    defaults = dict(samples_per_prompt=1, max_new_tokens=600, temperature=1.0, top_p=1.0, batch_size=None, seed=0)
    return _generate(model, tokenizer, prompt_sets, on_sample=on_sample, **{**defaults, **settings})


def _generate(model: Any, tokenizer: Any, prompt_sets: dict[str, list[Prompt]], *, samples_per_prompt: int,
              max_new_tokens: int, temperature: float, top_p: float, batch_size: int | None, seed: int,
              on_sample: Callable[[str, Sample], None] | None) -> dict[str, list[Sample]]:
    greedy = temperature == 0
    order = [(name, p, k) for name, prompts in prompt_sets.items() for p in prompts for k in range(samples_per_prompt)]
    out: dict[str, list[Sample]] = {name: [] for name in prompt_sets}
    if not order:
        return out
    seeds = [None if greedy else sample_seed(seed, p.question_id, k) for _, p, k in order]
    rendered = [prompt_ids(tokenizer, p.messages()) for prompts in prompt_sets.values() for p in prompts]
    jobs = [Job(rendered[i // samples_per_prompt], s or 0) for i, s in enumerate(seeds)]
    stops = stop_token_ids(tokenizer, model)
    samples: list[Sample | None] = [None] * len(jobs)

    def finish(index: int, tokens: list[int], reason: str) -> None:
        name, prompt, k = order[index]
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        samples[index] = Sample.answering(prompt, k, text, seeds[index])
        if on_sample is not None:
            on_sample(name, samples[index])

    engine, _ = model_for_generation(model)
    try:
        reason = unsupported_reason(engine)
        if reason is None:
            DecodeLoop(engine, jobs, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       stop_ids=stops, pad_id=tokenizer.pad_token_id, rows=batch_size, on_finish=finish).run()
        else:
            log.info("generation falls back to model.generate: %s", reason)
            _generate_fallback(engine, jobs, max_new_tokens, temperature, top_p, stops,
                               tokenizer.pad_token_id, batch_size or 16, finish)
    finally:
        del engine
    for (name, _, _), sample in zip(order, samples):
        out[name].append(sample)  # type: ignore[arg-type]
    return out


@torch.no_grad()
def _generate_fallback(model: Any, jobs: list[Job], max_new_tokens: int, temperature: float, top_p: float,
                       stops: set[int], pad_id: int, batch_size: int,
                       finish: Callable[[int, list[int], str], None]) -> None:
    """``model.generate`` in length-sorted, left-padded batches (models the loop does not fit)."""
    device = next(model.parameters()).device
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i].prompt))
    was_training = model.training
    model.eval()
    sampling = temperature > 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        features = [{"input_ids": jobs[i].prompt, "attention_mask": [1] * len(jobs[i].prompt)} for i in chunk]
        batch = {k: v.to(device) for k, v in pad_batch(features, pad_id, side="left").items()}
        torch.manual_seed(jobs[chunk[0]].seed)
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=sampling,
                                   temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                                   top_k=0 if sampling else None, repetition_penalty=1.0, pad_token_id=pad_id,
                                   eos_token_id=sorted(stops))
        for i, row in zip(chunk, generated[:, batch["input_ids"].shape[1]:].tolist()):
            cut = next((n for n, token in enumerate(row) if token in stops), None)
            finish(i, row[:cut] if cut is not None else row, "stop" if cut is not None else "length")
    model.train(was_training)
