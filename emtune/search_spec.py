"""The ``search``, ``objectives`` and ``constraints`` sections of a study spec.

What is searched (parameters with their distributions and conditions), by which Optuna sampler,
for how many trials, and what is optimised: metrics named in the evaluation table
(:func:`emtune.evaluation.sets.known_metrics`), optionally relative to a baseline trial.

Validation asks the same code that runs: every distribution is built with Optuna's own
distribution classes, and the sampler is constructed from the spec's arguments (after checking
each against the sampler class's signature), so a search section that loads also runs.
:func:`search_problems` holds the checks that need the whole search section (``when``
conditions, sampler arguments); :mod:`emtune.config` reports them with their lines.
"""

from __future__ import annotations

import collections.abc
import inspect
import typing
from typing import Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from emtune.evaluation.sets import known_metrics
from emtune.spec_errors import StrictModel, closest, did_you_mean

#: Spec name -> Optuna sampler class name.
SAMPLERS = {"tpe": "TPESampler", "nsga2": "NSGAIISampler", "gp": "GPSampler", "random": "RandomSampler"}
#: Values a categorical choice (and so Optuna's storage) can hold.
_PRIMITIVES = (type(None), bool, int, float, str)


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
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a categorical parameter takes `choices`, not low/high/log/step: "
                                 "remove them, or use type float or int")
            odd = [c for c in self.choices if not isinstance(c, _PRIMITIVES)]
            if odd:
                raise ValueError(f"choice {odd[0]!r} is not a plain value: choices are strings, numbers, "
                                 "booleans or null (Optuna stores them)")
            repeated = sorted({repr(c) for c in self.choices if self.choices.count(c) > 1})
            if repeated:
                raise ValueError(f"choice {repeated[0]} is listed twice: list each choice once")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes low/high, not `choices`: remove `choices`, "
                             "or use type categorical")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs both `low` and `high`")
        if not self.low < self.high:
            raise ValueError(f"`low` ({self.low:g}) must be below `high` ({self.high:g})")
        if self.log and self.step is not None:
            raise ValueError("Optuna samples a log scale without a step: drop `step` or set `log: false`")
        if self.type == "int":
            ends = {"low": self.low, "high": self.high, "step": self.step}
            bad = [k for k, v in ends.items() if v is not None and float(v) != int(v)]
            if bad:
                raise ValueError(f"an int parameter needs whole numbers: `{bad[0]}` is {ends[bad[0]]:g}")
            if self.log and self.low < 1:
                raise ValueError("an int parameter on a log scale needs `low` >= 1")
        elif self.log and self.low <= 0:
            raise ValueError("a log-scale range needs `low` > 0")
        try:
            self.distribution()
        except ValueError as err:  # Optuna's own verdict, in case it is stricter than the above
            raise ValueError(f"Optuna rejects this distribution: {err}") from None
        return self

    def distribution(self) -> Any:
        """The Optuna distribution this parameter is sampled from (as ``suggest_*`` builds it)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "categorical":
            return CategoricalDistribution(list(self.choices or ()))
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def can_take(self, value: Any) -> bool:
        """True when a sample of this parameter can equal ``value`` (``when`` conditions)."""
        if self.type == "categorical":
            # as the searcher compares (==), but a YAML `yes` never stands for the number 1
            return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices or ())
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        step = self.step or (1 if self.type == "int" else None)
        if step is None:
            return True
        steps = (value - self.low) / step
        return abs(steps - round(steps)) < 1e-9


class SamplerSpec(StrictModel):
    """Optuna sampler, always built explicitly with a seed (defaults to the study seed).

    ``args`` are keyword arguments of the sampler's class (``optuna.samplers.TPESampler`` for
    ``tpe``, ``NSGAIISampler``, ``GPSampler``, ``RandomSampler``), checked against its signature.
    """

    name: Literal["tpe", "nsga2", "random", "gp"] = "tpe"
    seed: int | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    def sampler_class(self) -> type:
        """The Optuna sampler class this spec names."""
        import optuna

        return getattr(optuna.samplers, SAMPLERS[self.name])


class PruningSpec(StrictModel):
    """Multi-objective pruning at evaluation points.

    At each evaluation point before the final one, a trial whose judge-free ``metrics`` are
    dominated by the same point's values of at least ``min_share`` of the earlier trials (and at
    least ``min_trials`` earlier trials reached that point) stops training and is told PRUNED
    with the reason; the checkpoints it evaluated stay candidates. Off by default: a short study
    has too few earlier trials to compare with; the paper's recipe turns it on.
    """

    enabled: bool = False
    metrics: tuple[str, ...] = Field(
        (), description="judge-free metrics compared; default: the study's judge-free objectives")
    min_share: float = Field(0.75, gt=0, le=1, description="share of earlier trials that must dominate")
    min_trials: int = Field(4, ge=1, description="earlier trials needed at a point before it prunes")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            _known_metric(name)
        return value


class SearchSpec(StrictModel):
    """The search space, the sampler, the trial budget and pruning."""

    parameters: dict[str, SearchParameter]
    sampler: SamplerSpec = SamplerSpec()
    num_trials: int = Field(8, gt=0)
    time_budget_s: float | None = Field(None, gt=0)
    pruning: PruningSpec = PruningSpec()

    @field_validator("parameters")
    @classmethod
    def _non_empty(cls, value: dict[str, SearchParameter]) -> dict[str, SearchParameter]:
        if not value:
            raise ValueError("the search space is empty: add at least one parameter")
        return value


def sampler_arguments(space: SearchSpec, candidates_per_trial: int = 1) -> dict[str, Any]:
    """The keyword arguments (seed aside) the study's sampler is built with: the spec's ``args``
    plus emtune's defaults for TPE (multivariate, and start-up trials scaled to the budget: that
    many fine-tunes, each told to Optuna as ``candidates_per_trial`` trials)."""
    args = dict(space.sampler.args)
    if space.sampler.name == "tpe":
        args.setdefault("multivariate", True)
        args.setdefault("n_startup_trials", min(10, max(2, space.num_trials // 3)) * max(1, candidates_per_trial))
    return args


def search_problems(space: SearchSpec) -> list[tuple[str, str]]:
    """Problems of the search section as a whole, as (``search.…`` key path, message): ``when``
    conditions that name no earlier parameter or a value it cannot take, and sampler arguments
    the sampler class does not accept."""
    return _when_problems(space) + _sampler_problems(space)


def _when_problems(space: SearchSpec) -> list[tuple[str, str]]:
    problems = []
    names = list(space.parameters)
    for index, (name, param) in enumerate(space.parameters.items()):
        earlier = names[:index]
        for cond, value in (param.when or {}).items():
            where = f"search.parameters.{name}.when.{cond}"
            if cond == name:
                problems.append((where, "a parameter cannot be conditioned on itself"))
            elif cond in names[index + 1:]:
                problems.append((where, f"{cond!r} is listed after {name!r}: parameters are sampled in the "
                                 f"order written, so move {cond!r} above {name!r}"))
            elif cond not in earlier:
                problems.append((where, f"no parameter {cond!r} before {name!r}; "
                                 + did_you_mean(cond, earlier) if earlier else
                                 f"no parameter {cond!r}: the first parameter cannot have a condition"))
            elif not space.parameters[cond].can_take(value):
                other = space.parameters[cond]
                close = closest(value, other.choices) if other.type == "categorical" else None
                reach = (f"its choices are {list(other.choices)}" if other.type == "categorical"
                         else f"it ranges over {other.low:g}..{other.high:g}")
                reach += f"; did you mean {close!r}?" if close is not None else ""
                problems.append((where, f"{cond!r} never takes the value {value!r}, so {name!r} would never be "
                                 f"sampled: {reach}"))
    return problems


def _sampler_problems(space: SearchSpec) -> list[tuple[str, str]]:
    sampler = space.sampler
    cls = sampler.sampler_class()
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "seed")]
    problems = []
    for key, value in sampler.args.items():
        where = f"search.sampler.args.{key}"
        if key == "seed":
            problems.append((where, "set the seed as search.sampler.seed (or the study's seed), not in args"))
        elif key not in accepted:
            problems.append((where, f"{cls.__name__} takes no argument {key!r}; {did_you_mean(key, accepted)}"))
        else:
            problem = _argument_type_problem(cls, key, value)
            if problem:
                problems.append((where, problem))
    if not problems:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation and experimental notes are not problems
                cls(seed=0, **sampler_arguments(space))
        except Exception as err:  # noqa: BLE001 - whatever the constructor refuses, say it here
            problems.append(("search.sampler.args", f"{cls.__name__} refuses these arguments: "
                             f"{type(err).__name__}: {err}"))
    return problems


def _argument_type_problem(cls: type, key: str, value: Any) -> str | None:
    """Why ``value`` cannot be given to ``cls(key=...)`` from YAML, or None (unknown hints pass)."""
    hint = _hint(cls, key)
    if hint is None:
        return None
    if not _plain(hint):
        if value is None:
            return None
        return f"{cls.__name__}'s {key!r} takes a Python object ({_name(hint)}); it cannot be set in a spec"
    try:
        TypeAdapter(hint).validate_python(value, strict=True)
    except ValidationError as err:
        return f"{key!r} must be {_name(hint)} for {cls.__name__}, got {value!r}: {err.errors()[0]['msg']}"
    return None


def _name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "").replace("collections.abc.", "")


def _hint(cls: type, key: str) -> Any:
    """The evaluated annotation of ``cls.__init__``'s parameter ``key``, or None."""
    annotation = inspect.signature(cls.__init__).parameters[key].annotation
    if annotation is inspect.Parameter.empty:
        return None
    if not isinstance(annotation, str):
        return annotation
    namespace = {**vars(typing), **vars(collections.abc), **vars(inspect.getmodule(cls.__init__))}
    try:
        return eval(annotation, namespace)  # noqa: S307 - an annotation of an installed library
    except Exception:  # noqa: BLE001 - a hint we cannot evaluate is not checked
        return None


def _plain(hint: Any) -> bool:
    """True when every type in ``hint`` is one YAML can write (numbers, strings, lists, ...)."""
    if hint in (int, float, bool, str, type(None), list, tuple, dict, Any):
        return True
    origin = typing.get_origin(hint)
    if origin is Literal:
        return True
    if origin is None:
        return False
    return all(_plain(a) for a in typing.get_args(hint) if a is not Ellipsis)


#: Reference trials a study can run: the model without fine-tuning, the undefended fine-tune, and
#: the undefended fine-tune stopped early (evaluated at stop points; each point a reference).
Baseline = Literal["base", "undefended", "stopped_early"]


class Relative(StrictModel):
    """A metric stated relative to a baseline trial of the same study."""

    to: Literal["base", "undefended"] = Field(description="base = the model without fine-tuning; undefended = fine-tuned, no defense")
    how: Literal["difference", "ratio"] = Field(
        "difference", description="difference = metric - baseline; ratio = metric / baseline"
    )


def _known_metric(name: str) -> str:
    metrics = known_metrics()
    if name not in metrics:
        raise ValueError(f"unknown metric {name!r}; {did_you_mean(name, metrics)} (every metric: docs/spec.md)")
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

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str) -> str:
        return _known_metric(value)

    @model_validator(mode="after")
    def _one_bound(self) -> "ConstraintSpec":
        if self.max is None and self.min is None:
            raise ValueError("a constraint needs `max` or `min`")
        return self
