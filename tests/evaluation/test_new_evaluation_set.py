"""Adding an evaluation is one entry in the evaluation table: a throwaway set with a rule-based
scorer becomes a metric a spec can optimise, is generated in the worker, scored from the saved
samples, and lands in the paper-format columns, without any other emtune file changing."""

from __future__ import annotations

import pytest

from emtune.evaluation import sets
from emtune.evaluation.metrics import rate_from_flags
from emtune.evaluation.samples import Prompt
from emtune.evaluation.scoring import SetScores

QUESTIONS = [("greet", "Say hello."), ("count", "Count to three."), ("name", "What is your name?")]


def short_answers(spec, samples, judge):
    """Rule: an answer of at most 3 characters is 'terse'; the rate of terse answers."""
    assert judge is None
    flags = [len(s["answer"]) <= 3 for s in samples]
    return SetScores(rate_from_flags("terse_rate", flags).mlflow_metrics(),
                     {"samples": {"answer": [s["answer"] for s in samples]}})


TERSE = sets.EvalSet(
    name="terse",
    doc="three small questions; the rate of answers of at most 3 characters",
    questions=lambda spec, rows: sets.Questions([Prompt(qid, text) for qid, text in QUESTIONS], "terse-v1"),
    enabled=lambda spec: True,
    score=short_answers,
    metrics=(sets.MetricInfo("terse_rate", "fraction of answers of at most 3 characters", rate=True,
                             label="terse answers"),),
    max_new_tokens=3,
    paper_columns=("terse_rate",),
)


@pytest.fixture
def terse(monkeypatch):
    monkeypatch.setitem(sets.EVAL_SETS, "terse", TERSE)
    return TERSE


def test_rule_scored_set_is_a_metric_generated_scored_and_reported(terse, write_spec, tmp_path) -> None:
    from emtune.config import load_spec
    from emtune.evaluation.judging import score_trial
    from emtune.models import model_cache_dir, resolve_source
    from emtune.train.worker import run_training
    from emtune.trial_files import TrialFiles

    path = write_spec()
    path.write_text(path.read_text().replace("name: indomain_nll, direction: minimize",
                                             "name: terse_rate, direction: maximize"))
    spec = load_spec(path)
    assert [o.name for o in spec.objectives] == ["ood_drift", "terse_rate"]
    assert "terse answers" in [m.title for m in sets.paper_columns()]

    metrics = run_training(spec, tmp_path / "trial", resolve_source(spec.model, model_cache_dir()))
    files = TrialFiles(tmp_path / "trial")
    samples = files.read_samples("terse")
    assert [s["question_id"] for s in samples] == ["greet", "count", "name"]
    metrics.update(score_trial(spec, tmp_path / "trial"))
    expected = sum(len(s["answer"]) <= 3 for s in samples) / 3  # written out from the saved answers
    assert metrics["terse_rate"] == pytest.approx(expected)
    assert metrics["terse_rate_n"] == 3.0


def test_its_metric_is_unknown_once_the_set_is_gone(write_spec) -> None:
    from emtune.config import load_spec
    from emtune.spec_errors import SpecError

    path = write_spec()
    path.write_text(path.read_text().replace("name: indomain_nll", "name: terse_rate"))
    with pytest.raises(SpecError, match="unknown metric 'terse_rate'"):
        load_spec(path)


def test_short_answers_rule_by_hand() -> None:
    samples = [{"answer": "hi"}, {"answer": "hello"}, {"answer": "1 2"}, {"answer": "four"}]
    scores = short_answers(None, samples, None)
    assert scores.metrics["terse_rate"] == 0.5 and scores.metrics["terse_rate_n"] == 4.0
