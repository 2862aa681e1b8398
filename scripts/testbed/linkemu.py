#!/usr/bin/env python3
"""Userspace link emulator: the "cables" of the emulated edge cluster (stdlib only).

Why userspace: many kernels (this project's CI included) are built without `sch_netem`, and
no other qdisc can add delay. tc's tbf could shape the rate but not the latency, so each
board's link is a pair of TAP devices joined by this process instead of a veth pair:

    board netns: eth0 (TAP) <-> [uplink: rate, delay, loss] ... [downlink] <-> dspXXXXhI (TAP) on the bridge

Every frame is serialised at the link rate (a FIFO per direction), then delivered `delay`
later; `loss` drops it at random; a full queue tail-drops like a switch port. The TAPs are
created here (not persistent), so they vanish when this process ends.

    linkemu.py CONFIG.json      # {"links": [...], "ready_file": ..., "stats_file": ...}

SIGHUP re-reads rate/delay/loss from CONFIG; SIGTERM/SIGINT exit. Every 2 s it writes
per-link counters to `stats_file` (atomically).
"""

import fcntl
import heapq
import json
import os
import random
import selectors
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
READ_SIZE = 65536 + 64
BURST = 64                       # frames read from one TAP per wakeup (fairness between links)
QUEUE_SECONDS = 0.1              # port buffer: 100 ms at the link rate ...
QUEUE_MIN_BYTES = 512 * 1024     # ... but never less than this
STATS_EVERY = 2.0


def open_tap(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Direction:
    """One way of one link: token-free FIFO model (serialisation + fixed delay + loss)."""

    def __init__(self, out_fd):
        self.out_fd = out_fd
        self.busy_until = 0.0
        self.rate_bps = self.delay_s = self.loss = 0.0
        self.frames = self.bytes = self.dropped = 0

    def configure(self, rate_bps, delay_s, loss):
        self.rate_bps, self.delay_s, self.loss = float(rate_bps), float(delay_s), float(loss)

    def schedule(self, frame, now):
        """-> delivery time, or None when the frame is lost or the queue is full."""
        if self.loss and random.random() < self.loss:
            self.dropped += 1
            return None
        start = max(now, self.busy_until)
        if self.rate_bps:
            limit = max(QUEUE_MIN_BYTES * 8 / self.rate_bps, QUEUE_SECONDS)
            if start - now > limit:
                self.dropped += 1
                return None
            start += len(frame) * 8 / self.rate_bps
        self.busy_until = start
        self.frames += 1
        self.bytes += len(frame)
        return start + self.delay_s


class Emulator:
    def __init__(self, config_path):
        self.config_path = config_path
        self.config = load(config_path)
        self.sel = selectors.DefaultSelector()
        self.heap = []           # (deliver_at, seq, Direction, frame)
        self.seq = 0
        self.links = {}          # board -> {"up": Direction, "down": Direction}
        self.running = True
        for link in self.config["links"]:
            board_fd, host_fd = open_tap(link["board_tap"]), open_tap(link["host_tap"])
            up, down = Direction(host_fd), Direction(board_fd)
            self.links[link["board"]] = {"up": up, "down": down}
            self.sel.register(board_fd, selectors.EVENT_READ, up)
            self.sel.register(host_fd, selectors.EVENT_READ, down)
        self.apply(self.config)

    def apply(self, config):
        for link in config["links"]:
            dirs = self.links.get(link["board"])
            if dirs:
                for d in dirs.values():
                    d.configure(link["rate_bps"], link["delay_ms"] / 1000.0, link["loss_pct"] / 100.0)

    def reload(self):
        try:
            self.apply(load(self.config_path))
        except (OSError, ValueError, KeyError) as e:
            print("linkemu: reload failed: %s" % e, file=sys.stderr, flush=True)

    def read_ready(self, timeout):
        for key, _ in self.sel.select(timeout):
            direction = key.data
            for _ in range(BURST):
                try:
                    frame = os.read(key.fd, READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:          # device went away or is down: nothing to read
                    break
                at = direction.schedule(frame, time.monotonic())
                if at is not None:
                    self.seq += 1
                    heapq.heappush(self.heap, (at, self.seq, direction, frame))

    def deliver_due(self):
        now = time.monotonic()
        while self.heap and self.heap[0][0] <= now:
            _, _, direction, frame = heapq.heappop(self.heap)
            try:
                os.write(direction.out_fd, frame)
            except OSError:              # peer TAP down ("link down"): the frame is lost
                direction.dropped += 1

    def write_stats(self):
        path = self.config.get("stats_file")
        if not path:
            return
        stats = {b: {name: {"frames": d.frames, "bytes": d.bytes, "dropped": d.dropped}
                     for name, d in dirs.items()} for b, dirs in self.links.items()}
        stats["time"] = time.time()
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, path)

    def run(self):
        ready = self.config.get("ready_file")
        if ready:
            with open(ready, "w") as f:
                f.write(str(os.getpid()))
        next_stats = 0.0
        while self.running:
            now = time.monotonic()
            if now >= next_stats:
                self.write_stats()
                next_stats = now + STATS_EVERY
            timeout = min(next_stats - now, 1.0)
            if self.heap:
                timeout = max(0.0, min(timeout, self.heap[0][0] - now))
            self.read_ready(timeout)
            self.deliver_due()
        self.write_stats()


def load(path):
    with open(path) as f:
        return json.load(f)


def main(argv):
    if len(argv) != 2:
        print("usage: linkemu.py CONFIG.json", file=sys.stderr)
        return 2
    emu = Emulator(argv[1])

    def stop(*_):
        emu.running = False

    def hup(*_):
        emu.reload()             # only updates a few floats: safe from a Python signal handler

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hup)
    try:
        os.nice(-5)              # the wire should keep time even when boards saturate the CPUs
    except OSError:
        pass
    emu.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
