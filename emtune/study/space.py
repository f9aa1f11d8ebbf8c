"""Search-space translation: a SearchSpec becomes Optuna define-by-run suggestions.

Parameters are suggested in the order they are written, so a ``when`` condition can only refer
to a parameter listed before it (checked at load). A parameter whose condition does not hold is
not suggested at all, which keeps Optuna's conditional search spaces clean (e.g. ``defense``
picks one defense and only that defense's strength is sampled).
"""

from __future__ import annotations

from typing import Any

import optuna

from emtune.search_spec import SearchSpec, sampler_arguments


def suggest(trial: optuna.Trial, space: SearchSpec) -> dict[str, Any]:
    """Sample one configuration from ``space`` through ``trial``; returns name -> value."""
    values: dict[str, Any] = {}
    for name, param in space.parameters.items():
        if param.when and any(values.get(k) != v for k, v in param.when.items()):
            continue
        if param.type == "float":
            values[name] = trial.suggest_float(name, param.low, param.high, log=param.log, step=param.step)
        elif param.type == "int":
            values[name] = trial.suggest_int(
                name, int(param.low), int(param.high), log=param.log, step=int(param.step or 1)
            )
        else:
            values[name] = trial.suggest_categorical(name, list(param.choices))
    return values


def build_sampler(space: SearchSpec, study_seed: int, offset: int = 0,
                  candidates_per_trial: int = 1) -> tuple[optuna.samplers.BaseSampler, dict[str, Any]]:
    """The sampler the spec names, seeded; plus its description (stored in the study's attrs).

    ``offset`` is added to the seed: a sampler re-created for a resumed or extended study is
    seeded with the number of trials it already has, so its random draws (TPE's start-up trials,
    random search) do not repeat the first driver's. Constraints reach the samplers through
    ``Trial.set_constraint`` (Optuna 5's API), which the searcher calls before ``tell``
    (:func:`emtune.study.outcomes.constraint_violations`).

    TPE's default start-up is ``min(10, max(2, num_trials // 3))`` *fine-tunes* of random draws.
    Optuna counts finished Optuna trials, and with ``evaluation.at`` each fine-tune is told as
    ``candidates_per_trial`` of them (its checkpoints share its parameters), so the count is
    scaled by it: otherwise one fine-tune's checkpoints would end the random phase, and TPE's
    model would collapse onto that one parameter setting.
    """
    spec = space.sampler
    seed = (spec.seed if spec.seed is not None else study_seed) + offset
    # the arguments `emtune validate` constructed the sampler with (start-up scaled to fine-tunes)
    args = sampler_arguments(space, candidates_per_trial)
    sampler = spec.sampler_class()(seed=seed, **args)
    return sampler, {"class": type(sampler).__name__, "seed": seed, "args": args}
