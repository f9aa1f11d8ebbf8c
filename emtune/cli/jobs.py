"""`emtune status JOB` and `emtune logs JOB`: follow a study submitted as a Ray Job.

Both talk to the cluster's dashboard (the Ray Jobs API, ``ray[default]``) at ``--address``,
by default ``$RAY_ADDRESS``, the variable Ray's own job CLI documents
(``export RAY_ADDRESS=http://127.0.0.1:8265``); an explicit ``--address`` wins over it. On a
cluster with token authentication, the client needs ``RAY_AUTH_MODE=token`` and the token
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) in its environment; the
token is never taken on the command line.
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
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--address`` option shared by submit, status and logs."""
    parser.add_argument(
        "--address", default=os.environ.get(ADDRESS_ENV),
        help=f"Ray dashboard URL, e.g. http://127.0.0.1:8265 through an SSH tunnel (default: ${ADDRESS_ENV})",
    )


def job_client(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for ``address``; an unreachable or refusing cluster exits 2."""
    if not address:
        fail(f"no cluster address: pass --address http://HEAD:8265 or set {ADDRESS_ENV}")
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        with _address_wins(address):
            return JobSubmissionClient(address)
    except AuthenticationError:
        fail(f"{address} refused the request: the cluster uses token authentication; set "
             f"RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its token")
    except (ConnectionError, RuntimeError, ValueError) as err:
        # Ray wraps authentication failures in RuntimeError/ConnectionError too; say both causes.
        fail(f"cannot reach the Ray dashboard at {address}: {_first_line(err)} (is the tunnel up? "
             f"with token auth set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN)", UNAVAILABLE)


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
