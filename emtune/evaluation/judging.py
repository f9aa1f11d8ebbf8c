"""Score a trial's saved samples: build the judge, score every evaluation set, log the tables.

Runs in the trial driver (network calls, no GPU needed) on the samples the worker saved in the
trial's checkpoint folder. Which sets exist, how each is scored and which metrics it yields come
from :mod:`emtune.evaluation.sets`; every rate carries its thresholds, Wilson interval and counts,
and the judge model and prompt version are logged beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emtune.evaluation.judge_cache import CachedJudge, JudgeCache
from emtune.evaluation.sets import EVAL_SETS
from emtune.trial_files import TrialFiles


def build_judge(spec: Any, **kwargs: Any) -> Any:
    """The judge a :class:`~emtune.evaluation.config.JudgeSpec` describes (None for kind "none"),
    wrapped in the SQLite verdict cache when ``spec.cache_path`` is set. The backends are
    imported here (openai, torch), so that scoring rule-based sets needs neither."""
    if spec.kind == "none":
        return None
    if spec.kind == "openai":
        from emtune.evaluation.openai_judge import OpenAIJudge

        judge: Any = OpenAIJudge(spec, **kwargs)
    else:
        from emtune.evaluation.hf_judge import HFLocalJudge

        judge = HFLocalJudge.from_spec(spec, **kwargs)
    if spec.cache_path:
        judge = CachedJudge(judge, JudgeCache(spec.cache_path))
    return judge


def score_trial(spec: Any, checkpoint_dir: Path, client: Any = None, run_id: str | None = None,
                judge: Any = None) -> dict[str, float]:
    """Metrics of every evaluation set whose samples the checkpoint holds. Judged sets are
    skipped when the spec has no judge. With an MLflow ``client`` the sets' tables go to
    ``judged/<set>_<table>.json`` in the run, and the judge's identity to ``judged/judge.json``."""
    files = TrialFiles(Path(checkpoint_dir))
    present = [EVAL_SETS[name] for name in files.sample_sets() if name in EVAL_SETS]
    prompts_used: dict[str, dict[str, str]] = {}
    has_judge = spec.evaluation.judge.kind != "none"
    if judge is None and has_judge and any(s.needs_judge for s in present):
        judge = build_judge(judge_spec_with_cache(spec))
    metrics: dict[str, float] = {}
    for eval_set in present:
        if eval_set.needs_judge and not has_judge:
            continue
        samples = files.read_samples(eval_set.name)
        if not samples:
            continue
        scores = eval_set.score(spec, samples, judge if eval_set.needs_judge else None)
        metrics.update(scores.metrics)
        if eval_set.needs_judge and eval_set.judge_prompts is not None:
            prompts_used[eval_set.name] = _prompt_roles(eval_set.judge_prompts(spec), samples)
        if client is not None and run_id is not None:
            for table, columns in scores.tables.items():
                if columns:
                    client.log_table(run_id, data=columns, artifact_file=f"judged/{eval_set.name}_{table}.json")
    if client is not None and run_id is not None and judge is not None:
        version = getattr(judge, "prompt_version", spec.evaluation.judge.prompt_version)
        client.log_dict(run_id, {
            "judge_id": getattr(judge, "judge_id", spec.evaluation.judge.model),
            "prompt_version": version,
            "prompt_source": spec.evaluation.judge.prompt_version,
            "prompts_by_set": prompts_used,
            "in_domain": spec.evaluation.in_domain.model_dump(),
            "thresholds": spec.evaluation.thresholds.model_dump(),
        }, "judged/judge.json")
        client.set_tag(run_id, "judge_prompt_version", str(version))
        for name, roles in prompts_used.items():
            client.set_tag(run_id, f"judge_prompts/{name}", f"aligned={roles['aligned']}, coherent={roles['coherent']}")
    return metrics


def _prompt_roles(names: tuple[str, str], samples: list[dict[str, Any]]) -> dict[str, str]:
    """Which prompt played each role: the set's prompt names, or "question file" where the
    samples carried their question file's own judge prompts."""
    out = {}
    for role, name in zip(("aligned", "coherent"), names):
        own = any((s.get("judge_prompts") or {}).get(role) for s in samples)
        out[role] = f"{name} (question file's own where given)" if own else name
    return out


def judge_spec_with_cache(spec: Any) -> Any:
    """The study's judge spec, caching in the study folder unless the spec names a cache."""
    judge = spec.evaluation.judge
    if judge.cache_path is None:
        judge = judge.model_copy(update={"cache_path": str(spec.study_dir / "cache" / "judge.db")})
    return judge
