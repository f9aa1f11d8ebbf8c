"""What a report or a recommendation shows about a study: its trials, their MLflow metrics, and
the formatters every page uses.

Sources: the Optuna study is the truth for outcomes, ranks and hypervolume (as for
``emtune pareto``); MLflow adds every metric a trial logged (judge rates with their Wilson
bounds), its params and tags, and the run ids the page links to. A study whose MLflow store is
missing still gets a report, from Optuna alone, with a note saying so.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from emtune.config import load_spec
from emtune.evaluation.sets import MODEL_METRICS
from emtune.tracking.front import FrontTable, TrialRow, front_table

MARKER = "<!-- emtune report -->"
#: Judge-free metrics every paper-format table shows beside the judged columns.
JUDGE_FREE_COLUMNS = (MODEL_METRICS["ood_drift"], MODEL_METRICS["indomain_nll"])
ARROWS = {"minimize": "↓", "maximize": "↑"}


class ReportError(ValueError):
    """A study cannot be reported (no spec, no Optuna study) or ``out_dir`` is not ours."""


class NotStarted(ReportError):
    """The study has not started a trial: there is nothing to show yet."""


@dataclass
class TrialRecord:
    """One trial: its row in the front table plus what its MLflow run holds."""

    row: TrialRow
    metrics: dict[str, float] = field(default_factory=dict)
    run_params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    run_name: str | None = None
    adapter_uri: str | None = None


@dataclass
class StudyData:
    """Everything a report or a recommendation shows about one study."""

    name: str
    study_dir: Path
    spec: Any
    spec_yaml: str
    tracking_uri: str
    table: FrontTable
    trials: list[TrialRecord]
    study_attrs: dict[str, Any]
    experiment_id: str | None = None
    parent_run_id: str | None = None
    mlflow_note: str | None = None
    #: Metrics of every evaluated MLflow run of the study (trials, their checkpoints, baselines).
    evaluated: list[dict[str, float]] = field(default_factory=list)

    @property
    def defenses(self) -> str:
        """The study's defenses list, the legend label of its front."""
        return " + ".join(d.name for d in self.spec.defenses) or "none"

    @property
    def local_tracking(self) -> bool:
        """True when the MLflow store is a file in reach (served by ``emtune ui`` on 127.0.0.1)."""
        return self.tracking_uri.startswith(("sqlite:", "file:"))

    def run_url(self, run_id: str | None = None, port: int = 5000) -> str | None:
        """MLflow UI address of the experiment or one run (local stores: via ``emtune ui``)."""
        if self.experiment_id is None:
            return None
        base = f"http://127.0.0.1:{port}" if self.local_tracking else self.tracking_uri.rstrip("/")
        if not base.startswith(("http://", "https://")):
            return None
        url = f"{base}/#/experiments/{self.experiment_id}/runs"
        # MLflow 3 opens an untagged experiment in its GenAI view; ask for the runs table.
        return f"{url}/{run_id}" if run_id else f"{url}?workflowType=machine_learning"


def load_study_data(study_dir: Path) -> StudyData:
    """Read a study folder: its resolved spec, the Optuna study and (when present) MLflow runs.

    Raises :class:`ReportError` for a folder that holds no started study, and
    ``emtune.spec_errors.SpecError`` for an invalid ``spec.yaml``.
    """
    study_dir = Path(study_dir).resolve()
    spec_file, db = study_dir / "spec.yaml", study_dir / "optuna.db"
    if not spec_file.is_file():
        raise ReportError(f"{study_dir}: no spec.yaml here (not a study folder)")
    spec = load_spec(spec_file, check_files=False)  # a finished study stays readable when its inputs move
    if not db.is_file():  # checked first: opening a missing SQLite file would create it
        raise NotStarted(f"{study_dir}: the study has not started a trial yet (no Optuna storage at {db})")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{db}")
    except KeyError:
        raise NotStarted(f"{db}: no Optuna study named {spec.name!r} yet (the study has not started a trial)") from None
    objectives = [o.name for o in spec.objectives]
    refs = [o.reference for o in spec.objectives]
    table = front_table(study, objectives, [o.direction for o in spec.objectives],
                        None if None in refs else refs)
    records = [TrialRecord(row, dict(zip(objectives, row.values or [])), adapter_uri=row.adapter_uri)
               for row in table.rows]
    # The spec's own study_dir resolves output_dir against the cwd; the folder we read is surer.
    uri = spec.tracking.uri or f"sqlite:///{study_dir / 'mlflow.db'}"
    data = StudyData(spec.name, study_dir, spec, spec_file.read_text(encoding="utf-8"), uri, table,
                     records, dict(study.user_attrs))
    _attach_mlflow(data)
    return data


def _attach_mlflow(data: StudyData) -> None:
    """Add MLflow metrics, params and tags to the trials (objective values from Optuna win)."""
    if data.tracking_uri.startswith("sqlite:///") and not Path(data.tracking_uri[10:]).is_file():
        data.mlflow_note = f"no MLflow store at {data.tracking_uri}: metrics come from Optuna only"
        return
    from mlflow.tracking import MlflowClient

    from emtune.tracking.mlflow_runs import ROLE_TAG, STUDY_TAG, experiment_name

    try:
        client = MlflowClient(data.tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name(data.spec))
        if experiment is None:
            data.mlflow_note = f"no experiment {experiment_name(data.spec)!r} in {data.tracking_uri}"
            return
        runs = client.search_runs([experiment.experiment_id], f"tags.`{STUDY_TAG}` = '{data.name}'",
                                  max_results=50000)
    except Exception as err:  # noqa: BLE001 - a report from Optuna alone beats no report
        data.mlflow_note = f"could not read MLflow at {data.tracking_uri}: {type(err).__name__}: {err}"
        return
    data.experiment_id = experiment.experiment_id
    by_id = {run.info.run_id: run for run in runs}
    data.parent_run_id = next((r.info.run_id for r in runs if r.data.tags.get(ROLE_TAG) == "study"), None)
    data.evaluated = [dict(r.data.metrics) for r in runs if r.data.tags.get(ROLE_TAG) != "study"]
    for record in data.trials:
        run = by_id.get(record.row.mlflow_run_id or "")
        if run is not None:
            record.metrics = {**run.data.metrics, **record.metrics}
            record.run_params, record.tags = dict(run.data.params), dict(run.data.tags)
            record.run_name = run.info.run_name


def shown_path(path: Path | str) -> str:
    """A path relative to the working folder when under it (reports get committed)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def shown_uri(uri: str) -> str:
    """A tracking URI with a local SQLite path shown relative to the working folder."""
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + shown_path(uri[10:])
    return uri


def fmt_value(value: Any) -> str:
    """Numbers to 4 significant digits; everything else as text."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def fmt_rate(metrics: dict[str, float], name: str) -> str:
    """``x.xx% [lo, hi]`` (Wilson 95% bounds, in percent) when logged; ``n/a`` when absent."""
    value = metrics.get(name)
    if value is None:
        return "n/a"
    low, high = metrics.get(f"{name}_low"), metrics.get(f"{name}_high")
    if low is None or high is None:
        return f"{100 * value:.2f}%"
    return f"{100 * value:.2f}% [{100 * low:.2f}, {100 * high:.2f}]"


def setting_of(study: StudyData, record: TrialRecord) -> str:
    """Defense + setting, e.g. ``kl_to_reference (kl_weight=0.0123)``, and ``@ step N`` for a
    checkpoint candidate (the fine-tune stopped there)."""
    params = ", ".join(f"{k}={fmt_value(v)}" for k, v in sorted(record.row.params.items()))
    setting = f"{study.defenses} ({params})" if params else study.defenses
    return f"{setting} @ step {record.row.step}" if record.row.checkpoint else setting


def generated_at() -> str:
    """UTC time stamp shown on the page."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
