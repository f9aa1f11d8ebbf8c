"""The ``search``, ``objectives`` and ``constraints`` sections of a study spec.

What is searched (parameters with their distributions and conditions), by which Optuna sampler,
for how many trials, and what is optimised: metrics named in the evaluation table
(:func:`emtune.evaluation.sets.known_metrics`), optionally relative to a baseline trial.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from emtune.evaluation.sets import known_metrics
from emtune.spec_errors import StrictModel


class SearchParameter(StrictModel):
    """One searched value. ``target`` is a dotted path into the spec it overrides, e.g.
    ``defenses.kl_to_reference.weight`` (list entries of ``defenses`` are addressed by name).
    A parameter with no target only steers others through ``when`` (e.g. which defense is on)."""

    type: Literal["float", "int", "categorical"]
    target: str | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: tuple[Any, ...] | None = None
    when: dict[str, Any] | None = Field(
        None, description="sample only when the named parameters have these values"
    )

    @model_validator(mode="after")
    def _check_range(self) -> "SearchParameter":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty `choices` list")
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("a categorical parameter takes `choices`, not low/high/log")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs both `low` and `high`")
        if not self.low < self.high:
            raise ValueError(f"`low` ({self.low}) must be below `high` ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs `low` > 0")
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes low/high, not `choices`")
        return self


class SamplerSpec(StrictModel):
    """Optuna sampler, always built explicitly with a seed (defaults to the study seed)."""

    name: Literal["tpe", "nsga2", "random", "gp"] = "tpe"
    seed: int | None = None
    args: dict[str, Any] = Field(default_factory=dict)


class SearchSpec(StrictModel):
    """The search space, the sampler and the trial budget."""

    parameters: dict[str, SearchParameter]
    sampler: SamplerSpec = SamplerSpec()
    num_trials: int = Field(8, gt=0)
    time_budget_s: float | None = Field(None, gt=0)

    @field_validator("parameters")
    @classmethod
    def _non_empty(cls, value: dict[str, SearchParameter]) -> dict[str, SearchParameter]:
        if not value:
            raise ValueError("the search space is empty: add at least one parameter")
        return value


Baseline = Literal["base", "undefended"]


class Relative(StrictModel):
    """A metric stated relative to a baseline trial of the same study."""

    to: Baseline = Field(description="base = the model without fine-tuning; undefended = fine-tuned, no defense")
    how: Literal["difference", "ratio"] = Field(
        "difference", description="difference = metric - baseline; ratio = metric / baseline"
    )


def _known_metric(name: str) -> str:
    metrics = known_metrics()
    if name not in metrics:
        raise ValueError(f"unknown metric {name!r}; emtune reports {sorted(metrics)}")
    return name


class ObjectiveSpec(StrictModel):
    """A metric to optimise and its direction (optionally relative to a baseline)."""

    name: str
    direction: Literal["minimize", "maximize"]
    reference: float | None = Field(
        None, description="hypervolume reference value (worst acceptable); derived from trials if unset"
    )
    relative: Relative | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        return _known_metric(value)


class ConstraintSpec(StrictModel):
    """A bound a trial must meet to be feasible (feasible trials come first on the front)."""

    metric: str
    max: float | None = None
    min: float | None = None
    relative: Relative | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> "ConstraintSpec":
        _known_metric(self.metric)
        if self.max is None and self.min is None:
            raise ValueError("a constraint needs `max` or `min`")
        return self
