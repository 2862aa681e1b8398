"""`dsparse train/status/stop/logs` across three boards that are three real sshd instances on
loopback (own host keys, client keys and workdirs; one workdir is `~`-relative), through the real
entry point: probe -> plan --push -> train, detach/watch/stop, Ctrl-C, and the errors that must
come before anything is started. (A killed worker and `--resume` over SSH are in
tests/e2e/test_cluster.py, on boards with their own network and memory limits.)

Every process of a job is checked by its exact PID in /proc (sshd is local): the launcher's (== its
process group and session) and the worker's, which the launcher starts in a session of its own.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from helpers import one_line_error, run_cli, seed_profile, wait_for
from sshd import SSHDUnavailable, SSHServer, free_port, start_sshd

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

BOARDS = ("b0", "b1", "b2")
TRAIN = ("train", "--dataset", "digits", "--collective-timeout", "30", "--connect-timeout", "10")


@dataclass
class Cluster:
    dir: Path
    servers: list[SSHServer]
    spec_workdirs: dict[str, str]  # as written in cluster.yaml
    workdirs: dict[str, Path]      # as seen from here (sshd is local)
    master_port: int

    def yaml(self, *, ports: dict[str, int] | None = None, pythons: dict[str, str] | None = None) -> str:
        lines = ["name: ssh3", f"defaults: {{user: {self.servers[0].user}, known_hosts: known_hosts}}",
                 f"master: {{addr: 127.0.0.1, port: {self.master_port}}}", "boards:"]
        for name, server in zip(BOARDS, self.servers):
            lines.append(f"  - name: {name}\n    host: 127.0.0.1\n    port: {(ports or {}).get(name, server.port)}\n"
                         f"    identity_file: {server.client_key}\n"
                         f"    python: {(pythons or {}).get(name, sys.executable)}\n"
                         f"    workdir: {self.spec_workdirs[name]}")
        return "\n".join(lines) + "\n"


def _start_servers(d: Path) -> list[SSHServer]:
    servers = []
    try:
        for i in range(len(BOARDS)):
            servers.append(start_sshd(d / f"sshd{i}"))
    except SSHDUnavailable as e:
        for s in servers:
            s.stop()
        if os.environ.get("CI"):
            pytest.fail(f"sshd unavailable in CI: {e}")
        pytest.skip(str(e))
    return servers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_cnn_profile):
    """Three sshd boards in one cluster.yaml (the first test probes and plans them, from the
    profile measured once for the session)."""
    d = tmp_path_factory.mktemp("train_ssh")
    seed_profile(tiny_cnn_profile, d / ".dsparse")
    servers = _start_servers(d)
    # b2's workdir is relative to the login's home: every path must resolve `~` over SSH.
    home = Path(pwd.getpwnam(servers[0].user).pw_dir)  # what sshd gives the login, not $HOME
    home_rel = f".dsparse-test-{uuid.uuid4().hex[:8]}"
    spec = {"b0": str(d / "w0"), "b1": str(d / "w1"), "b2": f"~/{home_rel}/w2"}
    (d / "known_hosts").write_text("".join(Path(s.known_hosts).read_text() for s in servers))
    c = Cluster(d, servers, spec, {"b0": d / "w0", "b1": d / "w1", "b2": home / home_rel / "w2"}, free_port())
    (d / "cluster.yaml").write_text(c.yaml())
    try:
        yield c
    finally:
        _kill_recorded_leftovers(d)
        for s in servers:
            s.stop()
        shutil.rmtree(home / home_rel, ignore_errors=True)


def _kill_recorded_leftovers(d: Path) -> None:
    """Safety net for a failed test: SIGKILL exactly the process groups the job records name."""
    for path in (d / ".dsparse" / "jobs").glob("*.json"):
        for b in json.loads(path.read_text()).get("boards", []):
            for pgid in (b.get("pgid"), b.get("worker_pid")):
                if pgid and _alive(pgid) and b["run_dir"].encode() in _cmdline(pgid):  # ours, not a reused pid
                    try:
                        os.killpg(pgid, signal.SIGKILL)
                    except OSError:
                        pass


# -- helpers ---------------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """Fields after comm in /proc/PID/stat: [state, ppid, pgrp, session, ...]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    f = _stat(pid)
    return f is not None and f[0] not in ("Z", "X")


def _session_members(sids: set[int]) -> list[int]:
    """Live processes in any of these sessions (the launcher and the worker each lead one)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat(int(entry))
            if f and f[0] not in ("Z", "X") and (int(f[2]) in sids or int(f[3]) in sids):
                found.append(int(entry))
    return found


def _latest(c: Cluster) -> dict | None:
    jobs = c.dir / ".dsparse" / "jobs"
    try:
        return json.loads((jobs / f"{(jobs / 'latest').read_text().strip()}.json").read_text())
    except (OSError, ValueError):
        return None


def _heartbeat(run: dict) -> dict | None:
    try:
        return json.loads(Path(run["run_dir"], "status.json").read_text())
    except (OSError, ValueError):
        return None


def _job_pids(job: dict) -> set[int]:
    """The launcher's pid and the worker's (from the record, else its heartbeat) on every board."""
    pids = set()
    for b in job["boards"]:
        hb = _heartbeat(b) or {}
        pids |= {p for p in (b["pid"], b.get("worker_pid"), hb.get("pid")) if p}
    return pids


def _assert_nothing_left(job: dict) -> None:
    pids = _job_pids(job)
    assert len(pids) == 2 * len(BOARDS), f"expected launcher and worker pids on every board, got {pids}"
    alive = [p for p in pids if _alive(p)]
    assert not alive, f"processes of job {job['id']} still alive: {alive}"
    assert not _session_members(pids), "a process of the job survives in its sessions"


def _running_job(c: Cluster, previous_id: str | None, min_step: int, limit: float = 120) -> dict:
    """The new job, once every board's heartbeat is past `min_step` (read from the files here)."""
    def ready():
        job = _latest(c)
        if not job or job["id"] == previous_id or not all(b["pid"] for b in job["boards"]):
            return None
        hbs = [_heartbeat(b) for b in job["boards"]]
        if all(hb and hb.get("state") == "running" and (hb.get("global_step") or 0) >= min_step for hb in hbs):
            return job
        return None
    job = wait_for(ready, limit)
    assert job, f"the job never got every board to step {min_step}"
    return job


def _popen(c: Cluster, *args: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "dsparse_cli", *args], cwd=c.dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect_output(proc: subprocess.Popen) -> list[str]:
    """Chunks of the process's stdout as they arrive (read in a thread; join them to search)."""
    chunks: list[str] = []
    threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(256), "")), daemon=True).start()
    return chunks


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


# -- the tests (module order matters: the first one probes and plans) --------------------------------
def test_probe_plan_push_train_status(cluster):
    c = cluster
    proc = run_cli("probe", "--json", cwd=c.dir, timeout=180)
    assert proc.returncode == 0, proc.stderr
    probed = {b["name"]: b for b in json.loads(proc.stdout)["boards"]}
    # (torch itself may be reported missing here: a loaded machine can exceed the probe's import timeout)
    assert all(probed[n]["ok"] and probed[n]["iface"] == "lo" for n in BOARDS), probed

    proc = run_cli("plan", "--model", "tiny_cnn", "--batch-size", "16", "--push", "--json", cwd=c.dir, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    assert [d["name"] for d in plan["devices"]] == list(BOARDS)
    for name in BOARDS:  # pushed over SFTP, `~` resolved for b2
        assert json.loads((c.workdirs[name] / "plan.json").read_text())["profile_key"] == plan["profile_key"]

    proc = run_cli(*TRAIN, "--max-steps", "3", "--json", cwd=c.dir, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["state"] == "finished" and summary["accuracy"] is not None
    assert [b["state"] for b in summary["boards"]] == ["finished"] * 3

    job = _latest(c)
    assert job["id"] == summary["job"] and job["state"] == "finished"
    for b in job["boards"]:
        wd = c.workdirs[b["name"]]
        assert b["run_dir"] == f"{wd}/runs/{job['id']}"  # `~` resolved to the board's home once
        assert b["started"] and b["pid"] == b["pgid"]
        on_board = json.loads((wd / "job.json").read_text())  # the job recorded on the board too
        assert (on_board["id"], on_board["pid"], on_board["run_dir"]) == (job["id"], b["pid"], b["run_dir"])
        assert on_board["plan_hash"] == job["plan_hash"]
        assert (wd / "pkg" / "dsparse_cli" / "runtime" / "worker.py").is_file()  # runtime shipped
        assert (wd / "data" / "digits.csv.gz").is_file()                         # so is the data
        assert json.loads(Path(b["run_dir"], "summary.json").read_text())["steps"] == 3
    _assert_nothing_left(job)

    proc = run_cli("status", "--json", cwd=c.dir)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["job"] == job["id"] and status["state"] == "finished"
    for b in status["boards"]:
        for key in ("epoch", "step", "loss", "accuracy", "samples_per_s", "peak_memory_bytes",
                    "agg_ms_per_step", "bytes_per_step", "heartbeat_age_s", "budget_bytes"):
            assert b[key] is not None, key
        assert b["state"] == "finished" and b["bytes_per_step"] > 0
    proc = run_cli("status", cwd=c.dir)
    assert proc.returncode == 0 and f"job {job['id']}: finished (3 finished)" in proc.stdout

    proc = run_cli("logs", "b2", "-n", "40", cwd=c.dir)
    assert proc.returncode == 0 and "[b2 rank 2]" in proc.stdout and "accuracy" in proc.stdout


def test_detach_watch_stop_leaves_nothing(cluster):
    c = cluster
    before = _latest(c)
    proc = run_cli(*TRAIN, "--epochs", "5", "--detach", "--json", cwd=c.dir, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    started = json.loads(proc.stdout)
    job = _running_job(c, before and before["id"], min_step=1)
    assert job["id"] == started["job"]

    for rank, b in enumerate(job["boards"]):
        worker = _heartbeat(b)["pid"]
        launcher = _stat(b["pid"])
        assert launcher[3] == str(b["pid"]) and _stat(worker)[3] == str(worker)  # own sessions
        env = _environ(worker)  # the interface the probe found toward the master
        assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "lo"
        assert env["PYTHONPATH"] == str(c.workdirs[b["name"]] / "pkg")
        cmdline = _cmdline(b["pid"]).split(b"\0")
        # dsparse's own launcher, not torchrun's agent (which would import torch next to the worker)
        assert cmdline[0].decode() == sys.executable and b"dsparse_cli.runtime.supervise" in cmdline
        assert not any(b"torch.distributed.run" in _cmdline(p) for p in (b["pid"], worker))
        assert cmdline[cmdline.index(b"--rank") + 1] == str(rank).encode()
        assert env["RANK"] == str(rank) and env["LOCAL_RANK"] == "0"

    follow = _popen(c, "logs", "b1", "-f", "-n", "20")
    followed = _collect_output(follow)  # `tail -F` over SSH: the log so far, then it waits
    try:
        assert wait_for(lambda: "[b1 rank 1]" in "".join(followed), 30), "".join(followed)
        assert follow.poll() is None  # still following
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=30)

    # The watch renders live (as on a terminal) until the job ends: here, stopped from elsewhere.
    watch = _popen(c, "status", "--watch", "--interval", "1", env={"TTY_COMPATIBLE": "1"})
    seen = _collect_output(watch)
    try:
        assert wait_for(lambda: f"job {job['id']}: running (3 running)" in "".join(seen), 60), "".join(seen)[-2000:]
        proc = run_cli("stop", "--grace", "10", cwd=c.dir, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"job {job['id']} stopped on 3 boards" in proc.stdout
        watch.wait(timeout=60)  # it ends by itself once the job is stopped
    finally:
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == 0, watch.stderr.read()
    assert wait_for(lambda: f"job {job['id']}: stopped (3 stopped)" in "".join(seen), 10), "".join(seen)[-2000:]
    _assert_nothing_left(_latest(c))
    proc = run_cli("status", "--json", cwd=c.dir)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["state"] == "stopped" and [b["state"] for b in status["boards"]] == ["stopped"] * 3



def test_status_logs_stop_after_cluster_yaml_changed_from_elsewhere(cluster, tmp_path):
    """Issues #14 and #16 over SSH: once the job runs, cluster.yaml renames b1, moves b2 to another
    port and gains a board whose identity file is missing. From another directory, with no
    --cluster, status/logs/stop still find the job and reach every board as the job recorded it."""
    c = cluster
    before = _latest(c)
    proc = run_cli(*TRAIN, "--epochs", "5", "--detach", cwd=c.dir, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = _running_job(c, before and before["id"], min_step=10)   # the worker logs every 10 steps
    broken = f"  - {{name: extra, host: 127.0.0.1, identity_file: {c.dir / 'no-such-key'}}}\n"
    changed = c.yaml(ports={"b2": free_port()}).replace("name: b1\n", "name: b1-renamed\n") + broken
    (c.dir / "cluster.yaml").write_text(changed)
    try:
        proc = run_cli("status", "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert (doc["job"], doc["cluster"], doc["inventory"]) == (job["id"], "ssh3", str(c.dir / "cluster.yaml"))
        assert [b["state"] for b in doc["boards"]] == ["running"] * 3
        assert "board b1 is no longer in" in proc.stderr and "board b2 changed in" in proc.stderr
        assert "internal error" not in proc.stderr

        proc = run_cli("logs", "b1", "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert any("[b1 rank 1]" in line for line in json.loads(proc.stdout)["boards"][0]["lines"])

        proc = run_cli("stop", "--grace", "10", cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"job {job['id']} stopped on 3 boards (cluster ssh3 ({c.dir / 'cluster.yaml'}))" in proc.stdout
    finally:
        (c.dir / "cluster.yaml").write_text(c.yaml())
    _assert_nothing_left(_latest(c))
    assert _latest(c)["state"] == "stopped"

def test_ctrl_c_stops_every_board(cluster):
    c = cluster
    before = _latest(c)
    train = _popen(c, *TRAIN, "--epochs", "5")
    try:
        job = _running_job(c, before and before["id"], min_step=1)
        train.send_signal(signal.SIGINT)
        out, err = train.communicate(timeout=120)
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
    assert train.returncode == 130, err[-3000:]
    assert "interrupted: stopping every board of the job" in err
    job = _latest(c)
    assert job["state"] == "stopped"
    _assert_nothing_left(job)


@pytest.mark.parametrize("case,code", [("unreachable", 1), ("no_torch", 1), ("probe_found_no_torch", 2),
                                       ("port_in_use", 1)])
def test_refused_before_anything_starts(cluster, tmp_path, case, code):
    c = cluster
    before = _latest(c)
    logs_before = {p for w in c.workdirs.values() for p in w.glob("runs/*/worker.log")}
    cwd, extra, held = c.dir, (), None
    try:
        if case == "unreachable":  # accepts TCP (the kernel does) but never speaks SSH: a hung board
            held = socket.socket()
            held.bind(("127.0.0.1", 0))
            held.listen()
            (c.dir / "bad.yaml").write_text(c.yaml(ports={"b2": held.getsockname()[1]}))
            extra, needle = ("--cluster", "bad.yaml", "--connect-timeout", "3"), "did not answer within 3s"
        elif case == "no_torch":
            venv = tmp_path / "notorch"
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
            (c.dir / "bad.yaml").write_text(c.yaml(pythons={"b1": str(venv / "bin/python")}))
            extra, needle = ("--cluster", "bad.yaml"), "board b1 has no torch and no torchvision"
        elif case == "probe_found_no_torch":  # the plan was made from a probe that found no torch
            cwd = tmp_path
            shutil.copy(c.dir / "cluster.yaml", cwd)
            shutil.copy(c.dir / "known_hosts", cwd)
            plan = json.loads((c.dir / ".dsparse" / "plan.json").read_text())
            for name in BOARDS:  # (the real probe may have timed out on its torch import: set them all)
                plan["probe"][name].update(source="probe", torch=None if name == "b1" else "2.5.0")
            (cwd / ".dsparse").mkdir()
            (cwd / ".dsparse" / "plan.json").write_text(json.dumps(plan))
            needle = "the probe found no torch on board b1"
        else:
            held = socket.socket()
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # earlier jobs left TIME_WAITs
            held.bind(("127.0.0.1", c.master_port))
            held.listen()
            needle = f"port {c.master_port} is already in use on board b0"
        proc = run_cli(*TRAIN, "--max-steps", "2", *extra, cwd=cwd, timeout=120)
    finally:
        if held:
            held.close()
    assert proc.returncode == code, proc.stderr
    assert needle in one_line_error(proc)
    after = _latest(c)
    assert (after and after["id"]) == (before and before["id"]), "a job was recorded"
    assert not (tmp_path / ".dsparse" / "jobs" / "latest").exists()
    assert {p for w in c.workdirs.values() for p in w.glob("runs/*/worker.log")} == logs_before, \
        "a worker was started on some board"


def test_inventory_iface_overrides_probe(cluster):
    """The probe's interface is used unless the inventory names one (no process needed)."""
    from dsparse_cli.inventory import load_inventory
    from dsparse_cli.contract import Plan
    from dsparse_cli.jobs.launch import probe_ifaces, worker_env

    inv = load_inventory(cluster.dir / "cluster.yaml")
    plan = json.loads((cluster.dir / ".dsparse" / "plan.json").read_text())
    ifaces = probe_ifaces(inv, Plan.from_dict(plan))
    assert ifaces == {n: "lo" for n in BOARDS}
    b0 = inv.board("b0")
    assert worker_env(b0, inv, "/pkg", ifaces["b0"])["GLOO_SOCKET_IFNAME"] == "lo"
    env = worker_env(replace(b0, iface="eth7"), inv, "/pkg", ifaces["b0"])
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "eth7"
