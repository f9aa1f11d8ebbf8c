"""`emtune status JOB` and `emtune logs JOB`: follow a study submitted as a Ray Job.

Both talk to the cluster's dashboard (the Ray Jobs API, ``ray[default]``) at ``--address``,
by default ``$RAY_ADDRESS``, the variable Ray's own job CLI documents
(``export RAY_ADDRESS=http://127.0.0.1:8265``); an explicit ``--address`` wins over it. On a
cluster with token authentication (emtune's cluster configs turn it on) the token comes from the
environment, never the command line (it would land in shell history and the process table):
``RAY_AUTH_TOKEN``, or a file named by ``RAY_AUTH_TOKEN_PATH``; emtune sends it as the request's
bearer token itself, so ``RAY_AUTH_MODE`` need not be set. With neither, Ray's own lookup applies
(``RAY_AUTH_MODE=token`` and ``~/.ray/auth_token``). The token never goes into a job's runtime
environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from emtune.cli.common import FAILED, OK, UNAVAILABLE, fail
from emtune.cli.output import add_format_argument, print_csv, print_json

ADDRESS_ENV = "RAY_ADDRESS"
#: Ray's job client prefers this variable over its address argument; emtune keeps it in step.
_RAY_CLIENT_OVERRIDE = "RAY_API_SERVER_ADDRESS"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--address`` option shared by submit, status and logs."""
    parser.add_argument(
        "--address", default=os.environ.get(ADDRESS_ENV),
        help=f"Ray dashboard URL, e.g. http://127.0.0.1:8265 through an SSH tunnel (default: ${ADDRESS_ENV})",
    )


def job_client(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for ``address``; a refusing cluster exits 2, an unreachable one 4."""
    if not address:
        fail(f"no cluster address: pass --address http://HEAD:8265 or set {ADDRESS_ENV}")
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = cluster_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _address_wins(address):
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        fail(f"{address} refused the request: {_token_hint(token)}")
    except (ConnectionError, RuntimeError, ValueError) as err:
        text = _first_line(err)
        if "Authentication" in text or "401" in text or "403" in text:
            fail(f"{address} refused the request ({text}): {_token_hint(token)}")
        fail(f"cannot reach the Ray dashboard at {address}: {text} (is the tunnel up?)", UNAVAILABLE)


@contextmanager
def _address_wins(address: str) -> Iterator[None]:
    """Ray's client takes ``RAY_API_SERVER_ADDRESS`` (then ``RAY_ADDRESS``) over its argument:
    point it at ``address`` while the client is made, so ``--address`` means what it says."""
    before = os.environ.get(_RAY_CLIENT_OVERRIDE)
    os.environ[_RAY_CLIENT_OVERRIDE] = address
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_RAY_CLIENT_OVERRIDE, None)
        else:
            os.environ[_RAY_CLIENT_OVERRIDE] = before


def cluster_token() -> str | None:
    """The cluster's token from ``RAY_AUTH_TOKEN`` or the file ``RAY_AUTH_TOKEN_PATH`` names."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip()
    path = os.environ.get(TOKEN_PATH_ENV)
    if path:
        try:
            return open(os.path.expanduser(path), encoding="utf-8").read().strip() or None
        except OSError as err:
            fail(f"{TOKEN_PATH_ENV}={path}: cannot read the token file ({err.strerror or err})")
    return None


def _token_hint(token: str | None) -> str:
    if token:
        return f"the cluster rejected the token in {TOKEN_ENV}/{TOKEN_PATH_ENV}; set the cluster's own token"
    return (f"the cluster uses token authentication; set {TOKEN_ENV} to its token (or {TOKEN_PATH_ENV} to a "
            "file holding it), see cluster/README.md")


def job_status(client: Any, job_id: str) -> str:
    """The job's status name (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); unknown job exits 2."""
    try:
        return str(client.get_job_status(job_id).value)
    except RuntimeError as err:
        fail(f"no job {job_id!r} on this cluster: {_first_line(err)}")


def wait_for_job(client: Any, job_id: str, poll_s: float = 2.0, timeout_s: float | None = None,
                 echo: bool = True) -> str:
    """Poll until the job ends (or ``timeout_s`` passes); returns the last status seen."""
    start, last = time.monotonic(), None
    while True:
        status = job_status(client, job_id)
        if echo and status != last:
            print(f"[emtune] job {job_id}: {status}", flush=True)
        last = status
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return status
        time.sleep(poll_s)


def follow_logs(client: Any, job_id: str) -> None:
    """Stream the job's logs until it ends (websocket tail of the Jobs API)."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(_tail())


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the two verbs ``status`` and ``logs``."""
    p = sub.add_parser("status", help="status of a study submitted with `emtune submit`")
    p.add_argument("job", help="job (submission) id printed by `emtune submit`")
    add_address_argument(p)
    p.add_argument("--wait", action="store_true", help="poll until the job ends")
    add_format_argument(p, "job")
    p.set_defaults(func=status_main)

    p = sub.add_parser("logs", help="logs of a study submitted with `emtune submit`")
    p.add_argument("job", help="job (submission) id printed by `emtune submit`")
    add_address_argument(p)
    p.add_argument("--follow", "-f", action="store_true", help="stream the logs until the job ends")
    p.set_defaults(func=logs_main)


def status_main(args: argparse.Namespace) -> int:
    """Print the job's status; exit 0 unless it FAILED or was STOPPED."""
    client = job_client(args.address)
    fmt = getattr(args, "format", "table")
    status = wait_for_job(client, args.job, echo=fmt == "table") if args.wait else job_status(client, args.job)
    message = client.get_job_info(args.job).message or ""
    if fmt == "json":
        print_json({"job": args.job, "status": status, "message": message})
    elif fmt == "csv":
        print_csv([{"job": args.job, "status": status, "message": message}])
    elif not args.wait:
        print(f"{args.job}: {status}")
        if message:
            print(f"  {message}")
    return FAILED if status in ("FAILED", "STOPPED") else OK


def logs_main(args: argparse.Namespace) -> int:
    """Print the job's logs so far, or follow them with ``--follow``."""
    client = job_client(args.address)
    job_status(client, args.job)  # a clear exit 2 for an unknown id, before any streaming
    if args.follow:
        follow_logs(client, args.job)
    else:
        sys.stdout.write(client.get_job_logs(args.job))
    return OK
