"""`dsparse probe --links`: each board's link rate, measured by a short timed transfer to the master.

The master board (the one whose host is the job's master address, else the first) runs a sink on
that address and the job's port; every other board, one at a time so transfers do not share a
link, sends `nbytes` to it over the route gloo will use and times it until the sink acknowledges.
The master's own link carried every transfer, so its rate is the fastest one measured. Both ends
are small standard-library scripts run with the board's python over SSH.
"""

from __future__ import annotations

import shlex
import threading

from dsparse_cli.errors import ConfigError, RemoteError
from dsparse_cli.inventory import Inventory, Target
from dsparse_cli.remote import connect

LINK_BYTES = 4 << 20        # ~0.3 s at 100 Mbit/s, 1.7 s at 20 Mbit/s: past TCP's slow start
TIMEOUT_S = 60.0            # the sink waits this long for each sender
CONNECT_S = 15.0            # a sender retries this long while the sink starts

SCRIPT = r"""
import socket, sys, time
mode, addr, port, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "sink":
    srv = socket.create_server((addr, port))
    srv.settimeout(float(sys.argv[6]))
    for _ in range(int(sys.argv[5])):
        conn, _ = srv.accept()
        with conn:
            got = 0
            while got < nbytes:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                got += len(chunk)
            conn.sendall(got.to_bytes(8, "big"))
    sys.exit(0)
deadline = time.time() + float(sys.argv[5])
while True:   # the sink may not listen yet
    try:
        s = socket.create_connection((addr, port), timeout=10)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.2)
buf, sent, t0 = b"\0" * (1 << 16), 0, time.perf_counter()
while sent < nbytes:
    n = min(len(buf), nbytes - sent)
    s.sendall(buf[:n])
    sent += n
got = int.from_bytes(s.recv(8), "big")
print(got / (time.perf_counter() - t0))
"""


def measure_links(inv: Inventory, *, connect_timeout: float, accept_new_host_keys: bool,
                  nbytes: int = LINK_BYTES) -> dict[str, float]:
    """{board: bytes/s}. A board that cannot be reached or cannot reach the master is a
    RemoteError naming it (exit 1)."""
    sink = next((b for b in inv.boards if b.host == inv.master_addr), inv.boards[0])   # see the module doc
    senders = [b for b in inv.boards if b.name != sink.name]
    if not senders:
        raise ConfigError("--links needs at least two boards: a link is measured between a board and the master")
    addr, port = sink.host, inv.master_port   # the master's address when a board has it

    def reach(target: Target):
        return connect(target.check(), connect_timeout=connect_timeout, accept_new_host_keys=accept_new_host_keys)

    sink_done: dict = {}
    sink_t = reach(sink)
    thread = threading.Thread(target=lambda: sink_done.update(result=_run(
        sink_t, sink, ["sink", addr, port, nbytes, len(senders), TIMEOUT_S])), daemon=True)
    thread.start()
    rates = {}
    try:
        for board in senders:
            with reach(board) as t:
                result = _run(t, board, ["send", addr, port, nbytes, CONNECT_S])
            if not result.ok:   # the sink's own failure (its port taken, say) explains a sender's: it comes first
                if sink_done.get("result") is not None and not sink_done["result"].ok:
                    board, result = sink, sink_done["result"]
                raise RemoteError(f"link probe failed on board {board.name} ({addr}:{port}): "
                                  f"{result.last_error('no output')[:200]}",
                                  "check that every board reaches the master's address and that its port is free")
            rates[board.name] = float(result.stdout.strip().splitlines()[-1])
    finally:
        # after a failed sender the sink waits for connections that never come: do not wait with it
        thread.join(timeout=TIMEOUT_S if len(rates) == len(senders) else 5)
        sink_t.close()
    rates[sink.name] = max(rates.values())
    return {b.name: rates[b.name] for b in inv.boards}


def _run(transport, target: Target, args: list):
    argv = [target.python, "-c", SCRIPT] + [str(a) for a in args]
    return transport.run(" ".join(shlex.quote(a) for a in argv), timeout=TIMEOUT_S + 10)
