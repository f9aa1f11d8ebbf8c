"""Ray's token file for a local study: created owner-only, tightened when others can read it,
refused when it cannot be fixed; a token from the environment needs no file. (The real local
study's sockets, token and refusals are tests/study/test_closed_by_default.py.)"""

from __future__ import annotations

import os
import stat

import pytest

from emtune.study import local_ray
from emtune.study.local_ray import TokenFileError, ensure_private_token


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_missing_token_is_created_for_the_owner_only(home) -> None:
    lines: list[str] = []
    path = ensure_private_token(lines.append)
    assert path == home / ".ray" / "auth_token"
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    token = path.read_text()
    assert len(token) == 64 and set(token) <= set("0123456789abcdef") and not lines
    assert ensure_private_token(lines.append) == path and path.read_text() == token  # kept, not rewritten


def test_a_token_others_can_read_is_tightened_and_said(home) -> None:
    path = home / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("a" * 64)
    path.chmod(0o644)  # how Ray 2.60 writes it
    lines: list[str] = []
    assert ensure_private_token(lines.append) == path
    assert _mode(path) == 0o600 and path.read_text() == "a" * 64
    assert lines == [f"[emtune] {path} had mode 0644 (other users could read Ray's token): now 0600"]


def test_token_sources_from_the_environment(home, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "b" * 64)
    assert ensure_private_token(print) is None and not (home / ".ray").exists()
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    named = tmp_path / "secrets" / "ray_token"
    named.parent.mkdir()
    named.write_text("c" * 64)
    named.chmod(0o640)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert ensure_private_token(lambda line: None) == named and _mode(named) == 0o600


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")
def test_someone_elses_readable_token_is_refused(home) -> None:
    path = home / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("d" * 64)
    path.chmod(0o644)
    os.chown(path, 65534, 65534)
    with pytest.raises(TokenFileError, match="belongs to another user; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"):
        ensure_private_token(print)
    assert _mode(path) == 0o644


def test_close_local_ray_keeps_ray_on_loopback_and_warns_when_auth_is_off(home, monkeypatch) -> None:
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setenv(local_ray.SINGLE_MACHINE_ENV, "1")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    lines: list[str] = []
    local_ray.close_local_ray(lines.append)
    assert os.environ[local_ray.SINGLE_MACHINE_ENV] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    import ray
    from ray._private import services

    if not ray.is_initialized():  # with a Ray up, the address is that node's
        assert services.get_node_ip_address() == "127.0.0.1"
    assert len(lines) == 1 and "RAY_AUTH_MODE=disabled" in lines[0] and "127.0.0.1 only" in lines[0]
    assert not (home / ".ray").exists()  # auth off: no token file made
