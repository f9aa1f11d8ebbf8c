"""The inputs a study spec names, read before anything starts: datasets, question sets, prompt sets.

Every input is checked, not only up to the first bad one, and each problem is reported against
the spec key that names the input (``data.train.path: /data/x.jsonl:3: no assistant message``),
so ``emtune validate`` prints them in the same ``file:line: path: message`` form as the spec's own
problems. Names from closed sets (fixtures, shipped question and prompt sets) get a did-you-mean.

Nothing here touches the network unless asked: hub sources (``hub:ORG/NAME`` datasets, hub model
ids) are ``skip``\\ ped by ``emtune validate`` (listed as not checked), asked about with
``exists`` (``emtune validate --online``: the hub says whether each id exists, nothing is
downloaded), or ``load``\\ ed (``emtune run``, which may use the network for its data anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from emtune.data.fixtures import FIXTURE_NAMES
from emtune.data.loading import DataError, load_rows
from emtune.data.prompts import check_prompt_row
from emtune.defenses.registry import DEFENSES
from emtune.evaluation.prompt_files import PromptFileError, load_prompt_set
from emtune.evaluation.questions import QuestionSetError, shipped_question_sets
from emtune.evaluation.sets import EVAL_SETS, judged
from emtune.spec_checks import dataset_sources
from emtune.spec_errors import did_you_mean

HubMode = Literal["skip", "exists", "load"]


@dataclass
class InputReport:
    """What reading a spec's inputs found."""

    problems: list[tuple[str, str]] = field(default_factory=list)  # (key path, message)
    counts: dict[str, int] = field(default_factory=dict)  # what was read, for the summary line
    unchecked: list[str] = field(default_factory=list)  # hub ids not looked at (offline)
    unreachable: list[str] = field(default_factory=list)  # the hub could not be asked


def check_inputs(spec: Any, hub: HubMode = "skip") -> InputReport:
    """Read every dataset, question set and prompt set ``spec`` names (see the module docstring)."""
    report = InputReport()
    for where, dataset in dataset_sources(spec):
        rows = _dataset(report, where, dataset, hub, spec.training.method)
        if where == "data.train.path" and rows is not None:
            _prompt_row_problems(report, spec, rows)
    ev = spec.evaluation
    _question_set(report, spec, "general", "evaluation.question_set", ev.question_set, "general questions")
    if judged(spec) and ev.triggered_question_set:
        _question_set(report, spec, "triggered", "evaluation.triggered_question_set", ev.triggered_question_set,
                      "triggered questions")
    if judged(spec) and ev.in_domain.questions != "heldout":
        _question_set(report, spec, "in_domain", "evaluation.in_domain.questions", ev.in_domain.questions,
                      "in-domain questions")
    if judged(spec):
        _judge_prompts(report, spec)
    for i, defense in enumerate(spec.defenses):
        prompts = getattr(defense, "extract_prompts", None)
        if prompts:
            _persona_prompts(report, f"defenses.{i}.extract_prompts", prompts)
        # adapters, persona vectors, model folders: read as the study will read them
        report.problems += [(f"defenses.{i}.{key}", message)
                            for key, message in DEFENSES[defense.name].input_problems(defense, spec)]
    if hub != "skip":
        models = [("model.source", spec.model.source), ("model.base_source", spec.model.base_source)]
        for where, source in models:
            if source and source != "tiny" and not Path(source).exists():
                _hub_exists(report, where, source, "model")
    else:
        report.unchecked += [s for s in (spec.model.source, spec.model.base_source)
                             if s and s != "tiny" and not Path(s).exists()]
    return report


def _dataset(report: InputReport, where: str, dataset: Any, hub: HubMode, spec_method: str) -> list | None:
    """Read one dataset (its rows, or None when it was not read or has a problem)."""
    source = dataset.path
    if source.startswith("fixture:") and source[8:] not in FIXTURE_NAMES:
        report.problems.append((where, f"unknown fixture {source[8:]!r}; {did_you_mean(source[8:], FIXTURE_NAMES)} "
                                "(fixtures ship with emtune: fixture:narrow_bad_advice, fixture:safe_instruct, fixture:em_prompts)"))
        return None
    if source.startswith("hub:") and hub != "load":
        if hub == "exists":
            _hub_exists(report, where, source[4:], "dataset")
        else:
            report.unchecked.append(source)
        return None
    if not source.startswith(("fixture:", "hub:")) and not Path(source).exists():
        return None  # a missing file is one of the spec's own problems (emtune.spec_checks.local_file_problems)
    # RL trains on prompt rows (emtune.data.prompts); everything else is chat rows
    prompts = where == "data.train.path" and spec_method == "grpo"
    try:
        rows = load_rows(dataset, check=check_prompt_row) if prompts else load_rows(dataset)
    except (DataError, OSError, UnicodeDecodeError) as err:
        report.problems.append((where, _one_line(err)))
        return None
    label = {"data.train.path": "train rows", "data.safety_pool.path": "safety pool rows",
             "training.grpo.warmup.dataset.path": "warm-up rows"}.get(where)
    if label:
        report.counts[label] = len(rows)
    return rows


def _prompt_row_problems(report: InputReport, spec: Any, rows: list) -> None:
    """What GRPO reads from the task prompts must be there (with no OpSwap rows to supply it): the
    answers the warm-up trains on (unless it has its own dataset), the column an exact-match reward
    compares with."""
    grpo = spec.training.grpo
    if grpo is None or spec.data.opswap is not None:
        return
    if grpo.warmup is not None and grpo.warmup.dataset is None and not any(r.get("reference") is not None
                                                                           for r in rows):
        report.problems.append(("training.grpo.warmup", "the warm-up trains on the task prompts' answers, but "
                                "data.train's rows are prompts only: set warmup.dataset to a chat dataset (e.g. the "
                                "EM dataset), or remove warmup"))
    for i, reward in enumerate(grpo.rewards):
        column = getattr(reward, "answer_field", None)
        if column and reward.applies_to != "safe" and not any(r.get(column) is not None for r in rows):
            report.problems.append((f"training.grpo.rewards.{i}", f"{reward.name} compares with the prompt rows' "
                                    f"{column!r} column, which data.train's rows do not have: train on OpSwap "
                                    "(data.opswap) or set answer_field to the column holding the answer"))


def _question_set(report: InputReport, spec: Any, eval_set: str, where: str, name: str, label: str) -> None:
    """An evaluation set's questions, read as the trial reads them (files checked, and with
    ``question_judge_prompts`` their judge prompts too)."""
    shipped = shipped_question_sets()
    if "/" not in name and not name.endswith((".yaml", ".yml", ".jsonl")) and name not in shipped:
        report.problems.append((where, f"no shipped question set {name!r}; {did_you_mean(name, shipped)} "
                                "(or give the path of a question file)"))
        return
    if "/" in name and not Path(name).is_file():
        return  # a missing file is one of the spec's own problems (emtune.spec_checks.local_file_problems)
    try:
        report.counts[label] = len(EVAL_SETS[eval_set].questions(spec, []).prompts)
    except (QuestionSetError, PromptFileError, OSError) as err:
        report.problems.append((where, _one_line(err)))


def _own_prompts(spec: Any, eval_set: Any) -> bool:
    """True when every question of a file-based set brings both judge prompts of its own."""
    if not spec.evaluation.question_judge_prompts:
        return False
    if eval_set.name == "in_domain" and spec.evaluation.in_domain.questions == "heldout":
        return False
    prompts = eval_set.questions(spec, []).prompts
    return bool(prompts) and all(p.judge_prompts and {"aligned", "coherent"} <= set(p.judge_prompts) for p in prompts)


def _judge_prompts(report: InputReport, spec: Any) -> None:
    """The judge prompt set loads and holds every prompt the judged sets name."""
    where = "evaluation.judge.prompt_version"
    version = spec.evaluation.judge.prompt_version
    if "/" in version and not Path(version).is_file():
        return  # reported as a missing file
    try:
        prompts = load_prompt_set(version)
        for eval_set in EVAL_SETS.values():
            if eval_set.judge_prompts is None or not eval_set.enabled(spec) or _own_prompts(spec, eval_set):
                continue
            missing = [name for name in eval_set.judge_prompts(spec) if name not in prompts.prompts]
            if missing:
                report.problems.append((where, f"the {eval_set.name!r} evaluation needs judge prompt(s) "
                                        f"{', '.join(map(repr, missing))}, which prompt set {prompts.version} does "
                                        f"not have; it has {', '.join(sorted(prompts.prompts))}"))
    except (QuestionSetError, PromptFileError, OSError) as err:
        report.problems.append((where, _one_line(err)))


def _persona_prompts(report: InputReport, where: str, name: str) -> None:
    folder = resources.files("emtune.defenses") / "persona_prompts"
    shipped = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
    if not name.endswith((".yaml", ".yml")):
        if name not in shipped:
            report.problems.append((where, f"no shipped persona prompt set {name!r}; {did_you_mean(name, shipped)} "
                                    "(or give the path of a YAML file)"))
        return
    from emtune.defenses.persona_vectors import PersonaVectorError, load_persona_prompts  # torch: user files only

    if not Path(name).is_file():
        return  # a missing file is one of the spec's own problems (emtune.spec_checks.local_file_problems)
    try:
        load_persona_prompts(name)
    except PersonaVectorError as err:
        report.problems.append((where, _one_line(err)))


def _hub_exists(report: InputReport, where: str, repo_id: str, kind: str) -> None:
    """Ask the Hugging Face Hub whether ``repo_id`` exists (no download)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        exists = HfApi().repo_exists(repo_id, repo_type=kind)
    except OfflineModeIsEnabled:
        report.unreachable.append(f"{where}: {repo_id}: HF_HUB_OFFLINE is set; unset it to check hub ids online")
        return
    except Exception as err:  # noqa: BLE001 - any network failure means "could not ask"
        report.unreachable.append(f"{where}: {repo_id}: cannot reach the Hugging Face Hub ({_one_line(err)})")
        return
    if not exists:
        report.problems.append((where, f"no {kind} {repo_id!r} on the Hugging Face Hub (or it is private: log in "
                                "with `hf auth login`); check the id"))


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())[:500]
