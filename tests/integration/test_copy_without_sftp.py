"""Copying files to a board whose sshd has no SFTP subsystem (minimal images, Dropbear): the
transport falls back to the exec channel (issue #16: `plan --push` failed with "connection lost
(SSHException: Channel closed.)")."""

from __future__ import annotations

import os
import stat

import pytest

from dsparse_cli.errors import RemoteError
from dsparse_cli.remote import connect

from conftest import target_for
from sshd import SSHDUnavailable, start_sshd

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def no_sftp(tmp_path_factory):
    try:
        server = start_sshd(tmp_path_factory.mktemp("sshd-nosftp"), sftp=False)
    except SSHDUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"sshd unavailable in CI: {e}")
        pytest.skip(str(e))
    yield server
    server.stop()


def test_put_without_sftp_writes_whole_files_with_their_mode(no_sftp, tmp_path):
    src = tmp_path / "runner.sh"
    src.write_bytes(b"#!/bin/sh\necho hi\n" + bytes(range(256)) * 512)   # binary, 128 KiB
    src.chmod(0o750)
    dest = no_sftp.dir / "work" / "deep" / "er" / "runner.sh"
    with connect(target_for(no_sftp), connect_timeout=10, known_hosts=no_sftp.known_hosts) as t:
        t.put(str(src), str(dest))
        t.put(str(src), "~/.dsparse-nosftp-test/runner.sh")        # `~` is the login's home
        home = t.run("echo $HOME", timeout=10).stdout.strip()
    assert dest.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert not [p for p in dest.parent.iterdir() if p.name != "runner.sh"]        # no temporary left
    copied = os.path.join(home, ".dsparse-nosftp-test", "runner.sh")
    try:
        assert open(copied, "rb").read() == src.read_bytes()
    finally:
        os.remove(copied)
        os.rmdir(os.path.dirname(copied))


def test_get_without_sftp_reads_binary_files_over_the_shell(no_sftp, tmp_path):
    src = no_sftp.dir / "work" / "model.pt"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(bytes(range(256)) * 700)
    dest = tmp_path / "model.pt"
    with connect(target_for(no_sftp), connect_timeout=10, known_hosts=no_sftp.known_hosts) as t:
        t.get(str(src), str(dest))
        with pytest.raises(RemoteError, match="cannot read"):
            t.get(str(no_sftp.dir / "absent"), str(tmp_path / "absent"))
    assert dest.read_bytes() == src.read_bytes()


def test_when_neither_way_works_the_error_says_both(no_sftp, tmp_path):
    src = tmp_path / "plan.json"
    src.write_text("{}")
    blocker = no_sftp.dir / "a-file"
    blocker.write_text("not a directory")
    with connect(target_for(no_sftp), connect_timeout=10, known_hosts=no_sftp.known_hosts) as t:
        with pytest.raises(RemoteError) as err:
            t.put(str(src), str(blocker / "plan.json"))
    message = err.value.one_line()
    assert "no SFTP subsystem" in message and "copying over the shell failed" in message
    assert "\n" not in message
