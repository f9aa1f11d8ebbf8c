"""Ray Train's torch process group, with its rendezvous store on loopback on a local Ray.

Ray Train starts a trial's process group with torch's ``env://`` rendezvous: rank 0 hosts a
``TCPStore`` at ``MASTER_ADDR:MASTER_PORT``. torch binds that store to every interface (``::``)
whatever ``MASTER_ADDR`` says, so a local study on loopback would still leave one port open to the
network per trial. When the Train workers' node address is loopback (a local study, see
``emtune.study.local_ray``), rank 0 first opens the store itself on a socket bound to 127.0.0.1
(``TCPStore(master_listen_fd=...)``, multi-tenant), and torch's rendezvous then reuses that store
instead of binding its own; gloo's and NCCL's own collective sockets are pointed at the loopback
interface too (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, unless set). On a cluster (a
routable node address) Ray's own set-up runs unchanged.

Written against ray 2.60.0: ``_TorchBackend``, ``_setup_torch_process_group`` and
``_set_torch_distributed_env_vars`` are private names of ``ray.train.torch.config``; the
loopback branch of :meth:`LoopbackStoreBackend.on_start` is Ray's ``on_start`` for CPU and GPU
workers (no TPU) with the store opened first.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

#: The store and its socket, held for the life of the worker process (torch uses the socket's fd).
_HELD: list[Any] = []


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for names and other addresses."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def open_loopback_store(world_size: int, timeout_s: float) -> int:
    """On rank 0: a multi-tenant ``TCPStore`` listening on 127.0.0.1 only; returns its port."""
    import torch.distributed as dist

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # not waiting for the other ranks here: they learn the port only after this returns
    store = dist.TCPStore("127.0.0.1", port, world_size, True, timedelta(seconds=timeout_s),
                          wait_for_workers=False, multi_tenant=True, master_listen_fd=sock.fileno())
    _HELD.extend([sock, store])
    return port


#: The variables naming the network interface gloo and NCCL open their collective sockets on.
COLLECTIVE_INTERFACE_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface (``lo`` on Linux, ``lo0`` on macOS), or None."""
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in ("lo", "lo0") if name in names), None)


def keep_collectives_on_loopback() -> None:
    """In a Train worker on a loopback node: gloo and NCCL open their own sockets for the
    collectives, by default on the address the machine's hostname resolves to (a LAN address on
    many laptops); name the loopback interface for both, unless the user chose one already."""
    name = loopback_interface()
    if name is None:
        return
    for variable in COLLECTIVE_INTERFACE_ENV:
        os.environ.setdefault(variable, name)


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _set_master(address: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)


class LoopbackStoreBackend(_TorchBackend):
    """Ray's torch backend; on a loopback node, rank 0's rendezvous store binds 127.0.0.1 only."""

    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        import ray

        address = worker_group.execute_single(0, _node_address)
        if not is_loopback(address):
            return super().on_start(worker_group, backend_config)
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        size = len(worker_group)
        port = worker_group.execute_single(0, open_loopback_store, size, backend_config.timeout_s)
        worker_group.execute(_set_master, address="127.0.0.1", port=port)
        worker_group.execute(keep_collectives_on_loopback)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, _setup_torch_process_group, backend=backend,
                                                   world_rank=rank, world_size=size, init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(size)])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose backend keeps a local study's rendezvous store on loopback."""

    @property
    def backend_cls(self) -> type:
        return LoopbackStoreBackend
