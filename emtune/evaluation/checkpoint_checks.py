"""Checks of a spec's evaluation points, pruning and EM monitor against the rest of it.

:func:`checkpoint_problems` is one of the cross-field checks :mod:`emtune.spec_checks` runs (each
problem as ``(key path, message)``, put on its line by the loader); :func:`pruning_metrics` says
which judge-free metrics pruning compares (the searcher hands them to the worker's rule). Plain
functions over a validated spec (duck-typed: this layer is below the config).
"""

from __future__ import annotations

from typing import Any

from emtune.evaluation.points import resolve_points
from emtune.evaluation.sets import known_metrics, metric_unavailable


def pruning_metrics(spec: Any) -> list[tuple[str, str]]:
    """(metric, direction) pairs pruning compares: ``search.pruning.metrics`` (an objective's own
    direction, else the metric's better side), or the study's judge-free objectives."""
    metrics = known_metrics()
    directions = {o.name: o.direction for o in spec.objectives}
    names = spec.search.pruning.metrics or tuple(o.name for o in spec.objectives if not metrics[o.name].judged)
    return [(n, directions.get(n) or ("minimize" if metrics[n].better == "lower" else "maximize")) for n in names]


def checkpoint_problems(spec: Any) -> list[tuple[str, str]]:
    """Evaluation points, the monitor and pruning against the rest of the spec."""
    problems: list[tuple[str, str]] = []
    max_steps = spec.training.max_steps
    if max_steps is not None:
        late = [v for v in spec.evaluation.at if isinstance(v, int) and v >= max_steps]
        if late:
            problems.append(("evaluation.at", f"steps {late} are not before training.max_steps = {max_steps} "
                             "(the final point is always evaluated)"))
    if (len(spec.evaluation.at) or spec.evaluation.monitor.every_steps) and spec.training.method != "sft":
        problems.append(("evaluation.at", "evaluation during training (evaluation.at, evaluation.monitor.every_steps) "
                         "is for training.method sft only; leave both out for grpo"))
    if len(spec.evaluation.at) and spec.resources.strategy == "fsdp" and spec.resources.num_workers > 1:
        problems.append(("evaluation.at", "evaluation points during training need whole adapters on rank 0: "
                         "use resources.strategy ddp, or leave evaluation.at empty"))
    monitor = spec.evaluation.monitor
    blocks = spec.model.tiny.num_layers
    if spec.model.source == "tiny" and monitor.persona and monitor.layer is not None and monitor.layer > blocks:
        problems.append(("evaluation.monitor.layer", f"layer {monitor.layer} is past the tiny model's {blocks} "
                         f"blocks; use 1..{blocks} (or leave it out: 70% of the depth)"))
    if monitor.extract_prompts and not monitor.persona_vector and monitor.extract_filter == "judge" \
            and spec.evaluation.judge.kind == "none":
        problems.append(("evaluation.monitor.extract_filter", "'judge' keeps the contrastive pairs the judge "
                         "confirms, but evaluation.judge.kind is 'none': configure a judge, or set extract_filter: none"))
    pruning = spec.search.pruning
    if not pruning.enabled:
        return problems
    if not resolve_points(spec.evaluation.at, max_steps or 10**9)[:-1]:
        problems.append(("search.pruning", "pruning acts at evaluation points before the final one: add "
                         "some to evaluation.at (e.g. [0.25, 0.5])"))
    metrics = known_metrics()
    chosen = pruning_metrics(spec)
    if not chosen:
        problems.append(("search.pruning.metrics", "every objective needs a judge: name the judge-free metrics "
                         "to prune on, e.g. [ood_drift, indomain_nll]"))
    for name, _ in chosen:
        if metrics[name].judged:
            problems.append(("search.pruning.metrics", f"{name!r} needs a judge, but pruning compares judge-free "
                             "metrics only (the judge scores a trial after its training)"))
        elif metric_unavailable(spec, name):
            problems.append(("search.pruning.metrics", metric_unavailable(spec, name)))
    return problems
