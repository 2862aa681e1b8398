"""The emulated edge cluster (scripts/edge-testbed) as a pytest fixture.

    def test_x(testbed):            # module-scoped, already up: 2 boards, 600MiB, 50mbit, 20ms
        testbed.ssh("b0", "hostname")
        testbed.board("b1")["addr"]

    def test_y(spare_testbed):      # not up yet: spare_testbed.cli("up", ...); torn down afterwards

`up` runs once per module and `down` always runs afterwards, even when tests fail.
"""

from __future__ import annotations

import pytest

from edge_testbed import Testbed, require_testbed, running_testbed

UP_ARGS = ["--boards", "2", "--memory", "600MiB", "--rate", "50mbit", "--delay", "20ms"]


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    require_testbed()
    with running_testbed(tmp_path_factory.mktemp("testbed"), *UP_ARGS) as tb:
        yield tb


@pytest.fixture
def spare_testbed(tmp_path_factory):
    """A second testbed dir for tests that run up/down themselves; always torn down."""
    require_testbed()
    tb = Testbed(tmp_path_factory.mktemp("spare-testbed"))
    try:
        yield tb
    finally:
        tb.cli("down")


def pytest_terminal_summary(terminalreporter):
    """The fault suite's table (tests/e2e/test_faults.py), when it ran: docs/faults.md keeps a copy."""
    from fault_table import ROWS, markdown

    if ROWS:
        terminalreporter.write_sep("=", "fault suite (tests/e2e/test_faults.py)")
        terminalreporter.write_line(markdown())
