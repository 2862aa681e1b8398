"""Make tests/helpers.py and tests/sshd.py importable from every test directory, keep every
test's jobs out of the real per-user job index (~/.local/state/dsparse/jobs.json), and measure the
profile that most test clusters plan with once per session."""

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


# `dsparse plan --model tiny_cnn --batch-size 16`: the plan options' defaults for the rest
TINY_CNN_PROFILE = {"batch_size": 16, "image_size": 32, "num_classes": 10, "dtype": "float32",
                    "optimizer": "sgd-momentum"}


@pytest.fixture(scope="session")
def tiny_cnn_profile(tmp_path_factory) -> Path:
    """The profile `dsparse plan --model tiny_cnn --batch-size 16` measures (32x32, 10 classes,
    sgd-momentum, float32), measured once for the session by the same `get_profile` the CLI calls:
    about 13 s of CPU each time a module measured it again. `helpers.seed_profile` copies it into a
    state dir's cache, where `dsparse plan` finds it."""
    from dsparse_cli.planning.profile import get_profile, profile_path

    state = tmp_path_factory.mktemp("tiny-cnn-profile")
    prof = get_profile(state, "tiny_cnn", **TINY_CNN_PROFILE)
    return profile_path(state, prof.key)
