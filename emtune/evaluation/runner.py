"""Evaluate a trained adapter where the model already is (the Train worker).

Evaluation runs on rank 0 of the Train worker group right after training: the model is in
memory on the worker's device. With ``evaluation.backend: hf`` the worker generates the answers
of every evaluation set the spec enables (:mod:`emtune.evaluation.sets`) with the built-in engine
and computes the metrics that need the model itself (OOD drift, held-out NLL). With ``server`` it
writes a *generation plan* instead (every set's prompts as token ids, settings and stop tokens),
which the trial driver works through on the generation server
(:mod:`emtune.evaluation.server_backend`) once the worker has released its GPU; only the set
OOD drift is measured on (:data:`DRIFT_SET`) is still generated here when the study uses
``ood_drift`` (:func:`sets_in_worker`), because that metric needs the model on those answers. Scoring the
answers (judge calls, rule-based scores) runs in the trial driver from the saved samples
(:mod:`emtune.evaluation.judging`).
"""

from __future__ import annotations

from typing import Any, Callable

from emtune.data.chat import prompt_ids
from emtune.evaluation.generation import Prompt, Sample, generate_sets, stop_token_ids
from emtune.evaluation.judge_free import answer_signals, heldout_nll
from emtune.evaluation.merging import free_cached_memory, model_for_generation
from emtune.evaluation.sets import DRIFT_SET, enabled_sets, monitor_signals as signal_metrics

#: Version of the generation plan's layout (``TrialFiles.plan``).
PLAN_VERSION = 1


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


def sets_in_worker(spec: Any) -> set[str]:
    """With ``evaluation.backend: server``, the sets the worker still generates itself: the drift
    set when an objective, constraint or pruning uses ``ood_drift`` or another monitor signal, or
    the monitor has a persona direction (they need the model on those answers)."""
    used = {o.name for o in spec.objectives} | {c.metric for c in spec.constraints} | set(spec.search.pruning.metrics)
    monitored = used & {m.name for m in signal_metrics()} or spec.evaluation.monitor.persona
    return {DRIFT_SET} if monitored else set()


def evaluate_model(model: Any, tokenizer: Any, spec: Any, heldout_rows: list[dict[str, Any]],
                   on_sample: Callable[[str, Sample], None] | None = None, only: set[str] | None = None,
                   direction: Any = None) -> tuple[dict[str, float], dict[str, list[Sample]], dict[str, str]]:
    """Model metrics, generated samples per evaluation set, and each set's questions version.

    ``on_sample(set_name, sample)`` sees every sample as soon as its answer ends (the judge
    stream scores it while the rest is still decoding). ``only`` limits generation to those of
    the enabled sets (None: all of them). ``direction`` is the EM monitor's ``(vector, layer)``
    (adds ``persona_projection`` and ``persona_shift`` beside ``ood_drift``), or None.
    """
    samples: dict[str, list[Sample]] = {}
    versions: dict[str, str] = {}
    chosen = [s for s in enabled_sets(spec) if only is None or s.name in only]
    if not chosen:
        return model_metrics(model, tokenizer, spec, heldout_rows, [], direction), samples, versions
    # Sets with the same sampling settings (general, in-domain, triggered) decode in one batch.
    groups: dict[tuple, dict[str, list[Prompt]]] = {}
    for eval_set in chosen:
        questions = eval_set.questions(spec, heldout_rows)
        settings = generation_settings(spec, eval_set)
        groups.setdefault(tuple(sorted(settings.items())), {})[eval_set.name] = questions.prompts
        versions[eval_set.name] = questions.version
    engine, how = model_for_generation(model)  # merged once for every set, freed before the metrics
    try:
        for settings_key, prompt_sets in groups.items():
            samples.update(generate_sets(engine, tokenizer, prompt_sets, on_sample=on_sample, **dict(settings_key)))
    finally:
        del engine
        free_cached_memory(model)
    metrics = model_metrics(model, tokenizer, spec, heldout_rows, samples.get(DRIFT_SET, []), direction)
    metrics["generation/merged_adapter"] = 1.0 if how == "merged" else 0.0
    return metrics, samples, versions


def model_metrics(model: Any, tokenizer: Any, spec: Any, heldout_rows: list[dict[str, Any]],
                  drift_samples: list[Sample], direction: Any = None) -> dict[str, float]:
    """Held-out NLL (when the held-out rows have answers), and the monitor over ``drift_samples``
    (the general answers) when given: the OOD drift, and with the monitor's ``direction`` its
    persona signals."""
    metrics: dict[str, float] = {}
    with_answers = [r for r in heldout_rows if any(m["role"] == "assistant" for m in r["messages"])]
    if with_answers:  # RL prompt datasets may have no reference answers: then there is no NLL to measure
        metrics["indomain_nll"] = heldout_nll(model, tokenizer, with_answers, spec.data.max_length)
    metrics.update(monitor_signals(model, tokenizer, spec, drift_samples, direction))
    return metrics


def answered(samples: list[Sample]) -> list[list[dict[str, str]]]:
    """The conversations (prompt + generated answer) of some samples."""
    return [[*Prompt(s.question_id, s.question, s.system).messages(), {"role": "assistant", "content": s.answer}]
            for s in samples]


def monitor_signals(model: Any, tokenizer: Any, spec: Any, samples: list[Sample], direction: Any = None) -> dict[str, float]:
    """The judge-free monitor over the general questions' answers: ``ood_drift`` and, with a
    ``(vector, layer)`` direction, ``persona_projection`` and ``persona_shift`` (empty without answers)."""
    if not samples:
        return {}
    vector, layer = direction if direction is not None else (None, None)
    return answer_signals(model, tokenizer, answered(samples), spec.data.max_length, vector, layer)


def generation_plan(model: Any, tokenizer: Any, spec: Any, heldout_rows: list[dict[str, Any]],
                    exclude: set[str] = frozenset()) -> dict[str, Any]:
    """What a generation server must answer for this trial: per enabled set (but ``exclude``) its
    questions' version, its sampling settings and its prompts (with their chat-template token ids,
    so the server sees exactly the prompts the built-in engine would), and the stop tokens."""
    sets = {}
    for eval_set in enabled_sets(spec):
        if eval_set.name in exclude:
            continue
        questions = eval_set.questions(spec, heldout_rows)
        settings = generation_settings(spec, eval_set)
        settings.pop("batch_size")
        sets[eval_set.name] = {
            "version": questions.version,
            "settings": settings,
            "prompts": [{"question_id": p.question_id, "text": p.text, "system": p.system,
                         "reference": p.reference, "judge_prompts": p.judge_prompts,
                         "ids": prompt_ids(tokenizer, p.messages())} for p in questions.prompts],
        }
    return {"plan_version": PLAN_VERSION, "stop_token_ids": sorted(stop_token_ids(tokenizer, model)), "sets": sets}
