"""Checks of a study spec that need more than one field, and where its relative paths point.

Each check returns ``(key path, message)`` pairs; the key path is the line map's form
(``defenses.0.weight``, ``search.parameters.kl_weight.target``), so :mod:`emtune.config` can put
every problem on its line. The checks are plain functions over a validated spec (a
:class:`emtune.config.StudySpec`, passed in, never imported: config imports this module).

Relative paths: every input path a spec names (datasets, pools, adapters, persona vectors,
question files, grader rubric files, weight folders) is read from the spec's own folder, wherever emtune is run
from; :func:`resolve_paths` makes them absolute before validation, so Ray workers (other working
folders) and a stored study's ``spec.yaml`` agree. ``output_dir`` and ``evaluation.judge.cache_path``
are outputs: they are relative to the working folder (``make demo`` writes ``./studies``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from emtune.data.loading import DatasetSpec
from emtune.defenses.base import is_local_source
from emtune.defenses.interleaving import pool_dataset
from emtune.defenses.registry import DEFENSES
from emtune.evaluation.checkpoint_checks import checkpoint_problems
from emtune.evaluation.prompt_files import is_prompt_file
from emtune.evaluation.sets import known_metrics, metric_unavailable
from emtune.spec_errors import did_you_mean
from emtune.train.settings import method_problems

#: A Hugging Face Hub repository id: ORG/NAME.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Shipped question-set names look like this; anything else is a file path.
_SET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

Found = list[tuple[str, str]]


# --- paths ---------------------------------------------------------------------------------------


def resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Make the spec's relative input paths absolute from ``base_dir`` (the spec's folder), and
    its relative output paths absolute from the working folder; changes ``raw`` in place."""
    base_dir = Path(base_dir).resolve()

    def local(value: Any) -> Any:  # a field that always holds a local path (or fixture:/hub:)
        if isinstance(value, str) and value and is_local_source(value):
            return str((base_dir / Path(value).expanduser()).resolve())
        return value

    def maybe_local(value: Any) -> Any:  # a field holding a local path or a name/hub id
        if isinstance(value, str) and value and (base_dir / Path(value).expanduser()).exists():
            return str((base_dir / Path(value).expanduser()).resolve())
        return value

    data = _section(raw, "data")
    warmup = _section(_section(_section(raw, "training"), "grpo"), "warmup")
    for dataset in (_section(data, "train"), _section(data, "safety_pool"), _section(warmup, "dataset")):
        if "path" in dataset:
            dataset["path"] = local(dataset["path"])
    model = _section(raw, "model")
    for key in ("source", "base_source"):
        if model.get(key) not in (None, "tiny"):
            model[key] = maybe_local(model[key])
    evaluation = _section(raw, "evaluation")
    judge = _section(evaluation, "judge")
    # question and judge prompt files; shipped names (general_v1, heldout, v2) stay names
    for node, key in ((evaluation, "question_set"), (evaluation, "triggered_question_set"),
                      (_section(evaluation, "in_domain"), "questions"), (judge, "prompt_version")):
        value = node.get(key)
        if isinstance(value, str):
            node[key] = local(value) if _looks_like_file(value) else maybe_local(value)
    monitor = _section(evaluation, "monitor")
    if isinstance(monitor.get("persona_vector"), str):
        monitor["persona_vector"] = local(monitor["persona_vector"])
    _resolve_judge(judge, maybe_local)
    for reward in _section(_section(raw, "training"), "grpo").get("rewards") or []:
        if isinstance(reward, dict) and reward.get("name") == "grader":  # a grader's rubric file and judge
            if isinstance(reward.get("rubrics"), str) and is_prompt_file(reward["rubrics"]):
                reward["rubrics"] = local(reward["rubrics"])
            _resolve_judge(_section(reward, "judge"), maybe_local)
    for entry in raw.get("defenses") or []:
        if isinstance(entry, dict) and entry.get("name") in DEFENSES:
            _resolve_defense(entry, local)


def _resolve_judge(judge: dict[str, Any], maybe_local: Any) -> None:
    """A judge's weight folder (from the spec's folder) and its cache file (an output)."""
    if judge.get("model_path"):
        judge["model_path"] = maybe_local(judge["model_path"])
    if isinstance(judge.get("cache_path"), str):
        judge["cache_path"] = str(Path(judge["cache_path"]).expanduser().resolve())


def _looks_like_file(value: str) -> bool:
    """A question or prompt setting written as a path rather than a shipped name."""
    return not _SET_NAME.match(value) or value.endswith((".yaml", ".yml", ".jsonl", ".json"))


def _section(parent: Any, key: str) -> dict[str, Any]:
    value = parent.get(key) if isinstance(parent, dict) else None
    return value if isinstance(value, dict) else {}


def _resolve_defense(entry: dict[str, Any], local: Any) -> None:
    """Resolve the fields a defense declares as local files (its ``local_files``)."""
    from pydantic import ValidationError

    cls = DEFENSES[entry["name"]]
    try:
        config = cls.config_class.model_validate(entry)
    except ValidationError:
        return  # reported with its path when the whole spec is validated
    for item in cls.local_files(config):  # item.field: "pool", "pool.path", "misaligned_datasets.0(.path)"
        *parents, last = item.field.split(".")
        node: Any = entry
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
        key: Any = int(last) if isinstance(node, list) else last
        if isinstance(node, list) or (isinstance(node, dict) and key in node):
            node[key] = local(node[key])


def local_file_problems(spec: Any) -> Found:
    """Every local file or folder the (resolved) spec names must exist."""
    problems = []
    for where, dataset in _own_datasets(spec):
        if dataset is not None and is_local_source(dataset.path) and not Path(dataset.path).exists():
            fix = (f"the paper's copy: {dataset.origin}" if dataset.origin
                   else "fix the path (a relative path is read from the spec's folder)")
            problems.append((f"{where}.path", f"dataset file {dataset.path} not found; {fix}"))
    ev = spec.evaluation
    named = [("evaluation.question_set", ev.question_set), ("evaluation.triggered_question_set",
             ev.triggered_question_set), ("evaluation.in_domain.questions", ev.in_domain.questions),
             ("evaluation.judge.prompt_version", ev.judge.prompt_version)]
    for where, value in named:
        if value and _looks_like_file(value) and Path(value).is_dir():
            problems.append((where, f"{value} is a folder, not a file; give the file's path"))
        elif value and _looks_like_file(value) and not Path(value).is_file():
            problems.append((where, f"file {value} not found; fix the path (relative to the spec's folder), or use "
                             "a shipped set / prompt version"))
    vector = ev.monitor.persona_vector
    if vector and not Path(vector).is_file():
        problems.append(("evaluation.monitor.persona_vector", f"persona vector file {vector} not found; create it "
                         "with `emtune persona extract` (a relative path is read from the spec's folder), or set "
                         "extract_prompts instead"))
    for i, defense in enumerate(spec.defenses):
        for item in DEFENSES[defense.name].local_files(defense):
            path = Path(item.path).expanduser()
            kind = "folder" if item.folder else "file"
            hint = f"; {item.hint}" if item.hint else "; fix the path (relative to the spec's folder)"
            if not path.exists():
                problems.append((f"defenses.{i}.{item.field}", f"{defense.name}: {kind} {item.path} not found{hint}"))
            elif item.folder and not path.is_dir():
                problems.append((f"defenses.{i}.{item.field}", f"{defense.name}: {item.path} is a file, not a "
                                 f"folder{hint}"))
    return problems


def source_problems(spec: Any, check_files: bool = True) -> Found:
    """Model and dataset sources that are neither an existing local path nor a well-formed hub id
    (checked offline; ``emtune validate --online`` asks the hub whether the ids exist). Without
    ``check_files`` only the hub ids' form is checked (a moved model folder is no problem then)."""
    problems = []
    for key in ("source", "base_source") if check_files else ():
        value = getattr(spec.model, key)
        if value in (None, "tiny") or Path(value).exists() or HUB_ID.match(value):
            continue
        problems.append((f"model.{key}", f"{value!r} is neither a local folder (relative to the spec's folder) "
                         "nor a hub id ORG/NAME (e.g. Qwen/Qwen2.5-7B-Instruct); fix the path or the id"))
    for where, dataset in dataset_sources(spec):
        if dataset.path.startswith("hub:") and not HUB_ID.match(dataset.path[4:]):
            problems.append((where, f"{dataset.path!r}: a hub dataset is hub:ORG/NAME (e.g. "
                             "hub:allenai/wildguardmix); add the organisation"))
    return problems


def _own_datasets(spec: Any) -> list[tuple[str, Any]]:
    """(key, DatasetSpec or None) of the datasets the spec names outside its defenses."""
    grpo = spec.training.grpo
    warmup = grpo.warmup.dataset if grpo is not None and grpo.warmup is not None else None
    return [("data.train", spec.data.train), ("data.safety_pool", spec.data.safety_pool),
            ("training.grpo.warmup.dataset", warmup)]


def dataset_sources(spec: Any) -> list[tuple[str, Any]]:
    """(key path, DatasetSpec) of every dataset the spec names: training data (and GRPO's warm-up rows),
    pools, EM datasets."""
    found: list[tuple[str, Any]] = [(f"{where}.path", d) for where, d in _own_datasets(spec) if d]
    for i, defense in enumerate(spec.defenses):
        if getattr(defense, "pool", None) is not None:
            found.append((f"defenses.{i}.pool" + (".path" if isinstance(defense.pool, DatasetSpec) else ""),
                          pool_dataset(defense)))
        for j, dataset in enumerate(getattr(defense, "misaligned_datasets", ()) or ()):
            if isinstance(dataset, DatasetSpec):
                found.append((f"defenses.{i}.misaligned_datasets.{j}.path", dataset))
            else:
                found.append((f"defenses.{i}.misaligned_datasets.{j}", DatasetSpec(path=dataset)))
    return found


# --- cross-field checks --------------------------------------------------------------------------


def cross_field_problems(spec: Any) -> Found:
    """Problems that need several sections at once: defenses (listed twice, or what a defense
    needs from the rest of the spec), objectives and constraints (their metric's evaluation and
    judge, their baseline), the training method (each defense's form for it), evaluation points,
    pruning and the monitor (:func:`checkpoint_problems`)."""
    problems: Found = []
    names = [d.name for d in spec.defenses]
    for i, defense in enumerate(spec.defenses):
        if names.index(defense.name) != i:
            problems.append((f"defenses.{i}.name", f"defense {defense.name!r} is listed twice (first at "
                             f"defenses[{names.index(defense.name)}]): keep one entry"))
        for message in DEFENSES[defense.name].spec_problems(defense, spec):
            problems.append((f"defenses.{i}", message))
    problems += method_problems(spec)
    kinds = set(spec.baselines.kinds) if spec.baselines.enabled else set()
    metrics = known_metrics()
    judged = spec.evaluation.judge.kind != "none"
    used = [(f"objectives.{i}.name", o.name, o.relative, f"objectives.{i}") for i, o in enumerate(spec.objectives)]
    used += [(f"constraints.{i}.metric", c.metric, c.relative, f"constraints.{i}") for i, c in enumerate(spec.constraints)]
    for where, name, relative, item in used:
        if relative is not None and relative.to not in kinds:
            problems.append((f"{item}.relative.to", f"{name} is relative to the {relative.to!r} baseline, which this "
                             f"study does not run: add {relative.to!r} to baselines.kinds (and baselines.enabled: true)"))
        info = metrics.get(name)
        if info is not None and info.judged and not judged:
            problems.append((where, f"metric {name!r} needs a judge: set evaluation.judge.kind to openai or hf_local, "
                             "or use a judge-free metric (ood_drift, indomain_nll)"))
            continue
        missing = metric_unavailable(spec, name)
        if missing:
            problems.append((where, missing))
    return problems + checkpoint_problems(spec)


# --- search targets ------------------------------------------------------------------------------


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Write ``value`` at ``dotted`` in a dumped spec; ``defenses.<name>`` addresses a list entry.
    Raises ``KeyError(prefix, known names)`` at the first part that does not exist."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, (list, tuple)):
            known = [item.get("name") for item in node if isinstance(item, dict)]
            if part not in known or last:
                raise KeyError(".".join(parts[: i + 1]), known)
            node = node[known.index(part)]
        elif isinstance(node, dict) and part in node:
            if last:
                node[part] = value
                return
            node = node[part]
        else:
            raise KeyError(".".join(parts[: i + 1]), list(node) if isinstance(node, dict) else [])


def target_problems(spec: Any) -> Found:
    """Every target must name a field (did-you-mean otherwise), and every value its parameter can
    take (both ends of a range, every choice) must give a valid trial spec."""
    problems: Found = []
    dumped = spec.model_dump(mode="python")
    listed = [d.name for d in spec.defenses]
    study_problems = {message for _, message in cross_field_problems(spec)}
    for name, param in spec.search.parameters.items():
        where = f"search.parameters.{name}"
        if param.target is None:
            continue
        try:
            set_path(copy.deepcopy(dumped), param.target, None)
        except KeyError as missing:
            prefix, known = missing.args
            part = prefix.rpartition(".")[2]
            if prefix.count(".") == 1 and prefix.startswith("defenses.") and part in DEFENSES:
                hint = f"add a `- name: {part}` entry under `defenses:` (listed: {', '.join(listed) or 'none'})"
            else:
                hint = did_you_mean(part, [k for k in known if k])
            problems.append((f"{where}.target", f"{param.target!r}: no field {prefix!r}; {hint}"))
            continue
        values = list(param.choices) if param.type == "categorical" else [param.low, param.high]
        for value in values:
            value = int(value) if param.type == "int" else value
            problem = _override_problem(spec, name, value, study_problems)
            if problem:
                problems.append((where, f"{name} = {value!r} would make {param.target} invalid: {problem}"))
                break
    return problems


def _override_problem(spec: Any, name: str, value: Any, study_problems: set[str]) -> str | None:
    """Why the trial spec with ``name = value`` is invalid, leaving out what the study spec
    itself already has (reported once, on its own line); None when it is valid."""
    from pydantic import ValidationError

    try:
        trial = spec.with_overrides({name: value}, cross_checks=False)
    except ValidationError as err:
        return err.errors()[0]["msg"].replace("Value error, ", "")
    new = [message for _, message in cross_field_problems(trial) if message not in study_problems]
    return new[0] if new else None
