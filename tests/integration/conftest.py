"""Fixtures for tests against a real OpenSSH sshd on loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests/sshd.py

from sshd import SSHDUnavailable, SSHServer, start_sshd  # noqa: E402

from dsparse_cli.inventory import Target  # noqa: E402


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> SSHServer:
    """One sshd for the whole test session (starting one costs ~0.3 s of key generation)."""
    try:
        server = start_sshd(tmp_path_factory.mktemp("sshd"))
    except SSHDUnavailable as e:
        if os.environ.get("CI"):  # CI installs openssh-server: a missing sshd there is a failure
            pytest.fail(f"sshd unavailable in CI: {e}")
        pytest.skip(str(e))
    yield server
    server.stop()


def target_for(server: SSHServer, **overrides) -> Target:
    """A Target that reaches ``server`` with its client key; override any field."""
    fields = dict(name="b0", host=server.host, port=server.port, user=server.user,
                  identity_files=[server.client_key], proxy_command=None, python=sys.executable,
                  workdir=str(server.dir / "work"), local=False, memory_limit=None, iface=None,
                  kind="auto")
    fields.update(overrides)
    return Target(**fields)


@pytest.fixture
def make_target(sshd):
    """``make_target(**overrides) -> Target`` for the session sshd."""
    return lambda **overrides: target_for(sshd, **overrides)
