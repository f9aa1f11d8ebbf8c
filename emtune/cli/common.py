"""Shared CLI plumbing: user errors become one clear message and exit status 2."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from emtune.spec_errors import SpecError

USAGE_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input: printed without a traceback, exit status 2."""


def fail(message: str) -> None:
    """Print ``message`` to stderr and exit with status 2."""
    print(f"emtune: error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def load_spec_or_exit(path: str, overrides: Any = ()) -> Any:
    """Load a spec (with ``--set KEY=VALUE`` overrides), printing every problem and exiting 2
    when it is invalid."""
    from emtune.config import load_spec

    try:
        return load_spec(path, overrides or ())
    except SpecError as err:
        count = len(err.problems)
        print(f"emtune: {count} problem{'s' if count != 1 else ''} in {err.path}:", file=sys.stderr)
        print(err.render(), file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None


def check_inputs_or_exit(spec: Any) -> dict[str, int]:
    """Read every dataset, question set and judge prompt set the study needs; exit 2 on the
    first bad one."""
    from emtune.data.loading import DataError, load_rows
    from emtune.evaluation.prompt_files import PromptFileError
    from emtune.evaluation.questions import QuestionSetError

    counts: dict[str, int] = {}
    try:
        if spec.data.train is not None:
            counts["train rows"] = len(load_rows(spec.data.train))
        if spec.data.safety_pool is not None:
            counts["safety pool rows"] = len(load_rows(spec.data.safety_pool))
        counts.update(_question_counts(spec))
        if spec.evaluation.judge.kind != "none":
            _check_judge_prompts(spec)
    except (DataError, QuestionSetError, PromptFileError) as err:
        fail(str(err))
    return counts


def _question_counts(spec: Any) -> dict[str, int]:
    """Questions per evaluation set that does not need the training rows (files checked, and with
    ``question_judge_prompts`` their judge prompts too)."""
    from emtune.evaluation.sets import EVAL_SETS, judged

    ev = spec.evaluation
    counts = {"general questions": len(EVAL_SETS["general"].questions(spec, []).prompts)}
    if judged(spec) and ev.triggered_question_set:
        counts["triggered questions"] = len(EVAL_SETS["triggered"].questions(spec, []).prompts)
    if judged(spec) and ev.in_domain.questions != "heldout":
        counts["in-domain questions"] = len(EVAL_SETS["in_domain"].questions(spec, []).prompts)
    return counts


def _own_prompts(spec: Any, eval_set: Any) -> bool:
    """True when every question of a file-based set brings both judge prompts of its own."""
    if not spec.evaluation.question_judge_prompts:
        return False
    if eval_set.name == "in_domain" and spec.evaluation.in_domain.questions == "heldout":
        return False
    prompts = eval_set.questions(spec, []).prompts
    return bool(prompts) and all(p.judge_prompts and {"aligned", "coherent"} <= set(p.judge_prompts) for p in prompts)


def _check_judge_prompts(spec: Any) -> None:
    """The judge prompt set loads and holds every prompt the judged sets name."""
    from emtune.evaluation.prompt_files import PromptFileError, load_prompt_set
    from emtune.evaluation.sets import EVAL_SETS

    prompts = load_prompt_set(spec.evaluation.judge.prompt_version)
    for eval_set in EVAL_SETS.values():
        if eval_set.judge_prompts is None or not eval_set.enabled(spec) or _own_prompts(spec, eval_set):
            continue
        missing = [name for name in eval_set.judge_prompts(spec) if name not in prompts.prompts]
        if missing:
            raise PromptFileError(
                f"the {eval_set.name!r} evaluation needs judge prompt(s) {', '.join(map(repr, missing))}, which "
                f"prompt set {prompts.version} (evaluation.judge.prompt_version) does not have; it has "
                f"{', '.join(sorted(prompts.prompts))}")


def add_set_option(parser: Any) -> None:
    """``--set KEY=VALUE`` (repeatable): override one spec field, e.g. ``--set model.source=tiny``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field before validation (dotted path, YAML value; repeatable), "
                             "e.g. --set model.source=tiny --set defenses.kl_to_reference.weight=0.1")


def resolve_study_dir(study: str, output_dir: str = "studies") -> Path:
    """A study given as its folder, its spec file, or its name under ``output_dir``."""
    candidate = Path(study).expanduser()
    if candidate.is_file() and candidate.suffix in (".yaml", ".yml"):
        spec = load_spec_or_exit(str(candidate))
        candidate = spec.study_dir
    elif not candidate.is_dir():
        candidate = Path(output_dir) / study
    if not (candidate / "spec.yaml").is_file():
        fail(f"no study found at {study!r} (looked for {candidate / 'spec.yaml'}); "
             f"run `emtune run SPEC.yaml` first or pass the study folder")
    return candidate.resolve()


def load_study_spec(study_dir: Path) -> Any:
    """The resolved spec a study was started with."""
    return load_spec_or_exit(str(study_dir / "spec.yaml"))


def load_optuna_study(study_dir: Path, spec: Any) -> Any:
    """The study's persistent Optuna study (read-only use); exit 2 when it has not started."""
    import optuna

    from emtune.study.runner import StudyPaths

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=spec.name, storage=StudyPaths(study_dir).optuna_url)
    except KeyError:
        fail(f"{study_dir}: no Optuna study named {spec.name!r} yet (the study has not started a trial)")


@contextmanager
def exit_on_tracking_outage(spec: Any) -> Iterator[None]:
    """Turn "the MLflow server never answered" (past ``tracking.retries``) into a one-line error
    and exit status 2 instead of a stack trace; any other error propagates."""
    try:
        yield
    except Exception as exc:
        from emtune.tracking.mlflow_runs import tracking_outage, tracking_uri

        if not tracking_outage(exc):
            raise
        fail(f"MLflow tracking server {tracking_uri(spec)} unreachable after tracking.retries: "
             f"{str(exc).splitlines()[0][:300]}. Start it, or check tracking.uri / MLFLOW_TRACKING_URI.")
