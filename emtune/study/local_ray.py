"""A local Ray closed by default: every listener on 127.0.0.1, token authentication on, and its
token readable by its owner only.

Ray 2.60 on Linux binds its GCS, raylet, object manager, agents and workers on every interface
and advertises the machine's address: ``ray.init(_node_ip_address="127.0.0.1")`` alone does not
change that, because Ray maps a loopback address to the machine's own (its clusters span
machines). Only the switch Ray uses on macOS and Windows, where a laptop has no cluster to join,
keeps the node on loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: the node's address becomes
127.0.0.1 and every server binds it). emtune sets it for the local Ray of a study, in the
environment (the processes Ray starts read it) and in this process (Ray read it at import).

Ray turns token authentication on for a new local cluster and writes its token to
``~/.ray/auth_token`` with the default mode (0644 under the usual umask), readable by every user of
the machine. emtune creates that file itself with mode 0600 when it is missing, and tightens an
existing one that others can read (saying so once). ``RAY_AUTH_TOKEN`` in the environment (a token
from a secret manager) needs no file; ``RAY_AUTH_TOKEN_PATH`` is checked the same way.
``RAY_AUTH_MODE=disabled`` is respected, with a warning: the loopback binding still holds.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from pathlib import Path

LOOPBACK = "127.0.0.1"
#: Ray's switch for single-machine clusters (read by ray._private.ray_constants at import).
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
OWNER_ONLY = 0o600


class TokenFileError(PermissionError):
    """Ray's token file can be read by other users and cannot be fixed by this user."""


def default_token_path() -> Path:
    """Where Ray looks for its token when neither ``RAY_AUTH_TOKEN`` nor ``RAY_AUTH_TOKEN_PATH`` is set."""
    return Path.home() / ".ray" / "auth_token"


def token_file() -> Path | None:
    """The file Ray will read its token from, or None when ``RAY_AUTH_TOKEN`` holds it."""
    if os.environ.get(TOKEN_ENV):
        return None
    named = os.environ.get(TOKEN_PATH_ENV)
    return Path(named).expanduser() if named else default_token_path()


def ensure_private_token(log=None) -> Path | None:
    """Make sure the token a local Ray will use exists and only its owner can read it.

    Creates the file (mode 0600, in a 0700 folder when the folder is new) when it is missing,
    chmods an existing one that group or others can read, and returns its path (None when the
    token comes from ``RAY_AUTH_TOKEN``). Raises :class:`TokenFileError` for a file owned by
    someone else that others can read: that token cannot be kept secret, so no study should rely on it.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    path = token_file()
    if path is None:
        return None
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OWNER_ONLY)
        except FileExistsError:  # another study created it at the same moment: check that one
            return ensure_private_token(log)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        return path
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        if path.stat().st_uid != os.getuid():
            raise TokenFileError(f"Ray's token file {path} has mode {mode:04o} (readable by other users) and "
                                  f"belongs to another user; set {TOKEN_ENV} or {TOKEN_PATH_ENV} to a token "
                                  "only you can read")
        path.chmod(OWNER_ONLY)
        log(f"[emtune] {path} had mode {mode:04o} (other users could read Ray's token): now {OWNER_ONLY:04o}")
    return path


def close_local_ray(log=None) -> None:
    """Before a local ``ray.init``: loopback for every Ray server, token auth on with a private token."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    os.environ[SINGLE_MACHINE_ENV] = "0"
    from emtune.study.internals import keep_ray_on_this_machine

    keep_ray_on_this_machine()
    if os.environ.get(AUTH_MODE_ENV, "token").lower() != "token":
        log(f"[emtune] warning: {AUTH_MODE_ENV}={os.environ[AUTH_MODE_ENV]}: Ray's token authentication is off; "
            "its servers still listen on 127.0.0.1 only, but any local user can reach them")
        return
    # Unset means token for a new local Ray (Ray decides so in ray.init); the token must exist
    # first, or Ray writes it world-readable.
    ensure_private_token(log)
