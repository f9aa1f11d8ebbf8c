"""Shared CLI plumbing: exit codes, and user errors as one clear message (never a traceback).

Exit codes (``emtune --help`` and docs/cli.md list them):

====  =====================================================================================
0     done
1     the work ran but failed: a study ended with no front, a Ray job FAILED or was STOPPED
2     bad input: a usage error, an invalid spec or input file, an unknown study, trial or metric
3     nothing qualifies: a valid question with an empty answer (no trial meets the bounds, the
      study has no completed trial yet); the answer printed says what is missing
4     a service did not answer: the MLflow tracking server, the Ray dashboard, the Hugging Face
      Hub (``validate --online``)
130   interrupted (Ctrl-C)
141   stdout was closed early (``emtune pareto ... | head -3``); ends quietly
====  =====================================================================================
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

OK, FAILED, USAGE_ERROR, NOTHING_QUALIFIES, UNAVAILABLE = 0, 1, 2, 3, 4
INTERRUPTED, CLOSED_PIPE = 130, 141
EXIT_CODES = {
    OK: "done",
    FAILED: "the work ran but failed (a study with no front, a Ray job FAILED or STOPPED)",
    USAGE_ERROR: "bad input (usage, an invalid spec or input file, an unknown study, trial or metric)",
    NOTHING_QUALIFIES: "nothing qualifies (no trial meets the bounds, no completed trial yet)",
    UNAVAILABLE: "a service did not answer (MLflow tracking server, Ray dashboard, Hugging Face Hub)",
    INTERRUPTED: "interrupted (Ctrl-C)",
    CLOSED_PIPE: "stdout closed early (e.g. `| head`): ends quietly",
}


class UserError(Exception):
    """A mistake in the user's input: printed without a traceback, exit status 2."""


def fail(message: str, code: int = USAGE_ERROR) -> None:
    """Print ``message`` to stderr and exit with ``code`` (bad input unless told otherwise)."""
    print(f"emtune: error: {message}", file=sys.stderr)
    raise SystemExit(code)


@dataclass
class Checked:
    """One checked spec: the spec (None when invalid), every problem as (path, message, line),
    what was read, and hub ids that were not or could not be checked."""

    file: Path
    spec: Any = None
    problems: list[tuple[str, str, int | None]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    unchecked: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)

    def render(self) -> str:
        """The problems as ``file:line: path: message`` lines."""
        from emtune.spec_errors import SpecError

        return SpecError(self.file, self.problems).render()


def check_spec_file(path: str | Path, inputs: bool = True, hub: str = "skip", overrides: Any = ()) -> Checked:
    """Check a spec file (with ``--set KEY=VALUE`` overrides): the spec itself and (``inputs``)
    every dataset, question set and prompt set it names, all problems together. ``hub``: skip,
    exists or load (emtune.spec_inputs)."""
    from emtune.config import check_spec
    from emtune.spec_errors import SpecError
    from emtune.spec_inputs import check_inputs

    try:
        check = check_spec(path, overrides=overrides or ())
    except SpecError as err:  # the file itself is missing or not YAML
        return Checked(Path(path), problems=list(err.problems))
    out = Checked(check.path, check.spec, list(check.problems))
    spec = check.spec or check.partial
    if inputs and spec is not None:
        report = check_inputs(spec, hub)  # type: ignore[arg-type]
        out.problems += check.locate(report.problems)
        out.counts, out.unchecked, out.unreachable = report.counts, report.unchecked, report.unreachable
    if out.problems:
        out.spec = None
    return out


def print_problems(checked: Checked) -> None:
    """Every problem of a checked spec on stderr, under a count line."""
    count = len(checked.problems)
    print(f"emtune: {count} problem{'s' if count != 1 else ''} in {checked.file}:", file=sys.stderr)
    print(checked.render(), file=sys.stderr)


def load_spec_or_exit(path: str, inputs: bool = False, hub: str = "skip", overrides: Any = ()) -> Any:
    """Load a spec (with ``--set`` overrides, and reading its inputs when asked), printing every
    problem and exiting 2 when anything is wrong."""
    checked = check_spec_file(path, inputs, hub, overrides)
    if checked.problems:
        print_problems(checked)
        raise SystemExit(USAGE_ERROR)
    return checked.spec


def add_set_option(parser: Any) -> None:
    """``--set KEY=VALUE`` (repeatable): override one spec field, e.g. ``--set model.source=tiny``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field before validation (dotted path, YAML value; repeatable), "
                             "e.g. --set model.source=tiny --set defenses.kl_to_reference.weight=0.1")


def resolve_study_dir(study: str, output_dir: str = "studies") -> Path:
    """A study given as its folder, its spec file, or its name under ``output_dir``."""
    candidate = Path(study).expanduser()
    if candidate.is_file() and candidate.suffix in (".yaml", ".yml"):
        from emtune.config import load_spec
        from emtune.spec_errors import SpecError

        try:  # only its name and output_dir matter here: its inputs need not exist any more
            candidate = load_spec(candidate, check_files=False).study_dir
        except SpecError as err:
            print_problems(Checked(err.path, problems=list(err.problems)))
            raise SystemExit(USAGE_ERROR) from None
    elif not candidate.is_dir():
        candidate = Path(output_dir) / study
    if not (candidate / "spec.yaml").is_file():
        fail(f"no study found at {study!r} (looked for {candidate / 'spec.yaml'}); "
             f"run `emtune run SPEC.yaml` first or pass the study folder")
    return candidate.resolve()


def load_study_spec(study_dir: Path, check_files: bool = False) -> Any:
    """The resolved spec a study was started with. Reading a finished study does not need its
    inputs; ``check_files`` (resume, which trains again) does."""
    from emtune.config import load_spec
    from emtune.spec_errors import SpecError

    try:
        return load_spec(study_dir / "spec.yaml", check_files=check_files)
    except SpecError as err:
        print_problems(Checked(err.path, problems=list(err.problems)))
        raise SystemExit(USAGE_ERROR) from None


def load_optuna_study(study_dir: Path, spec: Any) -> Any:
    """The study's persistent Optuna study, opened without writing anything; exits 3 when the
    study has not started a trial (no storage is created for it)."""
    import optuna

    from emtune.study.runner import OPTUNA_FILE

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = study_dir / OPTUNA_FILE
    if not db.is_file():  # opening a missing SQLite file would create it
        fail(f"{study_dir}: the study has not started a trial yet (no {OPTUNA_FILE}); "
             f"run `emtune run` on its spec", NOTHING_QUALIFIES)
    try:
        return optuna.load_study(study_name=spec.name, storage=f"sqlite:///{db}")
    except KeyError:
        fail(f"{study_dir}: no Optuna study named {spec.name!r} yet (the study has not started a trial)",
             NOTHING_QUALIFIES)


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
             f"{str(exc).splitlines()[0][:300]}. Start it, or check tracking.uri / MLFLOW_TRACKING_URI.",
             UNAVAILABLE)


@contextmanager
def exit_on_study_error(spec: Any) -> Iterator[None]:
    """Around running a study: a tracking outage exits 4 (:func:`exit_on_tracking_outage`), a Ray
    token file others can read and this user cannot fix exits 2, a failed study stage exits 1
    with its root cause. No stack trace either way."""
    from emtune.study.local_ray import TokenFileError
    from emtune.study.stages import StageFailed

    try:
        with exit_on_tracking_outage(spec):
            yield
    except TokenFileError as err:
        fail(str(err))
    except StageFailed as err:  # not the user's input: the work failed, with its cause
        fail(str(err), FAILED)


def check_tracking_login_or_exit(spec: Any) -> None:
    """For an ``http(s)://`` tracking server behind authentication (MLflow's basic-auth app, an
    ingress), one authenticated request before anything starts: a refused login exits 2 saying
    which variables to set. A server that does not answer is left to the study's retries."""
    import base64
    import os
    import urllib.error
    import urllib.request

    from emtune.tracking.mlflow_runs import tracking_uri

    uri = tracking_uri(spec)
    if not uri.startswith(("http://", "https://")):
        return
    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=10):
            return
    except urllib.error.HTTPError as err:
        if err.code not in (401, 403):
            return
        said = "refused this login" if user and password else "needs a login"
        fail(f"MLflow tracking server {uri} {said} (HTTP {err.code}): set MLFLOW_TRACKING_USERNAME and "
             "MLFLOW_TRACKING_PASSWORD in this shell to an MLflow user with access to the experiment "
             "(cluster/README.md, \"Where MLflow runs\")")
    except OSError:
        return  # not answering: `emtune run` says so and MLflow's retries wait for it
