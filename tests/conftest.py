"""Make tests/helpers.py and tests/sshd.py importable from every test directory, and keep every
test's jobs out of the real per-user job index (~/.local/state/dsparse/jobs.json)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session", autouse=True)
def _session_job_index(tmp_path_factory):
    """A job index for fixtures wider than one test (they are set up before any test's own)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSPARSE_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))
        yield


@pytest.fixture(autouse=True)
def _private_job_index(tmp_path_factory, monkeypatch):
    """Each test's own job index (`dsparse` subprocesses inherit it): no test sees another's jobs."""
    monkeypatch.setenv("DSPARSE_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))
