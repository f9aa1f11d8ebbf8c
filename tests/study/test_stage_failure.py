"""A study stage that fails (here a Ray task raising, as persona extraction runs) stops the study
with its root cause: printed (exit 1, no stack trace) and on the study's MLflow run."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from emtune.config import load_spec
from emtune.study import stages


def test_a_failed_stage_says_why_on_the_parent_run_and_exits_1(write_spec, tmp_path, monkeypatch, capsys) -> None:
    from ray.exceptions import RayTaskError

    from emtune.cli.common import exit_on_study_error

    remote = ('ray::extract_to_file() (pid=12, ip=127.0.0.1)\n  File "/work/emtune/defenses/persona_vectors.py", '
              'line 210, in extract_to_file\n    raise KeyError(layer)\nKeyError: 7')
    error = RayTaskError("extract_to_file", remote, KeyError(7), pid=12, ip="127.0.0.1").as_instanceof_cause()

    def failing_stage(*args, **kwargs):
        raise error

    monkeypatch.setattr(stages, "prepare_stages", failing_stage)
    spec = load_spec(write_spec(name="stagefail"))
    spec.study_dir.mkdir(parents=True)
    expected = ("study stage failed: KeyError: 7\n"
                "  /work/emtune/defenses/persona_vectors.py:210 in extract_to_file: raise KeyError(layer)")
    with pytest.raises(SystemExit) as exit_info, exit_on_study_error(spec):
        stages.run_stages(spec, tmp_path / "cache", "tiny")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err  # MLflow's own INFO lines come first when it creates the store
    assert err.endswith(f"emtune: error: {expected}\n") and "Traceback" not in err

    client = MlflowClient(f"sqlite:///{spec.study_dir / 'mlflow.db'}")
    [parent] = client.search_runs([client.get_experiment_by_name("emtune/stagefail").experiment_id])
    assert parent.data.tags["emtune.role"] == "study" and parent.info.status == "FAILED"
    assert parent.data.tags["fail_reason"] == expected
