"""A local study's torch process group stays on loopback: the rendezvous store rank 0 opens, and
the sockets gloo opens for the collectives (on the interface ``GLOO_SOCKET_IFNAME`` names).
(The whole study's socket table is tests/study/test_closed_by_default.py.)"""

from __future__ import annotations

import multiprocessing
import socket

import psutil
import pytest

from emtune.train import process_group
from emtune.train.process_group import is_loopback, keep_collectives_on_loopback, loopback_interface


def _listening(pid: int | None = None) -> list[tuple[str, int]]:
    proc = psutil.Process(pid)
    return [(c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]


def test_loopback_addresses() -> None:
    assert [is_loopback(a) for a in ("127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1")] == [True] * 4
    assert [is_loopback(a) for a in ("192.0.2.2", "0.0.0.0", "::", "localhost", "")] == [False] * 5


def test_the_rendezvous_store_listens_on_loopback_only() -> None:
    before = set(_listening())
    port = process_group.open_loopback_store(world_size=1, timeout_s=10)
    opened = set(_listening()) - before
    assert opened == {("127.0.0.1", port)}


def test_collectives_are_pointed_at_the_loopback_interface_unless_the_user_chose(monkeypatch) -> None:
    for name in process_group.COLLECTIVE_INTERFACE_ENV:
        monkeypatch.delenv(name, raising=False)
    name = loopback_interface()
    assert name in {n for _, n in socket.if_nameindex()}
    assert [a.address for a in psutil.net_if_addrs()[name] if a.family == socket.AF_INET] == ["127.0.0.1"]
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    keep_collectives_on_loopback()
    import os

    assert os.environ["GLOO_SOCKET_IFNAME"] == name and os.environ["NCCL_SOCKET_IFNAME"] == "ib0"


def _gloo_rank(rank: int, interface: str | None, ports, out) -> None:
    """One rank as Ray Train sets it up on a loopback node: rank 0 opens the store, both join it
    through torch's ``env://`` rendezvous, then one all_reduce."""
    import os

    import torch
    import torch.distributed as dist

    if rank == 0:
        port = process_group.open_loopback_store(world_size=2, timeout_s=60)
        ports.put(port)
        ports.put(port)
    port = ports.get(timeout=60) if rank else port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if interface is None:
        keep_collectives_on_loopback()
    else:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=2)
    tensor = torch.ones(1)
    dist.all_reduce(tensor)
    out.put((rank, float(tensor), _listening(os.getpid())))
    dist.barrier()
    dist.destroy_process_group()


def _gloo_listeners(interface: str | None) -> set[str]:
    """Addresses two ranks listen on (the store and gloo's sockets) after one all_reduce."""
    ctx = multiprocessing.get_context("spawn")
    ports, out = ctx.Queue(), ctx.Queue()
    ranks = [ctx.Process(target=_gloo_rank, args=(r, interface, ports, out)) for r in range(2)]
    for proc in ranks:
        proc.start()
    try:
        results = [out.get(timeout=120) for _ in ranks]
    finally:
        for proc in ranks:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert sorted((rank, total) for rank, total, _ in results) == [(0, 2.0), (1, 2.0)]
    return {address for _, _, listening in results for address, _ in listening}


@pytest.mark.slow
def test_gloo_listens_where_it_is_told_and_emtune_tells_it_loopback() -> None:
    """gloo binds the interface GLOO_SOCKET_IFNAME names (shown with a routable one, when this
    machine has one); with emtune's setting every listener of both ranks is loopback."""
    assert _gloo_listeners(None) == {"127.0.0.1"}
    routable = {name: [a.address for a in addrs if a.family == socket.AF_INET and not is_loopback(a.address)]
                for name, addrs in psutil.net_if_addrs().items()}
    routable = {name: addrs for name, addrs in routable.items() if addrs}
    if not routable:
        pytest.skip("no routable IPv4 interface to contrast with")
    name, addresses = next(iter(routable.items()))
    assert set(addresses) <= _gloo_listeners(name)  # gloo's own sockets there (the store stays on loopback)
