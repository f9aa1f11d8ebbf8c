"""`emtune submit` without a cluster: what is checked before submitting and what the job carries.

The real submission to a two-node cluster is tests/cli/test_submit_cluster.py (slow).
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import pytest
import yaml

import emtune
from emtune.cli import jobs, submit


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="emtune")
    sub = parser.add_subparsers(dest="verb", required=True)
    submit.add_parser(sub)
    jobs.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


class FakeClient:
    """Records submissions and what the job's working directory held at submission time."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.files: dict[str, str] = {}

    def submit_job(self, **kwargs) -> str:
        self.calls.append(kwargs)
        work_dir = Path(kwargs["runtime_env"]["working_dir"])
        self.files = {p.name: p.read_text() for p in work_dir.iterdir()}
        return kwargs["submission_id"]


@pytest.fixture
def fake(monkeypatch) -> FakeClient:
    client = FakeClient()
    monkeypatch.setattr(submit, "job_client", lambda address: client)
    return client


def test_submission_carries_spec_package_and_env(write_spec, tmp_path, fake, capsys) -> None:
    spec = write_spec(output_dir="studies")  # relative: replaced by --output-dir
    extra = tmp_path / "runtime_env.yaml"
    extra.write_text("env_vars: {EMTUNE_CACHE_DIR: /mnt/a, HF_HOME: /mnt/hf}\npip: [rich]\n")
    code = _run(["submit", str(spec), "--address", "http://127.0.0.1:1", "--output-dir", "/mnt/s",
                 "--runtime-env", str(extra), "--env", "EMTUNE_CACHE_DIR=/mnt/b"])
    assert code == 0
    (call,) = fake.calls
    assert call["entrypoint"] == "env HF_HUB_OFFLINE=1 python -m emtune.cli.main run tiny.yaml"
    assert call["submission_id"].startswith("emtune-tiny-")
    env = call["runtime_env"]
    assert env["py_modules"] == [str(Path(emtune.__file__).resolve().parent)]
    assert env["env_vars"] == {"EMTUNE_CACHE_DIR": "/mnt/b", "HF_HOME": "/mnt/hf"}  # --env wins
    assert env["pip"] == ["rich"] and "__pycache__" in env["excludes"]
    assert list(fake.files) == ["tiny.yaml"]
    staged = yaml.safe_load(fake.files["tiny.yaml"])
    assert staged["output_dir"] == "/mnt/s" and staged["search"]["num_trials"] == 2
    assert not Path(env["working_dir"]).exists()  # the temporary copy is gone after submission
    out = capsys.readouterr().out
    assert f"as job {call['submission_id']}" in out and "emtune logs" in out and "/mnt/s/tiny" in out


def test_invalid_spec_exits_2_and_submits_nothing(write_spec, fake, capsys) -> None:
    spec = write_spec()
    spec.write_text(spec.read_text().replace("max_steps:", "max_stepz:"))
    with pytest.raises(SystemExit) as info:
        _run(["submit", str(spec), "--address", "http://127.0.0.1:1"])
    assert info.value.code == 2 and fake.calls == []
    assert "training.max_stepz" in capsys.readouterr().err


def test_relative_paths_are_refused(write_spec, tmp_path, monkeypatch, fake, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        _run(["submit", str(write_spec(output_dir="studies")), "--address", "http://127.0.0.1:1"])
    assert info.value.code == 2 and "output_dir 'studies' is relative" in capsys.readouterr().err

    assert fake.calls == []


def test_relative_paths_are_staged_from_the_spec_folder(write_spec, tmp_path, monkeypatch, fake) -> None:
    # a question file beside the spec, emtune run from another folder: found, and staged absolute
    (tmp_path / "questions.yaml").write_text("questions: []\n")
    spec = write_spec()
    spec.write_text(spec.read_text().replace("evaluation:", "evaluation:\n  question_set: questions.yaml"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert _run(["submit", str(spec), "--address", "http://127.0.0.1:1", "--skip-input-check"]) == 0
    staged = yaml.safe_load(fake.files["tiny.yaml"])
    assert staged["evaluation"]["question_set"] == str(tmp_path / "questions.yaml")


def test_relative_dataset_is_staged_absolute(write_spec, tmp_path, monkeypatch, fake, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    Path("rows.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}, '
                                  '{"role": "assistant", "content": "a"}]}\n')
    spec = write_spec()
    spec.write_text(spec.read_text().replace('"fixture:narrow_bad_advice"', "rows.jsonl"))
    assert _run(["submit", str(spec), "--address", "http://127.0.0.1:1"]) == 0
    staged = yaml.safe_load(fake.files["tiny.yaml"])
    assert staged["data"]["train"]["path"] == str(tmp_path / "rows.jsonl")
    assert f"data.train.path: {tmp_path / 'rows.jsonl'} must exist on every node" in capsys.readouterr().err


@pytest.mark.parametrize("pair,message", [
    ("OPENAI_API_KEY=sk-do-not-print-me", "looks like a secret"),
    ("HF_HUB_OFFLINE=0", "set by emtune's driver itself"),
    ("1BAD=x", "not a variable name"),
])
def test_bad_env_exits_2_without_echoing_values(write_spec, fake, capsys, pair, message) -> None:
    with pytest.raises(SystemExit) as info:
        _run(["submit", str(write_spec()), "--address", "http://127.0.0.1:1", "--env", pair])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "do-not-print-me" not in err
    assert fake.calls == []


def test_runtime_env_file_may_not_set_what_submit_owns(tmp_path, capsys) -> None:
    path = tmp_path / "env.yaml"
    path.write_text("working_dir: .\n")
    with pytest.raises(SystemExit) as info:
        submit.load_runtime_env(str(path))
    assert info.value.code == 2 and "['working_dir'] are set by emtune submit" in capsys.readouterr().err


def test_unreachable_cluster_exits_4(capsys) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SystemExit) as info:
        _run(["status", "some-job", "--address", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert info.value.code == 4 and f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in err


def test_missing_address_exits_2(monkeypatch, capsys) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as info:
        _run(["logs", "some-job"])
    assert info.value.code == 2 and "no cluster address" in capsys.readouterr().err
