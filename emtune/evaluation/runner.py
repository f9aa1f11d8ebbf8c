"""Evaluate a trained adapter where the model already is (the Train worker).

Evaluation runs on rank 0 of the Train worker group right after training: the model is in
memory on the worker's device, so there is no second load and generation uses the trial's GPU.
It produces the judge-free metrics (OOD drift, held-out NLL, OpSwap exact match) and the
generated samples; judge scoring (network calls) runs in the trial driver from the saved samples
(``emtune.evaluation.judging``). Samples for judges only (in-domain, triggered) are generated
only when a judge is configured.
"""

from __future__ import annotations

from typing import Any

from emtune.evaluation.generation import Prompt, Sample, generate_answers
from emtune.evaluation.judge_free import heldout_nll, ood_drift
from emtune.evaluation.questions import in_domain_questions, load_question_set


def question_prompts(name: str) -> tuple[list[Prompt], str]:
    """Prompts of a shipped or user question set, and the set's version."""
    questions = load_question_set(name)
    return [Prompt(q.id, q.text, q.system) for q in questions], questions.version


def opswap_exact_match(model: Any, tokenizer: Any, spec: Any, generate: Any = generate_answers) -> dict[str, float]:
    """Greedy answers to the OpSwap test split, scored by exact match per tier."""
    from emtune.data.opswap import generate, score_exact_match

    rows = generate(spec.data.opswap)["test"]
    prompts = []
    for i, row in enumerate(rows):
        system = next((m["content"] for m in row["messages"] if m["role"] == "system"), None)
        user = next(m["content"] for m in row["messages"] if m["role"] == "user")
        prompts.append(Prompt(f"opswap/{i}", user, system))
    answers = generate(model, tokenizer, prompts, max_new_tokens=8, temperature=0.0,
                               batch_size=spec.evaluation.generation_batch_size)
    scores = score_exact_match([a.answer for a in answers], rows)
    return {f"opswap_{k}": float(v) for k, v in scores.items() if k.startswith("exact_match")}


def evaluate_model(model: Any, tokenizer: Any, spec: Any, heldout_rows: list[dict[str, Any]],
                   generate: Any = generate_answers) -> tuple[dict[str, float], dict[str, list[Sample]], dict[str, str]]:
    """Judge-free metrics, generated samples per question set, and the sets' versions.

    ``generate`` has the signature of :func:`generate_answers` (the vLLM backend supplies its own).
    """
    ev = spec.evaluation
    settings = dict(
        samples_per_prompt=ev.samples_per_question,
        max_new_tokens=ev.max_new_tokens,
        temperature=ev.temperature,
        top_p=ev.top_p,
        batch_size=ev.generation_batch_size,
        seed=spec.seed if ev.seed is None else ev.seed,
    )
    prompts, version = question_prompts(ev.question_set)
    samples = {"general": generate(model, tokenizer, prompts, **settings)}
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
    if spec.data.opswap is not None:
        metrics.update(opswap_exact_match(model, tokenizer, spec, generate))
    if ev.judge.kind != "none":
        held = in_domain_questions(heldout_rows, n=ev.heldout_questions, seed=spec.seed)
        in_domain = [Prompt(q.id, q.text, q.system) for q in held]
        samples["in_domain"] = generate(model, tokenizer, in_domain, **settings)
        versions["in_domain"] = held.version
        if ev.triggered_question_set:
            triggered, versions["triggered"] = question_prompts(ev.triggered_question_set)
            samples["triggered"] = generate(model, tokenizer, triggered, **settings)
    return metrics, samples, versions
