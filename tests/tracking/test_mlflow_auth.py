"""MLflow behind its basic-auth app, as cluster/kuberay-mlflow.yaml runs it: a real server on
127.0.0.1 refuses emtune without a login (exit 2 before anything starts, saying what to set) and
serves it with one, through the variables the MLflow client reads."""

from __future__ import annotations

import pytest

from emtune.cli.main import main

pytestmark = pytest.mark.slow


def test_a_study_against_a_server_that_needs_a_login(mlflow_server, write_spec, tmp_path, monkeypatch,
                                                     capsys) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    password = "pw-" + "7" * 20
    config = tmp_path / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                      f"database_uri = sqlite:///{tmp_path / 'users.db'}\nadmin_username = emtune\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    server = mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"),
                           extra_args=("--app-name", "basic-auth"),
                           extra_env={"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                                      "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32})
    spec = write_spec(name="login")
    spec.write_text(spec.read_text() + f"tracking: {{uri: '{server.url}'}}\n")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    ray.shutdown()

    with pytest.raises(SystemExit) as refused:
        main(["run", str(spec)])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "Traceback" not in err
    assert f"MLflow tracking server {server.url} needs a login (HTTP 401)" in err
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in err
    assert not ray.is_initialized() and not (tmp_path / "studies").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "emtune")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
    with pytest.raises(SystemExit):
        main(["run", str(spec)])
    assert "refused this login (HTTP 401)" in capsys.readouterr().err

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    from emtune.cli.common import check_tracking_login_or_exit
    from emtune.config import load_spec
    from emtune.tracking import mlflow_runs as runs

    loaded = load_spec(spec)
    check_tracking_login_or_exit(loaded)  # no exit: the login is accepted
    client = MlflowClient(server.url)
    parent = runs.start_parent_run(client, loaded, "name: login\n")  # emtune tracks through the login
    assert client.get_run(parent).data.tags["emtune.role"] == "study"
