"""CLI: user mistakes exit 2 with a clear message and start or write nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from emtune.cli.main import main


def test_validate_ok(write_spec, capsys) -> None:
    assert main(["validate", str(write_spec())]) == 0
    assert "ok: study 'tiny'" in capsys.readouterr().out


def test_bad_spec_exits_2_and_writes_nothing(write_spec, capsys, tmp_path) -> None:
    path = write_spec()
    path.write_text(path.read_text().replace("max_steps:", "max_stepz:"))
    for verb in ("validate", "run"):
        try:
            code = main([verb, str(path)])
        except SystemExit as stop:
            code = stop.code
        assert code == 2
        err = capsys.readouterr().err
        assert f"{path}:" in err and "training.max_stepz" in err and "did you mean 'max_steps'" in err
        assert "Traceback" not in err
    assert not (tmp_path / "studies").exists()


def test_bad_rows_exit_2_before_anything_starts(write_spec, tmp_path, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    path = write_spec()
    path.write_text(path.read_text().replace('"fixture:narrow_bad_advice"', str(data)))
    with pytest.raises(SystemExit) as info:
        main(["run", str(path)])
    assert info.value.code == 2
    assert f"{data}:1: no assistant message" in capsys.readouterr().err
    assert not (tmp_path / "studies").exists()


def test_pareto_of_unknown_study_exits_2(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "emtune.cli.main", "pareto", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no study found" in proc.stderr and "Traceback" not in proc.stderr


def test_ui_binds_loopback_by_default(write_spec, tmp_path, capsys) -> None:
    study = tmp_path / "studies" / "x"
    study.mkdir(parents=True)
    spec = write_spec(name="x")
    (study / "spec.yaml").write_text(spec.read_text())
    assert main(["ui", str(study), "--print-command"]) == 0
    out, err = capsys.readouterr()
    assert "--host 127.0.0.1" in out and f"sqlite:///{study.resolve()}/mlflow.db" in out and not err
    assert main(["ui", str(study), "--print-command", "--host", "0.0.0.0"]) == 0
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0 opens the MLflow UI to the network, and it has no login" in err
    assert "ssh -L 5000:127.0.0.1:5000 HOST" in err


@pytest.mark.slow
def test_unreachable_tracking_server_exits_4_with_the_reason(write_spec, capsys, monkeypatch, ray_session) -> None:
    import socket

    with socket.socket() as sock:  # nothing listens there
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    path = write_spec(name="notrack", num_trials=1)
    path.write_text(path.read_text() + f"tracking:\n  uri: {uri}\n  retries: {{max_retries: 2, backoff_factor: 0}}\n")
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0"),
                        ("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")):
        monkeypatch.setenv(name, value)  # the policy's values, undone after the test
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(path), "--num-cpus", "1"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 4  # a service did not answer (not bad input)
    assert f"[emtune] MLflow tracking server {uri} is not answering (URLError); retrying for up to ~0 min 0 s" in out
    last = err.strip().splitlines()[-1]  # earlier lines: the tiny model's progress bars
    assert last.startswith(f"emtune: error: MLflow tracking server {uri} unreachable after tracking.retries: ")
    assert last.endswith("Start it, or check tracking.uri / MLFLOW_TRACKING_URI.")
    assert "Traceback" not in err
