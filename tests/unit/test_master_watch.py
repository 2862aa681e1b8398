"""A worker cut off from the master ends itself (issue #16: no orphan waits in a collective)."""

from __future__ import annotations

import gc
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from dsparse_cli.runtime.stopping import MasterWatch, StopControl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lost_only_after_the_master_stays_silent_for_the_limit():
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    lost: list[float] = []
    called, stop = threading.Event(), StopControl()
    watch = MasterWatch("127.0.0.1", port, lost_s=1.5, stop=stop, every_s=0.2,
                on_lost=lambda silent: (lost.append(silent), called.set()))
    time.sleep(2.5)                     # the master answers: longer than the limit, nothing happens
    assert not lost
    gone = time.monotonic()
    del master                          # the master goes away (rank 0's agent ended, link down)
    gc.collect()
    assert called.wait(10), "the watch never gave up on a silent master"
    assert 1.5 <= lost[0] and time.monotonic() - gone < 5
    stop.done.set()                     # the threads end with the worker
    for t in watch.threads:
        t.join(10)
    assert not any(t.is_alive() for t in watch.threads)


def test_a_finished_worker_is_never_called_lost():
    stop = StopControl()
    lost = []
    watch = MasterWatch("127.0.0.1", free_port(), lost_s=0.5, stop=stop, every_s=0.1, on_lost=lost.append)
    stop.done.set()                     # nothing listens on that port, but the worker is done
    for t in watch.threads:
        t.join(10)
    assert not lost and not any(t.is_alive() for t in watch.threads)
