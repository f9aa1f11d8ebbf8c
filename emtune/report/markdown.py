"""The Markdown page of ``emtune report``: overview, figures, the paper-format table, per study
the front table with MLflow links, every trial, evaluation versions and the resolved spec.

Pure string building over :class:`emtune.report.data.StudyData` (no I/O), so the page is testable
without a study on disk.
"""

from __future__ import annotations

from typing import Any

from emtune.data.opswap import questions_version
from emtune.evaluation.prompt_files import load_prompt_set
from emtune.evaluation.questions import load_question_set
from emtune.numbers import distinct_digits, format_number
from emtune.evaluation.sets import paper_columns
from emtune.report.comparisons import early_stopping_section, monitor_section
from emtune.report.data import (
    ARROWS,
    MARKER,
    StudyData,
    TrialRecord,
    fmt_value,
    generated_at,
    shown_path,
    shown_uri,
)
from emtune.report.paper_table import markdown_cells, paper_rows


def cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def run_link(run_id: str | None) -> str:
    """An MLflow run as a ``runs:/<id>`` link (resolved against the study's tracking URI)."""
    return f"[runs:/{run_id}](runs:/{run_id})" if run_id else "-"


def render(studies: list[StudyData], slugs: list[str], figures: dict[str, str], skipped: list[str]) -> str:
    """The whole README.md."""
    names = ", ".join(s.name for s in studies)
    out = [MARKER, f"# emtune report: {names}", "",
           f"Generated {generated_at()} by `emtune report` from "
           + ", ".join(f"`{shown_path(s.study_dir)}`" for s in studies)
           + ". Interactive front: [front.html](front.html) (self-contained, no network).", ""]
    out += _overview(studies)
    out += ["## Fronts", "", f"![every study's front]({figures['overlay']})", "",
            "Each colour is one study, labelled by its defenses; filled markers joined by a line are "
            "the Pareto front, hollow ones dominated trials, crosses infeasible trials.", ""]
    if skipped:
        out += [f"Not overlaid (other objectives than the first study's): {', '.join(skipped)}.", ""]
    out += ["## Hypervolume by completed trial", "", f"![hypervolume]({figures['hypervolume']})", ""]
    out += paper_table(studies)
    for study, slug in zip(studies, slugs):
        out += _study_section(study, slug)
    return "\n".join(out).rstrip() + "\n"


def _overview(studies: list[StudyData]) -> list[str]:
    rows = []
    for s in studies:
        t = s.table
        objectives = ", ".join(f"{n} {ARROWS[d]}" for n, d in zip(t.objectives, t.directions))
        hv = f"{t.hypervolume[-1]:.4g} (reference {t.reference}, {t.reference_source})" if t.hypervolume else "n/a"
        rows.append([s.name, s.defenses, objectives, _counts(s), len(t.front), hv])
    return ["## Overview", "", *table(["study", "defenses", "objectives", "trials by state", "front size",
                                       "hypervolume"], rows), ""]


def _counts(study: StudyData) -> str:
    return ", ".join(f"{k.lower()} {v}" for k, v in sorted(study.table.counts().items())) or "none"


def paper_table(studies: list[StudyData]) -> list[str]:
    """The per-defense table in the paper's format (:mod:`emtune.report.paper_table`): per study
    its baselines, then one row per front member with its Δ vs the undefended baseline.

    Judge rates show as ``x.xx% [lo, hi]`` with their Wilson 95% bounds; a judged column no row
    reports is left out, and the judge-free metrics are always shown beside them.
    """
    columns, rows = paper_rows(studies)
    header = ["study", "defense (setting)", *(m.title for m in columns)]
    cells = [[r.study, r.label if r.kind == "front" else f"*{r.label}*", *markdown_cells(r, columns)] for r in rows]
    out = ["## Per-defense results (the paper's format)", "",
           "Per study: its baselines (*base model*: before fine-tuning; *undefended fine-tune*: the same "
           "fine-tune with no defense), then one row per Pareto-front setting with its difference from the "
           "undefended baseline (Δ; rates in percentage points). Rates are % of responses with Wilson 95% "
           "intervals; in-domain misalignment is the narrow behaviour learned (higher = learned). The same "
           "table as [CSV](paper_table.csv) and [LaTeX](paper_table.tex).", ""]
    if not any(r.kind == "front" for r in rows):
        return out + ["No completed trial yet.", ""]
    out += table(header, cells)
    missing = [m.title for m in paper_columns() if m not in columns]
    if missing:
        out += ["", f"Not reported by any row: {', '.join(missing)} (judge rates need "
                    "`evaluation.judge`; the benign score needs `data.opswap`). Judge-free metrics are always shown."]
    return out + [""]


def _front_records(study: StudyData) -> list[TrialRecord]:
    by_number = {r.row.number: r for r in study.trials}
    return [by_number[row.number] for row in study.table.front]


def _study_section(study: StudyData, slug: str) -> list[str]:
    t = study.table
    out = [f"## Study `{study.name}`", "",
           f"- defenses: {study.defenses}",
           f"- folder: `{shown_path(study.study_dir)}`",
           f"- MLflow tracking URI: `{shown_uri(study.tracking_uri)}`"
           + (f", experiment id {study.experiment_id}" if study.experiment_id else ""),
           f"- parent run: {run_link(study.parent_run_id)}" if study.parent_run_id else "- parent run: -"]
    if study.local_tracking and study.experiment_id:
        out.append(f"- browse: `emtune ui {shown_path(study.study_dir)}`, then {study.run_url()}")
    out += [f"- Optuna: `optuna-dashboard sqlite:///{shown_path(study.study_dir / 'optuna.db')}`",
            f"- sampler: `{study.study_attrs.get('sampler', 'not recorded')}`",
            f"- trials by state: {_counts(study)}"]
    trials = sum(t.counts().values())
    if trials and t.candidates:
        out.append(f"- candidates: {t.candidates} ({t.candidates / trials:.1f} per trial: each evaluated "
                   f"checkpoint counts; `7 @ step 300` is trial 7 stopped at step 300), {len(t.front)} on the front")
    if study.mlflow_note:
        out.append(f"- note: {study.mlflow_note}")
    out += ["", f"![{study.name} front](front_{slug}.png)", "", "### Pareto front", ""]
    out += _trials_table(study, _front_records(study)) if t.front else ["No completed feasible trial yet."]
    everything = sorted(study.trials, key=lambda r: (r.row.trial, r.row.checkpoint, r.row.step or 0))
    out += ["", "<details><summary>Every trial and checkpoint (dominated, infeasible, pruned, failed)</summary>",
            "", *_trials_table(study, everything, reasons=True), "", "</details>", ""]
    out += early_stopping_section(study) + monitor_section(study)
    out += versions(study)
    out += ["<details><summary>Resolved spec</summary>", "", "```yaml", study.spec_yaml.rstrip(), "```", "",
            "</details>", ""]
    return out


def _trials_table(study: StudyData, records: list[TrialRecord], reasons: bool = False) -> list[str]:
    t = study.table
    params = sorted({k for r in records for k in r.row.params})
    header = ["trial", "rank", *(f"{n} {ARROWS[d]}" for n, d in zip(t.objectives, t.directions)), *params,
              "state", "Ray trial", "MLflow run"] + (["note"] if reasons else [])
    rows = []
    # as many digits as it takes to tell the column's values apart (at least 4)
    digits = [distinct_digits([r.row.values[i] for r in records if r.row.values]) for i in range(len(t.objectives))]
    pdigits = {p: distinct_digits([r.row.params.get(p) for r in records]) for p in params}
    for r in records:
        row = r.row
        rank = "-" if row.rank is None else row.rank
        if row.state == "COMPLETE" and not row.feasible:
            rank = "infeasible"
        values = [format_number(v, d) for v, d in zip(row.values, digits)] if row.values else ["-"] * len(t.objectives)
        cells = [row.label, rank, *values, *(format_number(row.params.get(p), pdigits[p]) for p in params), row.state,
                 row.ray_trial_id or "-", run_link(row.mlflow_run_id)]
        if reasons:  # the first line of a failure reason; the full text is in the trial's MLflow run
            cells.append(row.fail_reason.splitlines()[0][:120] if row.fail_reason else "")
        rows.append(cells)
    return table(header, rows)


def versions(study: StudyData) -> list[str]:
    """What the numbers were measured with: each question set (file and content hash, or the
    shipped set and its wording note), the in-domain domain and its judge prompts, OpSwap's
    construction, the judge and its prompt version; then what the trials themselves recorded."""
    ev = study.spec.evaluation
    lines = [f"- general questions: {_question_set_line(ev.question_set)}"]
    if ev.triggered_question_set:
        lines.append(f"- triggered questions: {_question_set_line(ev.triggered_question_set)}"
                     + ("; asked only with a judge" if ev.judge.kind == "none" else ""))
    source = ("held-out prompts of the training data (`evaluation.heldout_questions`)"
              if ev.in_domain.questions == "heldout" else _question_set_line(ev.in_domain.questions))
    aligned, coherent = ev.in_domain.prompts
    lines.append(f"- in-domain questions: {source}; domain `{ev.in_domain.domain}`, judged with `{aligned}` as "
                 f"aligned and `{coherent}` as coherent")
    if ev.question_judge_prompts:
        lines.append("- judge prompts: each question file's own, where its questions carry them")
    if study.spec.data.opswap is not None:
        opswap = study.spec.data.opswap
        told = "rules stated in a system message" if opswap.rules_prompt else "rules not told (learned from rows)"
        lines.append(f"- benign task: OpSwap `{questions_version(opswap)}`, tiers {list(opswap.tiers)}, "
                     f"{opswap.n_test_per_tier} test rows per tier, {told}")
    judge = ev.judge
    if judge.kind == "none":
        lines.append("- judge: none (judge-free metrics only)")
    else:
        lines.append(f"- judge: `{judge.judge_id}`, prompts {_prompt_set_line(judge.prompt_version)}, thresholds "
                     + ", ".join(f"{k}={v:g}" for k, v in ev.thresholds.model_dump().items()))
    found: dict[str, set[str]] = {}
    for record in study.trials:
        for key, value in {**record.run_params, **record.tags}.items():
            if "version" in key or key.startswith("judge"):
                found.setdefault(key, set()).add(value)
    lines += [f"- {key} (trials): {', '.join(sorted(vals))}" for key, vals in sorted(found.items())]
    return ["### Evaluation versions", "", *lines, ""]


def _question_set_line(name: str) -> str:
    """A question set as the report names it: a file with its sha256, or a shipped set with its note."""
    questions = _read(load_question_set, name)
    if isinstance(questions, str):
        return questions
    if questions.sha256:
        return (f"file `{questions.source}` (sha256 `{questions.sha256}`, version `{questions.version}`, "
                f"{len(questions)} questions)")
    note = f"; {questions.description}" if questions.description else ""
    return f"shipped `{name}` (version `{questions.version}`, {len(questions)} questions{note})"


def _prompt_set_line(source: str) -> str:
    """A judge prompt set: its version, and for a file the path and sha256."""
    prompts = _read(load_prompt_set, source)
    if isinstance(prompts, str):
        return prompts
    if prompts.sha256:
        return f"`{prompts.version}` from file `{prompts.path}` (sha256 `{prompts.sha256}`)"
    return f"`{prompts.version}` (shipped, emtune's wording)"


def _read(loader: Any, name: str) -> Any:
    """``loader(name)``, or a note when the file cannot be read now (a moved user file must not
    sink the report)."""
    try:
        return loader(name)
    except Exception as err:  # noqa: BLE001
        return f"`{name}` (unreadable now: {type(err).__name__})"
