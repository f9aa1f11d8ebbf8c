"""StudySpec: the typed, frozen description of one emtune study, and its loader.

A study spec is a YAML file (see ``search_spaces/``). Each section's settings class lives beside
the code that uses it (``models.ModelSpec``, ``data.loading.DataSpec``, ``train.settings``,
``evaluation.config``, ``tracking.settings``, ``search_spec``, every defense's own config class);
this module assembles them into :class:`StudySpec` and checks what needs the whole spec.

Loading validates everything up front: unknown keys are rejected with a close-name hint, values
are range-checked, search-parameter targets must address a real field, every objective must be
a metric some evaluation produces, and the local files the spec names must exist. Errors come out
as :class:`SpecError`, one line per problem with file, line, dotted path and a hint; the CLI
prints them and exits with status 2 before anything is started or written.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from emtune.data.loading import DatasetSpec, DataSpec
from emtune.defenses.base import is_local_source
from emtune.defenses.registry import DEFENSES
from emtune.evaluation.config import EvaluationSpec
from emtune.evaluation.sets import EVAL_SETS, known_metrics
from emtune.models import LoraSpec, ModelSpec, TinyModelSpec
from emtune.search_spec import Baseline, ConstraintSpec, ObjectiveSpec, SearchSpec
from emtune.spec_errors import (
    SpecError, StrictModel, apply_overrides, format_validation_error, load_yaml_with_lines,
)
from emtune.tracking.settings import TrackingSpec
from emtune.train.settings import TrainingSpec

__all__ = ["StudySpec", "load_spec", "spec_to_yaml", "DatasetSpec", "DataSpec", "LoraSpec", "ModelSpec",
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
    ``base`` (the aligned model, no fine-tuning) and ``undefended`` (fine-tuned, no defense)."""

    enabled: bool = True
    kinds: tuple[Baseline, ...] = ("base", "undefended")


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
    def _cross_checks(self) -> "StudySpec":
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("; ".join(message for _, message in problems))
        return self

    @property
    def study_dir(self) -> Path:
        """Where this study keeps its Optuna storage, MLflow store, Ray results and caches."""
        return Path(self.output_dir).expanduser().resolve() / self.name

    def with_overrides(self, values: dict[str, Any]) -> "StudySpec":
        """The spec of one trial: searched values written into their target fields, re-validated."""
        data = self.model_dump(mode="python")
        for name, value in values.items():
            target = self.search.parameters[name].target
            if target is not None:
                _set_path(data, target, value)
        return StudySpec.model_validate(data)


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


def cross_field_problems(spec: StudySpec) -> list[tuple[str, str]]:
    """Problems that need several sections at once, as (dotted path, message)."""
    problems: list[tuple[str, str]] = []
    names = [d.name for d in spec.defenses]
    for i, defense in enumerate(spec.defenses):
        if names.index(defense.name) != i:
            problems.append((f"defenses.{i}", f"defense listed twice: {defense.name!r}; keep one entry"))
        for message in DEFENSES[defense.name].spec_problems(defense, spec):
            problems.append((f"defenses.{i}", message))
    kinds = set(spec.baselines.kinds) if spec.baselines.enabled else set()
    metrics = known_metrics()
    judged = spec.evaluation.judge.kind != "none"
    used = [(f"objectives.{i}", o.name, o.relative) for i, o in enumerate(spec.objectives)]
    used += [(f"constraints.{i}", c.metric, c.relative) for i, c in enumerate(spec.constraints)]
    for where, name, relative in used:
        if relative is not None and relative.to not in kinds:
            problems.append((f"{where}.relative", f"{name} is relative to the {relative.to!r} baseline: "
                             "enable it under baselines.kinds"))
        info = metrics.get(name)
        if info is not None and info.judged and not judged:
            problems.append((where, f"metric {name!r} needs a judge: set evaluation.judge.kind (openai or hf_local)"))
            continue
        home = next((s for s in EVAL_SETS.values() if any(m.name == name for m in s.metrics)), None)
        if home is not None and not home.enabled(spec):
            problems.append((where, f"metric {name!r} comes from the {home.name!r} evaluation, which this spec "
                             f"does not run: {home.doc}"))
    return problems


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Write ``value`` at ``dotted`` in a dumped spec; ``defenses.<name>`` addresses a list entry."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, (list, tuple)):
            matches = [item for item in node if isinstance(item, dict) and item.get("name") == part]
            if not matches:
                raise KeyError(".".join(parts[: i + 1]))
            node = matches[0]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(".".join(parts[: i + 1]))
    if not isinstance(node, dict) or parts[-1] not in node:
        raise KeyError(dotted)
    node[parts[-1]] = value


def _check_targets(spec: StudySpec) -> list[tuple[str, str]]:
    """Every target must exist and both ends of its range must produce a valid spec."""
    problems: list[tuple[str, str]] = []
    dumped = spec.model_dump(mode="python")
    params = spec.search.parameters
    for name, param in params.items():
        where = f"search.parameters.{name}"
        for cond in (param.when or {}):
            if cond not in params:
                problems.append((f"{where}.when", f"refers to unknown parameter {cond!r}"))
        if param.target is None:
            continue
        try:
            _set_path(copy.deepcopy(dumped), param.target, None)
        except KeyError as missing:
            hint = "list each searched defense under `defenses:` first" if param.target.startswith(
                "defenses.") else "use a dotted path to an existing field"
            problems.append((f"{where}.target", f"{param.target!r}: no field {missing.args[0]!r} ({hint})"))
            continue
        ends = list(param.choices) if param.type == "categorical" else [param.low, param.high]
        for value in ends:
            if param.type == "int" and value is not None:
                value = int(value)
            try:
                spec.with_overrides({name: value})
            except ValidationError as err:
                first = err.errors()[0]
                problems.append((f"{where}", f"value {value!r} for {param.target} is invalid: {first['msg']}"))
                break
    return problems


def _check_local_files(spec: StudySpec) -> list[tuple[str, str]]:
    """Every local file or folder the spec names must exist (relative paths: from the working folder)."""
    problems = []
    for where, dataset in (("data.train", spec.data.train), ("data.safety_pool", spec.data.safety_pool)):
        if dataset is not None and is_local_source(dataset.path) and not Path(dataset.path).expanduser().exists():
            origin = f"; the paper's copy: {dataset.origin}" if dataset.origin else "; fix the path"
            problems.append((f"{where}.path", f"dataset file {dataset.path!r} not found (from {Path.cwd()})"
                             + origin))
    problems += _question_file_problems(spec)
    for i, defense in enumerate(spec.defenses):
        for item in DEFENSES[defense.name].local_files(defense):
            path = Path(item.path).expanduser()
            missing = not path.is_dir() if item.folder else not path.exists()
            if missing:
                kind = "folder" if item.folder else "file"
                hint = f"; {item.hint}" if item.hint else ""
                problems.append((f"defenses.{i}.{item.field}", f"{defense.name}: {kind} {item.path!r} not found "
                                 f"(from {Path.cwd()}){hint}"))
    return problems


def _question_file_problems(spec: StudySpec) -> list[tuple[str, str]]:
    """Question and judge prompt files the spec names by path must exist."""
    ev = spec.evaluation
    in_domain = None if ev.in_domain.questions == "heldout" else ev.in_domain.questions
    named = [("evaluation.question_set", ev.question_set),
             ("evaluation.triggered_question_set", ev.triggered_question_set),
             ("evaluation.in_domain.questions", in_domain), ("evaluation.judge.prompt_version", ev.judge.prompt_version)]
    problems = []
    for where, value in named:
        looks_like_file = value and ("/" in value or value.endswith((".yaml", ".yml", ".jsonl")))
        if looks_like_file and not Path(value).expanduser().is_file():
            problems.append((where, f"file {value!r} not found (from {Path.cwd()}); fix the path, or use a shipped "
                             "set / prompt version"))
    return problems


def absolute_paths(raw: dict[str, Any]) -> None:
    """Make existing local paths absolute so Ray workers (other working folders) find them."""
    def absolute(path: Any) -> Any:
        if isinstance(path, str) and is_local_source(path) and Path(path).expanduser().exists():
            return str(Path(path).expanduser().resolve())
        return path

    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "safety_pool"):
            if isinstance(data.get(key), dict):
                data[key]["path"] = absolute(data[key].get("path"))
    evaluation = raw.get("evaluation")
    if isinstance(evaluation, dict):  # question and judge prompt files (shipped names stay names)
        for node, key in ((evaluation, "question_set"), (evaluation, "triggered_question_set"),
                          (evaluation.get("in_domain"), "questions"), (evaluation.get("judge"), "prompt_version")):
            if isinstance(node, dict) and isinstance(node.get(key), str) and ("/" in node[key] or "." in node[key]):
                node[key] = absolute(node[key])
    for entry in raw.get("defenses") or []:
        if not isinstance(entry, dict) or entry.get("name") not in DEFENSES:
            continue
        cls = DEFENSES[entry["name"]]
        try:
            config = cls.config_class.model_validate(entry)
        except ValidationError:
            continue  # reported with its path when the whole spec is validated
        for item in cls.local_files(config):
            *parents, last = item.field.split(".")
            node: Any = entry
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
            key: Any = int(last) if isinstance(node, list) else last
            if isinstance(node, list) or (isinstance(node, dict) and key in node):
                node[key] = absolute(node[key])


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> StudySpec:
    """Load and validate a study spec, with optional ``KEY=VALUE`` overrides applied first
    (:func:`apply_overrides`). Raises :class:`SpecError` listing every problem."""
    sync_defense_registry()
    path = Path(path)
    raw, lines = load_yaml_with_lines(path)
    apply_overrides(raw, overrides, path)
    absolute_paths(raw)
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(path, format_validation_error(err, raw, lines, StudySpec)) from None
    problems = _check_targets(spec) + _check_local_files(spec)
    if problems:
        raise SpecError(path, [(p, msg, lines.get(p) or lines.get(p.rsplit(".", 1)[0])) for p, msg in problems])
    return spec


def spec_to_yaml(spec: StudySpec) -> str:
    """The spec as YAML with every default filled in (stored with each study)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
