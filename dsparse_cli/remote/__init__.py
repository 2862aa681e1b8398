"""Reaching boards: one Transport interface, over SSH (paramiko) or local subprocesses.

paramiko is imported only when an SSH board is actually contacted, so commands that never
leave this machine (and `--help`) stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsparse_cli.remote.base import TIMEOUT_RC, Detached, RunResult, Transport
from dsparse_cli.remote.local import LocalTransport
from dsparse_cli.remote.parallel import BoardResult, fan_out

if TYPE_CHECKING:
    from dsparse_cli.inventory import Target

__all__ = ["TIMEOUT_RC", "BoardResult", "Detached", "LocalTransport", "RunResult", "Transport", "connect",
           "fan_out"]


def connect(target: "Target", *, connect_timeout: float, accept_new_host_keys: bool = False,
            known_hosts: str | None = None) -> Transport:
    """Open a transport to ``target``; raises RemoteError/ConfigError with one clear line (a
    board whose cluster.yaml entry is broken fails here, when it is used, not at load)."""
    target.check()
    if target.local:
        return LocalTransport(target)
    from dsparse_cli.remote.ssh import SSHTransport

    return SSHTransport(target, connect_timeout=connect_timeout, accept_new_host_keys=accept_new_host_keys,
                        known_hosts=known_hosts or getattr(target, "known_hosts", None))
