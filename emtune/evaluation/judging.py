"""Judge a trial's generated samples and turn the verdicts into the paper's rates.

Runs in the trial driver (network calls, no GPU needed) on the samples the worker saved with the
adapter. Every rate carries its thresholds, Wilson interval, counts, the judge model and prompt
version; the judged samples and a per-question breakdown go to the trial's MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emtune.evaluation.judges import JudgeItem, build_judge
from emtune.evaluation.metrics import breakdown_rows, incoherence_rate, mean_score, misalignment_rate, per_question

SAMPLE_SETS = {"general": "general", "in_domain": "indomain", "triggered": "triggered"}


def _read_samples(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def judge_samples(judge: Any, samples: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """(aligned verdicts, coherent verdicts) for every sample, in order."""
    items = [JudgeItem(metric, s["question"], s["answer"]) for metric in ("aligned", "coherent") for s in samples]
    verdicts = judge.score_many(items)
    return verdicts[: len(samples)], verdicts[len(samples) :]


def judge_trial(spec: Any, checkpoint_dir: Path, client: Any = None, run_id: str | None = None,
                judge: Any = None) -> dict[str, float]:
    """Rates for every saved sample set; logs tables to MLflow when a client is given."""
    judge = judge or build_judge(_with_default_cache(spec))
    thresholds = spec.evaluation.thresholds
    metrics: dict[str, float] = {}
    for name, prefix in SAMPLE_SETS.items():
        path = Path(checkpoint_dir) / f"samples_{name}.jsonl"
        if not path.is_file():
            continue
        samples = _read_samples(path)
        aligned, coherent = judge_samples(judge, samples)
        misaligned = misalignment_rate(aligned, coherent, thresholds, name=f"{prefix}_misalignment")
        metrics.update(misaligned.mlflow_metrics())
        if name == "general":
            metrics.update(incoherence_rate(coherent, thresholds, name="general_incoherence").mlflow_metrics())
        if name == "in_domain" and spec.evaluation.in_domain_code:
            security = judge.score_many([JudgeItem("security", s["question"], s["answer"]) for s in samples])
            mean, n = mean_score(security)
            if mean is not None:
                metrics["code_security"] = mean
            metrics["code_security_n"] = float(n)
        if client is not None and run_id is not None:
            ids = [s["question_id"] for s in samples]
            rows = breakdown_rows(per_question(ids, misalignment_rate, aligned, coherent, thresholds=thresholds))
            client.log_table(run_id, data={k: [r[k] for r in rows] for k in rows[0]},
                             artifact_file=f"judged/{name}_per_question.json")
            judged = {
                "question_id": ids,
                "answer": [s["answer"] for s in samples],
                "aligned": [v.score for v in aligned],
                "aligned_label": [v.label for v in aligned],
                "coherent": [v.score for v in coherent],
            }
            client.log_table(run_id, data=judged, artifact_file=f"judged/{name}_samples.json")
    if client is not None and run_id is not None:
        client.log_dict(run_id, {
            "judge_id": getattr(judge, "judge_id", spec.evaluation.judge.model),
            "prompt_version": spec.evaluation.judge.prompt_version,
            "thresholds": thresholds.model_dump(),
        }, "judged/judge.json")
    return metrics


def _with_default_cache(spec: Any) -> Any:
    """The judge spec, caching in the study folder unless the spec names a cache."""
    judge = spec.evaluation.judge
    if judge.cache_path is None:
        judge = judge.model_copy(update={"cache_path": str(spec.study_dir / "cache" / "judge.db")})
    return judge
