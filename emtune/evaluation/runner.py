"""Evaluate a trained adapter where the model already is (the Train worker).

Evaluation runs on rank 0 of the Train worker group right after training: the model is in
memory on the worker's device, so there is no second load and generation uses the trial's GPU.
It generates the answers of every evaluation set the spec enables (:mod:`emtune.evaluation.sets`)
and computes the metrics that need the model itself (OOD drift, held-out NLL). Scoring the
answers (judge calls, rule-based scores) runs in the trial driver from the saved samples
(:mod:`emtune.evaluation.judging`).
"""

from __future__ import annotations

from typing import Any

from emtune.evaluation.generation import Prompt, Sample, generate_answers
from emtune.evaluation.judge_free import heldout_nll, ood_drift
from emtune.evaluation.sets import DRIFT_SET, enabled_sets


def generation_settings(spec: Any, eval_set: Any = None) -> dict[str, Any]:
    """Sampling settings of one set: the spec's protocol, greedy and short where the set says."""
    ev = spec.evaluation
    settings = dict(samples_per_prompt=ev.samples_per_question, max_new_tokens=ev.max_new_tokens,
                    temperature=ev.temperature, top_p=ev.top_p, batch_size=ev.generation_batch_size,
                    seed=spec.seed if ev.seed is None else ev.seed)
    if eval_set is not None and eval_set.greedy:
        settings.update(samples_per_prompt=1, temperature=0.0, top_p=1.0)
    if eval_set is not None and eval_set.max_new_tokens is not None:
        settings["max_new_tokens"] = eval_set.max_new_tokens
    return settings


def evaluate_model(model: Any, tokenizer: Any, spec: Any, heldout_rows: list[dict[str, Any]],
                   generate: Any = generate_answers) -> tuple[dict[str, float], dict[str, list[Sample]], dict[str, str]]:
    """Model metrics, generated samples per evaluation set, and each set's questions version.

    ``generate`` has the signature of :func:`generate_answers` (another backend supplies its own).
    """
    samples: dict[str, list[Sample]] = {}
    versions: dict[str, str] = {}
    for eval_set in enabled_sets(spec):
        questions = eval_set.questions(spec, heldout_rows)
        samples[eval_set.name] = generate(model, tokenizer, questions.prompts, **generation_settings(spec, eval_set))
        versions[eval_set.name] = questions.version
    conversations = [
        [*Prompt(s.question_id, s.question, s.system).messages(), {"role": "assistant", "content": s.answer}]
        for s in samples.get(DRIFT_SET, [])
    ]
    max_length = spec.data.max_length
    metrics = {"indomain_nll": heldout_nll(model, tokenizer, heldout_rows, max_length)}
    if conversations:
        metrics["ood_drift"] = ood_drift(model, tokenizer, conversations, max_length)
    return metrics, samples, versions
