"""`emtune submit SPEC --address http://HEAD:8265`: run a study on a Ray cluster as a Ray Job.

The spec is validated here first (exit 2, nothing submitted). The job's runtime environment
carries this checkout's ``emtune`` package (``py_modules``, so the cluster runs the code you have)
and a working directory holding only the spec; the entrypoint is ``emtune run SPEC`` executed as
``python -m emtune.cli.main`` so that nodes without the console script still run it. Inside the
job, ``emtune run`` joins the cluster through the ``RAY_ADDRESS`` Ray sets for job drivers.

Paths in the spec are resolved on the cluster: ``output_dir`` must be an absolute path on storage
every node shares (NFS, a ReadWriteMany volume), and local files must exist there at the same
absolute path (relative paths are made absolute from the spec's folder here, as ``load_spec``
does). See cluster/README.md. Secrets (judge API keys, the Ray token) are never
put in the job's runtime environment, which any dashboard user can read: they live on the nodes.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from emtune.cli.common import FAILED, OK, fail, load_spec_or_exit
from emtune.cli.jobs import add_address_argument, job_client, wait_for_job

#: Variables forwarded from this shell to the job driver when set here. They go on the entrypoint
#: line, not into the job's ``env_vars``: ``init_ray`` passes them to ``ray.init`` itself, and Ray
#: refuses a driver whose ray.init env_vars repeat a key of the job's runtime_env.
DRIVER_ENV_PASSTHROUGH = ("HF_HUB_OFFLINE",)
#: Fields whose string values may name local files or folders.
PATH_FIELDS = ("path", "source", "base_source", "model_path", "cache_path", "question_set",
               "triggered_question_set", "questions", "prompt_version", "vector_path")
#: Substrings that mark a variable as a secret: refused by --env.
SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
EXCLUDES = ["__pycache__", "*.pyc", ".pytest_cache"]


def package_dir() -> Path:
    """The folder of the ``emtune`` package this command runs from."""
    import emtune

    return Path(emtune.__file__).resolve().parent


def cluster_problems(spec: Any) -> list[str]:
    """Reasons the spec cannot run as-is on a cluster (each an error: nothing is submitted)."""
    problems = []
    if not Path(spec.output_dir).expanduser().is_absolute():
        problems.append(
            f"output_dir {spec.output_dir!r} is relative: on the cluster it would land in the job's "
            f"temporary working directory and be lost; set an absolute path on shared storage "
            f"(e.g. --output-dir /mnt/shared/studies)")
    for field, value in _path_values(spec.model_dump(mode="json")):
        local = Path(value).expanduser()
        if not local.is_absolute() and local.exists():
            problems.append(
                f"{field}: {value!r} is a relative local path; the job runs in a fresh working "
                f"directory on the cluster: use an absolute path on shared storage (or fixture:/hub:)")
    return problems


def cluster_notes(spec: Any) -> list[str]:
    """Things that are fine on one machine but need shared storage or a server on a real cluster."""
    notes = [f"the study folder {spec.study_dir} (Optuna storage, Ray results, cache) must be on "
             f"storage every node mounts at that path"]
    if spec.tracking.uri is None or spec.tracking.uri.startswith(("sqlite:", "file:")):
        notes.append("MLflow: SQLite in the study folder; with several nodes prefer an MLflow server "
                     "(tracking.uri: http://mlflow:5000, cluster/README.md)")
    for field, value in _path_values(spec.model_dump(mode="json")):
        if Path(value).expanduser().is_absolute():
            notes.append(f"{field}: {value} must exist on every node")
    return notes


def _path_values(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field, value) for string values of PATH_FIELDS that may be local paths."""
    found: list[tuple[str, str]] = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)):
            found += _path_values(value, name)
        elif (isinstance(value, str) and key in PATH_FIELDS
              and not value.startswith(("fixture:", "hub:")) and "://" not in value):
            found.append((name, value))
    return found


def check_env_name(name: str, origin: str) -> None:
    """Refuse variable names that look secret or that emtune's driver sets itself (exit 2)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        fail(f"{origin}: {name!r} is not a variable name")
    if any(hint in name.upper() for hint in SECRET_HINTS):
        fail(f"{origin}: {name} looks like a secret; the job's runtime environment is readable by "
             f"every dashboard user. Set it on the cluster nodes instead (cluster/README.md)")
    if name in DRIVER_ENV_PASSTHROUGH or name == "TOKENIZERS_PARALLELISM":
        fail(f"{origin}: {name} is set by emtune's driver itself; set it in this shell instead "
             f"(emtune submit forwards it)")


def parse_env(pairs: list[str]) -> dict[str, str]:
    """``NAME`` (value from this shell) or ``NAME=VALUE`` for the job's processes."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        check_env_name(name, "--env")  # never echo the value: it may be a secret
        if not sep:
            if name not in os.environ:
                fail(f"--env {name}: not set in this shell")
            value = os.environ[name]
        env[name] = value
    return env


def load_runtime_env(path: str | None) -> dict[str, Any]:
    """Extra runtime_env fields from a YAML file (cluster/runtime_env.yaml); bad files exit 2."""
    if path is None:
        return {}
    from emtune.user_files import UserFileError, load_user_yaml, read_user_text

    try:
        data = load_user_yaml(read_user_text(Path(path), "runtime_env"), path)[0] or {}
    except UserFileError as err:
        fail(f"--runtime-env: {err}")
    if not isinstance(data, dict):
        fail(f"--runtime-env {path}: expected a mapping of runtime_env fields")
    owned = sorted({"working_dir", "py_modules"} & set(data))
    if owned:
        fail(f"--runtime-env {path}: {owned} are set by emtune submit (the spec and this checkout)")
    env_vars = data.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        fail(f"--runtime-env {path}: env_vars must be a mapping")
    for name in env_vars:
        check_env_name(str(name), f"--runtime-env {path}: env_vars")
    data["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    return data


def entrypoint(spec_name: str) -> str:
    """The job's command line: ``emtune run SPEC`` with the driver variables set here forwarded."""
    forwarded = [f"{k}={shlex.quote(os.environ[k])}" for k in DRIVER_ENV_PASSTHROUGH if k in os.environ]
    prefix = f"env {' '.join(forwarded)} " if forwarded else ""
    return f"{prefix}python -m emtune.cli.main run {shlex.quote(spec_name)}"


def runtime_env(work_dir: Path, env_vars: dict[str, str],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job's runtime environment: the spec's folder as working_dir, this emtune as a module,
    plus ``extra`` fields (a --runtime-env file); ``env_vars`` win over the file's."""
    env: dict[str, Any] = {"excludes": EXCLUDES, **(extra or {})}
    env.update(working_dir=str(work_dir), py_modules=[str(package_dir())])
    merged = {**env.get("env_vars", {}), **env_vars}
    env.pop("env_vars", None)
    if merged:
        env["env_vars"] = merged
    return env


def stage_spec(spec_path: Path, work_dir: Path, output_dir: str | None) -> Path:
    """Write the spec into ``work_dir`` as the cluster will read it: relative paths made
    absolute exactly as ``load_spec`` does here (from the spec's folder), ``output_dir``
    replaced when given."""
    import yaml

    from emtune.spec_checks import resolve_paths

    data = yaml.safe_load(spec_path.read_text())
    # Relative paths are read from the spec's folder here; the job runs in another folder.
    resolve_paths(data, spec_path.parent)
    if output_dir is not None:
        data["output_dir"] = output_dir
    target = work_dir / spec_path.name
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def submit_study(client: Any, spec_path: Path, study_name: str, output_dir: str | None = None,
                 env_vars: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> str:
    """Submit the study as a Ray Job; returns its submission id (``emtune-NAME-YYYYmmdd-HHMMSS``)."""
    job_id = f"emtune-{study_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="emtune-submit-") as tmp:
        staged = stage_spec(spec_path, Path(tmp), output_dir)
        # submit_job uploads working_dir and py_modules before it returns: tmp may go afterwards.
        return client.submit_job(
            entrypoint=entrypoint(staged.name),
            submission_id=job_id,
            runtime_env=runtime_env(Path(tmp), env_vars or {}, extra),
            metadata={"emtune_study": study_name},
        )


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser("submit", help="run a study on a Ray cluster as a Ray Job")
    p.add_argument("spec", help="study spec YAML")
    add_address_argument(p)
    p.add_argument("--output-dir", default=None,
                   help="absolute study root on the cluster's shared storage (replaces output_dir)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="extra (non-secret) variable for the job's processes; repeatable")
    p.add_argument("--runtime-env", default=None, metavar="FILE",
                   help="extra runtime_env fields (YAML), e.g. cluster/runtime_env.yaml")
    p.add_argument("--skip-input-check", action="store_true",
                   help="do not read the datasets here (they exist only on the cluster)")
    p.add_argument("--wait", action="store_true", help="poll until the job ends; exit 0 on SUCCEEDED")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Validate locally, submit, print the job id and how to follow it."""
    spec_path = Path(args.spec)
    spec = load_spec_or_exit(args.spec, inputs=not args.skip_input_check, hub="load")
    if args.output_dir is not None:
        if not Path(args.output_dir).is_absolute():
            fail(f"--output-dir {args.output_dir!r} must be an absolute path on the cluster's shared storage")
        spec = spec.model_copy(update={"output_dir": args.output_dir})
    problems = cluster_problems(spec)
    if problems:
        fail("the spec cannot run on a cluster as it is:\n  " + "\n  ".join(problems))
    extra = load_runtime_env(args.runtime_env)
    env_vars = parse_env(args.env)
    client = job_client(args.address)
    job_id = submit_study(client, spec_path, spec.name, args.output_dir, env_vars, extra)
    for note in cluster_notes(spec):
        print(f"note: {note}", file=sys.stderr)
    print(f"submitted study {spec.name!r} as job {job_id}")
    print(f"  status: emtune status {job_id} --address {args.address}")
    print(f"  logs:   emtune logs {job_id} --address {args.address} --follow")
    print(f"  study:  {spec.study_dir} (on the cluster)")
    if not args.wait:
        return OK
    status = wait_for_job(client, job_id)
    if status != "SUCCEEDED":
        tail = client.get_job_logs(job_id).splitlines()[-30:]
        print("\n".join(["--- last lines of the job's logs ---", *tail]), file=sys.stderr)
    return OK if status == "SUCCEEDED" else FAILED
