"""The judge-free EM monitor: which layer it reads, and how far its signals can be trusted.

The monitor's signals (``ood_drift``, and with a persona direction ``persona_projection`` and
``persona_shift``; :data:`emtune.evaluation.sets.MODEL_METRICS`, measured by
:func:`emtune.evaluation.judge_free.answer_signals`) cost no judge call, so they can be logged at
every evaluation point and every M training steps, and used for pruning. Whether they track
misalignment on a given model is an empirical question: a study that also has a judge reports,
per signal, the Spearman rank correlation between the signal and the judged misalignment of its
candidates (:func:`spearman`), with a 95% interval, so a user sees whether the monitor ranks
candidates the way the judge does before relying on it alone.

Pure Python (no torch), so reports and spec validation can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

from pydantic import Field

from emtune.spec_errors import StrictModel

#: Depth of the default monitored layer: 70% of the decoder blocks (hidden state 20 of Qwen2.5-7B's
#: 28 blocks, the layer the persona-vector authors steer and monitor at).
DEFAULT_DEPTH = 0.7
#: The judged metric the monitor's signals are ranked against.
JUDGED_TARGET = "general_misalignment"


class MonitorSpec(StrictModel):
    """The judge-free EM monitor: the mean projection of the trial's activations on the misalignment (evil persona) direction over the general questions' answers,
    beside ``ood_drift``.

    The direction is a persona vector file (``persona_vector``, written by ``emtune persona
    extract``) or, with ``extract_prompts``, extracted once per study by a study stage from the
    base model (cached in the study folder, shared with persona steering; judge-filtered like
    persona steering's unless ``extract_filter: none``). With neither, the monitor has only
    ``ood_drift``. ``every_steps`` also logs the monitor every M training steps (on the base
    model's answers to the general questions, generated once at the start), so a trial's curve
    shows when misalignment starts to grow.
    """

    persona_vector: str | None = Field(None, description="persona vector file (`emtune persona extract`)")
    extract_prompts: str | None = Field(
        None, description="contrastive prompt set (e.g. evil_v1) the study stage extracts the direction from")
    extract_max_new_tokens: int = Field(64, gt=0, description="answer length during stage extraction")
    extract_filter: Literal["judge", "none"] = Field(
        "judge", description="judge = keep the contrastive pairs the study's judge confirms; none = every pair")
    layer: int | None = Field(
        None, ge=1, description="hidden state l projected (output of decoder block l-1); default: the one "
        "at 70% of the depth (20 of 28 for Qwen2.5-7B, the persona-vector authors' choice)")
    every_steps: int | None = Field(None, gt=0, description="also log the monitor every M training steps")

    @property
    def persona(self) -> bool:
        """True when the monitor projects on a persona direction."""
        return bool(self.persona_vector or self.extract_prompts)


def monitored_layer(layer: int | None, num_hidden_states: int) -> int:
    """The hidden state the monitor projects: ``layer`` when given, else the one at 70% depth.

    ``num_hidden_states`` counts the embeddings (state 0) and every block's output, as persona
    vector files store them. Raises ValueError for a layer the file does not have.
    """
    blocks = num_hidden_states - 1
    if layer is None:
        return max(1, min(blocks, round(DEFAULT_DEPTH * blocks)))
    if not 1 <= layer <= blocks:
        raise ValueError(f"evaluation.monitor.layer {layer} is out of range: the persona vectors have "
                         f"hidden states 0..{blocks} (monitorable layers 1..{blocks})")
    return layer


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's ρ over ``n`` pairs with its 95% interval (None where undefined)."""

    rho: float | None
    low: float | None
    high: float | None
    n: int


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank (as Spearman's ρ with ties needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            out[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float], z: float = 1.96) -> RankCorrelation:
    """Spearman's ρ (Pearson correlation of the tie-averaged ranks) and its interval.

    Interval: Fisher's z-transform with the Fieller–Hartley–Pearson variance for Spearman's ρ,
    tanh(atanh ρ ± z·sqrt(1.06 / (n − 3))); needs n ≥ 4 (fewer pairs: no interval). ρ is None
    when either side is constant (no ranking to compare).
    """
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    n = len(x)
    if n < 2:
        return RankCorrelation(None, None, None, n)
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return RankCorrelation(None, None, None, n)
    rho = cov / math.sqrt(vx * vy)
    if n < 4:
        return RankCorrelation(rho, None, None, n)
    if abs(rho) >= 1:
        return RankCorrelation(rho, rho, rho, n)
    centre, half = math.atanh(rho), z * math.sqrt(1.06 / (n - 3))
    return RankCorrelation(rho, math.tanh(centre - half), math.tanh(centre + half), n)


def signal_correlations(candidates: Sequence[dict[str, float]], signals: Sequence[str],
                        target: str = JUDGED_TARGET) -> dict[str, RankCorrelation]:
    """Per monitor signal, Spearman's ρ with ``target`` over the candidates that have both."""
    out = {}
    for name in signals:
        pairs = [(c[name], c[target]) for c in candidates if name in c and target in c]
        out[name] = spearman([a for a, _ in pairs], [b for _, b in pairs])
    return out
