"""`emtune ui STUDY`: serve the MLflow UI for a study's tracking store on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from emtune.cli.common import NOTHING_QUALIFIES, fail, load_study_spec, resolve_study_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser("ui", help="serve the MLflow UI of a study on 127.0.0.1")
    p.add_argument("study", help="study folder, spec file, or name under ./studies")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--print-command", action="store_true", help="print the server command and exit")
    p.set_defaults(func=main)


def server_command(tracking_uri: str, artifacts: str, host: str, port: int) -> list[str]:
    """A lean MLflow server: one worker, no job execution (about 0.5 GB, ready in about 5 s;
    MLflow's default server takes about 2 GB)."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--artifacts-destination", artifacts, "--host", host, "--port", str(port), "--workers", "1"]


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: a server bound there is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(args: argparse.Namespace) -> int:
    """Run the MLflow server in the foreground until interrupted."""
    from emtune.tracking.mlflow_runs import tracking_uri

    study_dir = resolve_study_dir(args.study)
    spec = load_study_spec(study_dir)
    uri = tracking_uri(spec)
    if not uri.startswith("sqlite:"):
        fail(f"study {spec.name!r} tracks to {uri}: open that server's UI instead")
    cmd = server_command(uri, str(study_dir / "mlartifacts"), args.host, args.port)
    if not is_loopback_host(args.host):
        print(f"emtune: warning: --host {args.host} opens the MLflow UI to the network, and it has no login: "
              "anyone who reaches that port can read and change this study's runs and artifacts. "
              f"Prefer the default 127.0.0.1 and an SSH tunnel (ssh -L {args.port}:127.0.0.1:{args.port} HOST).",
              file=sys.stderr, flush=True)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    if not Path(uri[len("sqlite:///"):]).is_file():  # the server would create an empty store
        fail(f"study {spec.name!r} has no MLflow store yet ({uri}): it has not started; run it first",
             NOTHING_QUALIFIES)
    print(f"MLflow UI for study {spec.name!r}: http://{args.host}:{args.port}  (Ctrl-C to stop)", flush=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
