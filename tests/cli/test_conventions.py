"""The CLI speaks like its neighbours: --version, `env`, one --format option, distinct exit codes,
a closed pipe that ends quietly, read-only verbs that write nothing, and output a researcher
can read (one order, enough digits, named objectives, no Ray internals)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from emtune.cli.main import main

# two front members that 4 significant digits cannot tell apart (3.8967 vs 3.8974), one dominated
TRIALS = [(0.5, 3.8974, 0.01), (0.6, 3.8967, 0.1), (0.9, 4.5, 1.0)]
BASELINES = {"base": {"ood_drift": 0.0, "indomain_nll": 5.25},
             "undefended": {"ood_drift": 1.5, "indomain_nll": 3.0, "pid": 4242, "config/spec/seed": 0,
                            "time_total_s": 12.0}}


def _study(write_spec, started: bool = True) -> Path:
    """studies/conv: a spec, and (``started``) an Optuna study told by hand with baselines."""
    spec = write_spec(name="conv")
    study_dir = spec.parent / "studies" / "conv"
    study_dir.mkdir(parents=True)
    (study_dir / "spec.yaml").write_text(spec.read_text())
    if started:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name="conv", storage=f"sqlite:///{study_dir / 'optuna.db'}",
                                    directions=["minimize", "minimize"])
        for ood, nll, kl in TRIALS:
            study.enqueue_trial({"kl_weight": kl})
            trial = study.ask()
            trial.suggest_float("kl_weight", 1e-3, 10.0, log=True)
            study.tell(trial, [ood, nll])
        for kind, values in BASELINES.items():
            study.set_user_attr(f"baseline:{kind}", values)
    return study_dir


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emtune.cli.main", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_version() -> None:
    from importlib.metadata import version

    done = _cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"emtune {version('emtune')}"


def test_env_lists_the_stack_in_every_format(capsys, monkeypatch) -> None:
    import ray
    import torch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:s3cret@mlflow.example:5000")
    assert main(["env", "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__.split("+")[0] or info["torch"] == torch.__version__
    assert info["ray"] == ray.__version__ and info["python"] == sys.version.split()[0]
    for name in ("mlflow", "optuna", "transformers", "peft", "trl", "gpu"):
        assert info[name] and info[name] != "not installed", name
    assert info["$MLFLOW_TRACKING_URI"] == "https://***@mlflow.example:5000"  # no password printed
    assert main(["env", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["item"]: r["value"] for r in rows}["ray"] == ray.__version__
    assert main(["env"]) == 0
    assert f"- ray:" in capsys.readouterr().out


def test_every_result_verb_has_one_format_option() -> None:
    from emtune.cli.main import build_parser

    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them here
    for name in ("validate", "pareto", "recommend", "confirm", "status", "env"):
        option = next(a for a in verbs[name]._actions if "--format" in a.option_strings)
        assert option.choices == ("table", "json", "csv") and option.default == "table" and option.help, name


def test_pareto_orders_names_and_tells_values_apart(write_spec, capsys) -> None:
    study_dir = _study(write_spec)
    assert main(["pareto", str(study_dir)]) == 0
    table = capsys.readouterr().out
    rows = [line.split() for line in table.splitlines()[2:4]]
    # the front by the first objective: trial 0 (0.5) then trial 1 (0.6); 5 digits tell 3.8974 from 3.8967
    assert [r[0] for r in rows] == ["0", "1"] and rows[0][3] == "3.8974" and rows[1][3] == "3.8967"
    assert "baseline undefended: ood_drift 1.5, indomain_nll 3" in table and "pid" not in table
    assert main(["pareto", str(study_dir), "--format", "json", "--all"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [t["number"] for t in doc["front"]] == [0, 1] and [t["number"] for t in doc["trials"]] == [0, 1, 2]
    assert doc["front"][1]["values"] == {"ood_drift": 0.6, "indomain_nll": 3.8967}
    assert doc["baselines"]["undefended"] == {"ood_drift": 1.5, "indomain_nll": 3.0}  # no pid, config/*, time
    assert main(["pareto", str(study_dir), "--format", "csv", "--all"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["kind"], r["trial"]) for r in rows] == [("baseline", "base"), ("baseline", "undefended"),
                                                      ("trial", "0"), ("trial", "1"), ("trial", "2")]
    assert float(rows[3]["indomain_nll"]) == 3.8967 and rows[4]["rank"] == "1"


def test_nothing_qualifies_exits_3(write_spec, capsys) -> None:
    study_dir = _study(write_spec)
    with pytest.raises(SystemExit) as info:
        main(["recommend", str(study_dir), "--max", "ood_drift=0.1"])
    assert info.value.code == 3
    out, err = capsys.readouterr()
    assert "  ood_drift: 0.5 (trial 0)   [--max ood_drift=0.1]" in out and "qualifies" in err


def test_recommend_shows_each_candidate_vs_the_undefended_baseline(write_spec, capsys) -> None:
    study_dir = _study(write_spec)
    assert main(["recommend", str(study_dir), "--max", "ood_drift=0.7", "--format", "json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    # indomain_nll (minimize) among trials 0, 1: trial 1 (3.8967); vs undefended (3.0): +0.8967
    assert ev["trial"] == 1 and [c["trial"] for c in ev["candidates"]] == [1, 0]
    assert ev["delta_vs_undefended"]["indomain_nll"] == pytest.approx(0.8967)
    assert ev["candidates"][1]["delta_ood_drift"] == pytest.approx(0.5 - 1.5)
    assert main(["recommend", str(study_dir), "--max", "ood_drift=0.7"]) == 0
    text = capsys.readouterr().out
    assert "vs the undefended baseline (metric - baseline):" in text and "  indomain_nll: +0.8967" in text


def test_read_verbs_write_nothing(write_spec, tmp_path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    study_dir = _study(write_spec)
    MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}").search_experiments()  # a real store to read
    never_ran = tmp_path / "studies" / "never"
    never_ran.mkdir()
    (never_ran / "spec.yaml").write_text((study_dir / "spec.yaml").read_text().replace("name: conv", "name: never"))
    before = _snapshot(tmp_path)
    for argv in (["pareto", str(study_dir)], ["pareto", str(study_dir), "--all", "--format", "csv"],
                 ["recommend", str(study_dir)], ["validate", str(study_dir)], ["env"],
                 ["ui", str(study_dir), "--print-command"]):
        assert main(argv) == 0, argv
    for argv, code in ((["pareto", str(never_ran)], 3), (["recommend", str(never_ran)], 3),
                       (["ui", str(never_ran)], 3)):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == code, argv
    assert "has not started" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before  # no optuna.db, mlflow.db or anything else appeared or changed


def test_a_closed_pipe_ends_quietly(write_spec) -> None:
    study_dir = _study(write_spec)
    proc = subprocess.Popen([sys.executable, "-m", "emtune.cli.main", "pareto", str(study_dir), "--all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    proc.stdout.close()  # the reader is gone before emtune writes (as `| head -0` would be)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert err == ""


def test_a_closed_pipe_through_head(write_spec) -> None:
    study_dir = _study(write_spec)
    done = subprocess.run(f"{sys.executable} -m emtune.cli.main pareto {study_dir} --all | head -1", shell=True,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.stdout.startswith("trial") and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_run_refuses_a_dashboard_address(write_spec, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(SystemExit) as info:
        main(["run", str(write_spec())])
    assert info.value.code == 2 and "emtune submit" in capsys.readouterr().err
