"""StudySpec: the typed, frozen description of one emtune study, and its loader.

A study spec is a YAML file (see ``search_spaces/``). Each section's settings class lives beside
the code that uses it (``models.ModelSpec``, ``data.loading.DataSpec``, ``train.settings``,
``evaluation.config``, ``tracking.settings``, ``search_spec``, every defense's own config class);
this module assembles them into :class:`StudySpec` and checks what needs the whole spec.

Loading validates everything up front and lists every problem at once (:func:`check_spec`):
unknown keys get a close-name hint, values are range-checked, distributions and sampler
arguments are checked by Optuna's own classes, ``when`` conditions must name an earlier parameter
and a value it can take, search targets must address a real field with every value of their
range, every objective must be a metric some evaluation of this spec produces, and the local
files the spec names must exist (relative paths are read from the spec's folder; see
:mod:`emtune.spec_checks`). When some sections are invalid, the whole-spec checks still run on
the rest (invalid items left out), so one run lists everything. Errors come out as
:class:`SpecError`, one line per problem with file, line, dotted path and a fix; the CLI prints
them and exits with status 2 before anything is started or written.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, Union

import yaml
from pydantic import Field, ValidationError, ValidationInfo, model_validator

from emtune.data.loading import DatasetSpec, DataSpec
from emtune.defenses.registry import DEFENSES
from emtune.evaluation.config import EvaluationSpec
from emtune.evaluation.points import Points
from emtune.models import LoraSpec, ModelSpec, TinyModelSpec
from emtune.search_spec import Baseline, ConstraintSpec, ObjectiveSpec, SearchSpec, search_problems
from emtune.spec_checks import (
    Found, cross_field_problems, local_file_problems, resolve_paths, set_path, source_problems, target_problems,
)
from emtune.spec_errors import (
    Problem, SpecError, StrictModel, apply_overrides, data_loc, display_path, drop_point, format_validation_error,
    line_of, load_yaml_with_lines,
)
from emtune.tracking.settings import TrackingSpec
from emtune.train.settings import TrainingSpec

__all__ = ["StudySpec", "SpecCheck", "check_spec", "load_spec", "spec_to_yaml", "cross_field_problems", "DatasetSpec", "DataSpec", "LoraSpec", "ModelSpec",
           "TinyModelSpec", "EvaluationSpec", "SearchSpec", "TrainingSpec", "TrackingSpec"]


class ResourcesSpec(StrictModel):
    """Ray resources of one trial; concurrent trials are capped so drivers never wait on GPUs."""

    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent_trials: int = Field(1, gt=0)
    driver_memory_gb: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=0, description="restarts of a trial's training after a failure, each "
                              "resuming from its latest periodic checkpoint")
    train_process: Literal["auto", "trial", "workers"] = Field(
        "auto", description="where a trial trains: `trial` = in the trial's own process (Ray Train local "
        "mode, no worker actors: starts in seconds; one worker only), `workers` = a Ray Train worker group, "
        "`auto` = `trial` for one worker, `workers` for several")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="data parallelism across a trial's workers; fsdp shards large models"
    )
    driver_resources: dict[str, float] = Field(
        default_factory=dict,
        description="extra Ray resources for each trial's driver, e.g. {on_demand: 0.001} to pin "
        "drivers to non-preemptible nodes (cluster/ configs define `on_demand`)",
    )

    @model_validator(mode="after")
    def _one_worker_in_the_trial_process(self) -> "ResourcesSpec":
        if self.train_process == "trial" and self.num_workers > 1:
            raise ValueError("train_process: trial runs the training in the trial's own process, so it needs "
                             "num_workers: 1; use train_process: workers (or auto) for several workers")
        return self

    @property
    def in_trial_process(self) -> bool:
        """True when a trial trains in its own process (Ray Train local mode) instead of a worker group."""
        return self.train_process == "trial" or (self.train_process == "auto" and self.num_workers == 1)


class BaselinesSpec(StrictModel):
    """Reference trials every study runs first (unless switched off), evaluated like the others:
    ``base`` (the aligned model, no fine-tuning), ``undefended`` (fine-tuned, no defense) and
    ``stopped_early`` (the undefended fine-tune evaluated at ``stop_points``: early stopping as a
    defense arm of its own, the cheapest thing that might work). One undefended fine-tune serves
    both ``undefended`` (its final point) and ``stopped_early`` (every point)."""

    enabled: bool = True
    kinds: tuple[Baseline, ...] = ("base", "undefended", "stopped_early")
    stop_points: Points = Field(
        (), description="where stopped_early is evaluated (fractions or steps); default: evaluation.at, "
        "else 0.25, 0.5, 0.75 (the final point always)")


def _defense_union() -> Any:
    """The discriminated union of every registered defense's config class (by ``name``)."""
    return Annotated[Union[tuple(cls.config_class for cls in DEFENSES.values())], Field(discriminator="name")]


class StudySpec(StrictModel):
    """One study: what to fine-tune, under which defenses, searched how, measured how."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    output_dir: str = "studies"
    model: ModelSpec = ModelSpec()
    lora: LoraSpec = LoraSpec()
    data: DataSpec
    training: TrainingSpec = TrainingSpec()
    defenses: tuple[_defense_union(), ...] = ()  # type: ignore[valid-type]
    search: SearchSpec
    objectives: tuple[ObjectiveSpec, ...] = Field(min_length=1)
    constraints: tuple[ConstraintSpec, ...] = ()
    evaluation: EvaluationSpec = EvaluationSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    baselines: BaselinesSpec = BaselinesSpec()

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> "StudySpec":
        # A spec built in code (or a trial's, by with_overrides) is checked whole here; the loader
        # skips this and reports each problem on its own line instead (check_spec).
        if not (info.context or {}).get("defer_cross_checks"):
            problems = cross_field_problems(self)
            if problems:
                raise ValueError("; ".join(f"{display_path(where)}: {message}" for where, message in problems))
        return self

    @property
    def trial_count(self) -> int:
        """Trials a full run of this study makes: the searched ones plus the baselines (one
        undefended fine-tune measures both ``undefended`` and ``stopped_early``)."""
        if not self.baselines.enabled:
            return self.search.num_trials
        kinds = set(self.baselines.kinds)
        return self.search.num_trials + len(kinds) - int({"undefended", "stopped_early"} <= kinds)

    @property
    def study_dir(self) -> Path:
        """Where this study keeps its Optuna storage, MLflow store, Ray results and caches."""
        return Path(self.output_dir).expanduser().resolve() / self.name

    def with_overrides(self, values: dict[str, Any], cross_checks: bool = True) -> "StudySpec":
        """The spec of one trial: searched values written into their target fields, re-validated
        (``cross_checks=False``: field by field only; the caller runs :func:`cross_field_problems`)."""
        data = self.model_dump(mode="python")
        for name, value in values.items():
            target = self.search.parameters[name].target
            if target is not None:
                set_path(data, target, value)
        return StudySpec.model_validate(data, context={"defer_cross_checks": not cross_checks})


_SYNCED: tuple[type, ...] = tuple(DEFENSES.values())


def sync_defense_registry() -> None:
    """Rebuild StudySpec's defense union when the registry changed since it was built (a defense
    registered at run time, e.g. by a test or a notebook, becomes usable in specs)."""
    global _SYNCED
    current = tuple(DEFENSES.values())
    if current == _SYNCED:
        return
    StudySpec.model_fields["defenses"].annotation = tuple[_defense_union(), ...]
    StudySpec.model_rebuild(force=True)
    _SYNCED = current


@dataclass
class SpecCheck:
    """The outcome of checking one spec file: the spec when it is valid, else every problem and,
    where the rest of the spec still validates without its invalid items, that partial spec (so
    input checks can run on it too)."""

    path: Path
    lines: dict[str, int]
    spec: StudySpec | None = None
    partial: StudySpec | None = None
    problems: list[Problem] = field(default_factory=list)
    #: key paths left out of ``partial`` (list indices as in the file)
    dropped: set[str] = field(default_factory=set)
    #: per list in ``partial``: the file's index of each item kept
    kept: dict[str, list[int]] = field(default_factory=dict)

    def locate(self, found: Found) -> list[Problem]:
        """(key path, message) pairs of ``partial``/``spec`` as problems of the file, with lines;
        those under a left-out item are dropped (already reported)."""
        out = []
        for key, message in found:
            key = self._file_key(key)
            if not any(key == d or key.startswith(d + ".") for d in self.dropped):
                out.append((display_path(key), message, line_of(key, self.lines)))
        return out

    def _file_key(self, key: str) -> str:
        parts = key.split(".")
        for i in range(1, len(parts)):
            kept = self.kept.get(".".join(parts[:i]))
            if kept is not None and parts[i].isdigit() and int(parts[i]) < len(kept):
                parts[i] = str(kept[int(parts[i])])
        return ".".join(parts)

    def error(self) -> SpecError:
        """The problems as one exception."""
        return SpecError(self.path, self.problems)


def check_spec(path: str | Path, check_files: bool = True, overrides: Sequence[str] = ()) -> SpecCheck:
    """Load a spec, with optional ``KEY=VALUE`` overrides applied first (:func:`apply_overrides`),
    and list every problem it has (see the module docstring)."""
    sync_defense_registry()
    path = Path(path)
    raw, lines = load_yaml_with_lines(path)
    apply_overrides(raw, overrides, path)
    resolve_paths(raw, path.parent)
    check = SpecCheck(path, lines)
    try:
        spec = StudySpec.model_validate(raw, context={"defer_cross_checks": True})
    except ValidationError as err:
        check.problems = format_validation_error(err, raw, lines, StudySpec)
        spec = _partial(raw, err, check)
    if spec is not None:
        found = cross_field_problems(spec) + source_problems(spec, check_files)
        found += [p for p in search_problems(spec.search) + target_problems(spec)
                  if not _refers_to_dropped(p, spec, check.dropped)]
        if check_files:
            found += local_file_problems(spec)
        check.problems += check.locate(found)
    if check.problems:
        check.partial = spec
    else:
        check.spec = spec
    return check


def load_spec(path: str | Path, overrides: Sequence[str] = (), check_files: bool = True) -> StudySpec:
    """Load and validate a study spec, with optional ``KEY=VALUE`` overrides applied first.
    Raises :class:`SpecError` listing every problem.

    ``check_files=False`` skips the existence of local inputs (a finished study's stored spec is
    still readable after its training file moved).
    """
    check = check_spec(path, check_files, overrides)
    if check.spec is None:
        raise check.error()
    return check.spec


def _partial(raw: dict[str, Any], err: ValidationError, check: SpecCheck) -> StudySpec | None:
    """The spec without the items the errors are in (a few rounds: a removal may uncover more);
    None when an error sits in a required part that cannot be left out."""
    partial = copy.deepcopy(raw)
    for _ in range(4):
        points = [drop_point(StudySpec, e["loc"]) for e in err.errors()]
        if None in points:
            return None
        for e, n in zip(err.errors(), points):
            loc = data_loc(e["loc"][:n], partial)
            check.dropped.add(check._file_key(".".join(str(p) for p in loc)))
            if len(loc) == 2 and loc[0] == "defenses" and isinstance(partial["defenses"][loc[1]], dict):
                check.dropped.add(f"defenses.{partial['defenses'][loc[1]].get('name')}")  # targets name it
            _mark(partial, loc)
        partial = _sweep(partial, "", check.kept)
        _stand_ins(partial, check)
        try:
            return StudySpec.model_validate(partial, context={"defer_cross_checks": True})
        except ValidationError as again:
            err = again
    return None


_GONE = object()
#: Harmless stand-ins for required collections left empty by removals, so the checks of the rest
#: of the spec still run (nothing is reported about them).
_STAND_IN_PARAMETER = "emtune_stand_in"


def _stand_ins(partial: dict[str, Any], check: SpecCheck) -> None:
    search = partial.get("search")
    if isinstance(search, dict) and search.get("parameters") == {}:
        search["parameters"] = {_STAND_IN_PARAMETER: {"type": "categorical", "choices": [None]}}
        check.dropped.add(f"search.parameters.{_STAND_IN_PARAMETER}")
    if partial.get("objectives") == []:
        partial["objectives"] = [{"name": "ood_drift", "direction": "minimize"}]
        check.dropped.add("objectives.0")
    grpo = (partial.get("training") or {}).get("grpo") if isinstance(partial.get("training"), dict) else None
    if isinstance(grpo, dict) and grpo.get("rewards") == []:  # keeps the method: its inputs are prompt rows
        grpo["rewards"] = [{"name": "opswap_exact_match"}]
        check.dropped.add("training.grpo.rewards.0")


def _mark(node: Any, loc: list[Any]) -> None:
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict):
        node.pop(loc[-1], None)
    elif isinstance(node, list) and isinstance(loc[-1], int) and loc[-1] < len(node):
        node[loc[-1]] = _GONE


def _sweep(node: Any, key: str, kept: dict[str, list[int]]) -> Any:
    """Remove marked list items, remembering each kept item's index in the file."""
    if isinstance(node, dict):
        return {k: _sweep(v, f"{key}.{k}" if key else str(k), kept) for k, v in node.items()}
    if isinstance(node, list):
        before = kept.get(key, list(range(len(node))))
        indices = [before[i] for i, item in enumerate(node) if item is not _GONE]
        if len(indices) != len(node):
            kept[key] = indices
        items = [item for item in node if item is not _GONE]
        return [_sweep(item, f"{key}.{i}", kept) for i, item in enumerate(items)]
    return node


def _refers_to_dropped(problem: tuple[str, str], spec: StudySpec, dropped: set[str]) -> bool:
    """A search problem caused by a left-out item (a condition on a left-out parameter, a target
    in a left-out defense entry): the item's own problem is reported already."""
    parts = problem[0].split(".")
    if len(parts) < 3 or parts[:2] != ["search", "parameters"] or parts[2] not in spec.search.parameters:
        return False
    if len(parts) == 5 and parts[3] == "when":
        return f"search.parameters.{parts[4]}" in dropped
    target = spec.search.parameters[parts[2]].target or ""
    return any(target.startswith(d + ".") for d in dropped if d.startswith("defenses."))


def spec_to_yaml(spec: StudySpec) -> str:
    """The spec as YAML with every default filled in (stored with each study)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
