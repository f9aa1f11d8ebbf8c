"""Evaluate a trained adapter where the model already is (the Train worker).

Evaluation runs on rank 0 of the Train worker group right after training: the model is in
memory on the worker's device, so there is no second load and generation uses the trial's GPU.
It produces the judge-free metrics and the generated samples; judge scoring (network calls) runs
in the trial driver from the saved samples (see ``emtune.evaluation.judging``).
"""

from __future__ import annotations

from typing import Any

from emtune.evaluation.generation import Prompt, Sample, generate_answers
from emtune.evaluation.judge_free import heldout_nll, ood_drift
from emtune.evaluation.questions import in_domain_questions, load_question_set


def general_prompts(spec: Any) -> tuple[list[Prompt], str]:
    """Prompts of the spec's general question set and the set's version."""
    questions = load_question_set(spec.evaluation.question_set)
    return [Prompt(q.id, q.text, q.system) for q in questions], questions.version


def evaluate_model(model: Any, tokenizer: Any, spec: Any, heldout_rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, list[Sample]], dict[str, str]]:
    """Judge-free metrics, generated samples per question set, and the sets' versions."""
    ev = spec.evaluation
    prompts, version = general_prompts(spec)
    settings = dict(
        samples_per_prompt=ev.samples_per_question,
        max_new_tokens=ev.max_new_tokens,
        temperature=ev.temperature,
        top_p=ev.top_p,
        batch_size=ev.generation_batch_size,
        seed=spec.seed,
    )
    samples = {"general": generate_answers(model, tokenizer, prompts, **settings)}
    versions = {"general": version}
    conversations = [
        [*Prompt(s.question_id, s.question, s.system).messages(), {"role": "assistant", "content": s.answer}]
        for s in samples["general"]
    ]
    max_length = spec.data.max_length
    metrics = {
        "ood_drift": ood_drift(model, tokenizer, conversations, max_length),
        "indomain_nll": heldout_nll(model, tokenizer, heldout_rows, max_length),
    }
    if ev.judge.kind != "none":
        held = in_domain_questions(heldout_rows, n=ev.heldout_questions, seed=spec.seed)
        in_domain = [Prompt(q.id, q.text, q.system) for q in held]
        samples["in_domain"] = generate_answers(model, tokenizer, in_domain, **settings)
        versions["in_domain"] = held.version
    return metrics, samples, versions
