"""up / down / link: build and remove the emulated edge cluster that testbed.json records."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import cgroups, files, net, procs, record, sshd
from .errors import TestbedError
from .profiles import BoardSpec

LINKEMU = Path(__file__).with_name("linkemu.py")
REPO = Path(__file__).resolve().parents[2]
ETC_NETNS = Path("/etc/netns")
FIRST_HOST = 10                      # board i is 10.213.X.(10+i)


# ---------------------------------------------------------------- up

def up(directory: Path, specs: list[BoardSpec], python: str, mtu: int, log=print) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    _refuse_if_up(directory)
    h = cgroups.find_hierarchy()
    hc = cgroups.find_hierarchy(controller="cpu") if any(s.cpus for s in specs) else None
    rec = _plan(directory, specs, python, mtu, h, hc)
    record.save(directory, rec)
    try:
        _build(directory, rec, h, log)
    except BaseException:
        log("up failed: removing what was made")
        down(directory, log=lambda *_: None)
        raise
    rec["state"] = "up"
    record.save(directory, rec)
    return rec


def _refuse_if_up(directory: Path) -> None:
    rec = record.load(directory)
    if rec is None:
        return
    if _anything_exists(rec):
        raise TestbedError(f"a testbed is already up in {directory} (run `edge-testbed down --dir "
                           f"{directory}` first)")
    record.remove(directory)          # stale record of a testbed that no longer exists


def _plan(directory: Path, specs: list[BoardSpec], python: str, mtu: int, h: cgroups.Hierarchy,
          hc: cgroups.Hierarchy | None) -> dict:
    """`hc`: the cpu controller's hierarchy when a board has a CPU allowance (the memory one on
    cgroup2, a hierarchy of its own on v1), else None."""
    tid = _free_id(directory, [h] + ([hc] if hc else []))
    subnet = net.pick_subnet(int(tid, 16))
    base = str(subnet.network_address).rsplit(".", 1)[0]
    prefix, ifp = f"dsp-{tid}", f"dsp{tid}"
    boards = []
    for i, s in enumerate(specs):
        name = f"b{i}"
        boards.append({
            "name": name, "addr": f"{base}.{FIRST_HOST + i}", "netns": f"{prefix}-{name}",
            "host_tap": f"{ifp}h{i}", "board_tap": f"{ifp}b{i}",
            "cgroup": str(Path(h.mountpoint) / prefix / name),
            "cpu_cgroup": str(Path(hc.mountpoint) / prefix / name) if hc and s.cpus else None, "cpus": s.cpus,
            "memory": s.memory, "rate_bps": s.rate_bps, "delay_ms": s.delay_ms, "loss_pct": s.loss_pct,
            "emulates": s.emulates, "workdir": str(directory / "boards" / name),
            "run_dir": str(directory / "run" / name), "sshd_pid": None,
            "etc_netns": str(ETC_NETNS / f"{prefix}-{name}"),
        })
    return {
        "version": 1, "state": "creating", "id": tid, "prefix": prefix, "dir": str(directory),
        "subnet": str(subnet), "mtu": mtu, "python": python, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "bridge": {"name": f"{ifp}br", "addr": f"{base}.1"},
        "cgroup": {"version": h.version, "mountpoint": h.mountpoint,
                   "parent": str(Path(h.mountpoint) / prefix),
                   "link": str(Path(h.mountpoint) / prefix / "link"),
                   "cpu": {"version": hc.version, "mountpoint": hc.mountpoint,
                           "parent": str(Path(hc.mountpoint) / prefix)} if hc else None},
        "linkemu": {"pid": None, "config": str(directory / "run" / "links.json"),
                    "stats": str(directory / "run" / "linkstats.json")},
        "etc_netns_created": False,
        "boards": boards,
    }


def _free_id(directory: Path, hierarchies: list[cgroups.Hierarchy]) -> str:
    """An id whose names (bridge, namespaces, cgroups) nothing on this machine uses yet, so a
    failed `up` can safely remove everything its record names."""
    namespaces = net.netns_list()
    for salt in range(32):
        tid = record.testbed_id(directory, salt)
        if not (net.link_exists(f"dsp{tid}br") or any(os.path.exists(Path(h.mountpoint) / f"dsp-{tid}")
                                                      for h in hierarchies)
                or any(ns.startswith(f"dsp-{tid}-") for ns in namespaces)):
            return tid
    raise TestbedError("no free testbed name: too many dsp-* testbeds or leftovers (see `ip netns list`)")


def _build(directory: Path, rec: dict, h: cgroups.Hierarchy, log) -> None:
    client_pub = sshd.keygen(directory / "id_ed25519", f"edge-testbed-{rec['id']}")
    files.write(directory / "authorized_keys", client_pub + "\n", 0o600)
    _make_cgroups(rec, h)
    log(f"cgroups (v{h.version}) under {rec['cgroup']['parent']}")
    net.create_bridge(rec["bridge"]["name"], f"{rec['bridge']['addr']}/24", rec["mtu"])
    for b in rec["boards"]:
        net.ip("netns", "add", b["netns"])
    _start_linkemu(rec)
    for b in rec["boards"]:
        net.attach_to_bridge(b["host_tap"], rec["bridge"]["name"], rec["mtu"])
        net.setup_board_ns(b["netns"], b["board_tap"], f"{b['addr']}/24", rec["bridge"]["addr"], rec["mtu"])
    log(f"network {rec['subnet']} on bridge {rec['bridge']['name']}, links emulated by pid "
        f"{rec['linkemu']['pid']}")
    _write_board_hosts(rec)
    record.save(directory, rec)
    host_keys = _start_sshds(directory, rec, h)
    files.write(directory / "known_hosts", files.known_hosts(rec, host_keys))
    files.write(directory / "cluster.yaml", files.cluster_yaml(rec))
    for b in rec["boards"]:
        Path(b["workdir"]).mkdir(parents=True, exist_ok=True)


def _make_cgroups(rec: dict, h: cgroups.Hierarchy) -> None:
    hc = _cpu_hierarchy(rec)
    shared = hc is not None and hc.mountpoint == h.mountpoint          # cgroup2: one tree for both
    cgroups.create_parent(h, rec["prefix"], ("memory", "cpu") if shared else ("memory",))
    if hc is not None and not shared:
        cgroups.create_parent(hc, rec["prefix"], ("cpu",))
    cgroups.create_child(h, rec["cgroup"]["parent"], "link", None)
    for b in rec["boards"]:
        cgroups.create_child(h, rec["cgroup"]["parent"], b["name"], b["memory"])
        if b.get("cpus"):
            if not shared:
                cgroups.create_child(hc, rec["cgroup"]["cpu"]["parent"], b["name"], None)
            cgroups.set_cpus(hc.version, b["cpu_cgroup"], b["cpus"])


def _cpu_hierarchy(rec: dict) -> cgroups.Hierarchy | None:
    cpu = rec["cgroup"].get("cpu")
    return cgroups.Hierarchy(cpu["version"], cpu["mountpoint"]) if cpu else None


def _cpu_cgroups(rec: dict) -> list[str]:
    """The cpu hierarchy's own cgroups (v1), children first; none when they are the memory ones."""
    cpu = rec["cgroup"].get("cpu")
    if not cpu or cpu["mountpoint"] == rec["cgroup"]["mountpoint"]:
        return []
    return [b["cpu_cgroup"] for b in rec["boards"] if b.get("cpu_cgroup")] + [cpu["parent"]]


def _start_linkemu(rec: dict) -> None:
    cfg = Path(rec["linkemu"]["config"])
    cfg.parent.mkdir(parents=True, exist_ok=True)
    ready = cfg.with_name("linkemu.ready")
    ready.unlink(missing_ok=True)
    _write_links(rec, ready)
    cg = rec["cgroup"]["link"]
    with open(cfg.with_name("linkemu.log"), "ab") as out:
        proc = subprocess.Popen([sys.executable, str(LINKEMU), str(cfg)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: _join_cgroup(cg))
    rec["linkemu"]["pid"] = proc.pid
    record.save(Path(rec["dir"]), rec)
    deadline = time.monotonic() + 10
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = cfg.with_name("linkemu.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise TestbedError(f"link emulator did not start: {' '.join(tail) or 'timeout'}")
        time.sleep(0.05)


def _write_links(rec: dict, ready: Path | None = None) -> None:
    cfg = Path(rec["linkemu"]["config"])
    keys = ("board_tap", "host_tap", "rate_bps", "delay_ms", "loss_pct")
    links = [{"board": b["name"], **{k: b[k] for k in keys}} for b in rec["boards"]]
    old = json.loads(cfg.read_text()) if cfg.exists() else {}
    data = {"links": links, "ready_file": str(ready) if ready else old.get("ready_file"),
            "stats_file": rec["linkemu"]["stats"]}
    tmp = cfg.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, cfg)


def _join_cgroup(path: str) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def _write_board_hosts(rec: dict) -> None:
    if not ETC_NETNS.exists():
        ETC_NETNS.mkdir(mode=0o755)
        rec["etc_netns_created"] = True
    text = files.board_hosts(rec)
    for b in rec["boards"]:
        Path(b["etc_netns"]).mkdir(exist_ok=True)
        files.write(Path(b["etc_netns"]) / "hosts", text)
        files.write(Path(b["etc_netns"]) / "resolv.conf", files.BOARD_RESOLV_CONF)


def _start_sshds(directory: Path, rec: dict, h: cgroups.Hierarchy) -> dict[str, str]:
    hc = _cpu_hierarchy(rec)
    mounts = cgroups.replicate_mounts_script(h, also=(hc.mountpoint,) if hc else ())
    keys, started = {}, []
    for b in rec["boards"]:
        run = Path(b["run_dir"])
        run.mkdir(parents=True, exist_ok=True)
        keys[b["name"]] = sshd.keygen(run / "host_ed25519", f"{b['name']}@{rec['prefix']}")
        cfg = sshd.write_config(run, b["addr"], directory / "authorized_keys")
        joins = list(dict.fromkeys(c for c in (b["cgroup"], b.get("cpu_cgroup")) if c))  # v2: the same
        script = sshd.write_start_script(run, b["name"], mounts, joins, cfg)
        started.append(sshd.start(b["netns"], script, run / "sshd.log"))
        b["sshd_pid"] = started[-1].pid
        record.save(directory, rec)
    for b, proc in zip(rec["boards"], started):
        sshd.wait_listening(b["addr"], proc, Path(b["run_dir"]) / "sshd.log")
    return keys


# ---------------------------------------------------------------- down

def down(directory: Path, log=print) -> list[str]:
    """Remove everything testbed.json lists; -> what could not be removed (empty: all gone)."""
    rec = record.load(directory)
    if rec is None:
        log(f"nothing to remove: no {record.NAME} in {directory}")
        return []
    for b in rec["boards"]:
        procs.stop(b.get("sshd_pid"), b["run_dir"])
    procs.stop(rec["linkemu"].get("pid"), rec["linkemu"]["config"])
    cg = rec["cgroup"]
    children = [b["cgroup"] for b in rec["boards"]] + [cg["link"]]
    cgroups.kill_all([c for c in children if os.path.isdir(c)])   # whatever still runs on a board
    for b in rec["boards"]:
        net.delete_netns(b["netns"])
        net.delete_link(b["host_tap"])
        shutil.rmtree(b["etc_netns"], ignore_errors=True)
    net.delete_link(rec["bridge"]["name"])
    if rec.get("etc_netns_created"):
        try:
            ETC_NETNS.rmdir()                 # only if empty: another tool may use it by now
        except OSError:
            pass
    left = cgroups.remove(children + [cg["parent"]] + _cpu_cgroups(rec))
    left += _still_there(rec)
    if left:
        for item in left:
            log(f"could not remove: {item}")
        return left
    shutil.rmtree(directory / "run", ignore_errors=True)
    record.remove(directory)
    log(f"removed testbed {rec['prefix']} ({len(rec['boards'])} boards)")
    return []


def _still_there(rec: dict) -> list[str]:
    left = []
    namespaces = net.netns_list()
    for b in rec["boards"]:
        if b["netns"] in namespaces:
            left.append(f"netns {b['netns']}")
        if procs.is_ours(b.get("sshd_pid"), b["run_dir"]):
            left.append(f"sshd pid {b['sshd_pid']}")
    if net.link_exists(rec["bridge"]["name"]):
        left.append(f"bridge {rec['bridge']['name']}")
    return left


def _anything_exists(rec: dict) -> bool:
    cgroup_dirs = [rec["cgroup"]["parent"], *_cpu_cgroups(rec)]
    return bool(_still_there(rec)) or any(os.path.isdir(p) for p in cgroup_dirs) or \
        procs.is_ours(rec["linkemu"].get("pid"), rec["linkemu"]["config"])


# ---------------------------------------------------------------- reboot

def reboot(directory: Path, board: str, down_s: float = 2.0) -> dict:
    """Power-cycle a board: SIGKILL everything in its memory cgroup (sshd, launchers, workers, as a
    power cut would), stay down `down_s`, then start its sshd again with the same host key (the
    board comes back; its files, on disk, survive)."""
    rec, b = _up_board(directory, board)
    cgroups.kill_all([b["cgroup"]])
    time.sleep(down_s)
    run = Path(b["run_dir"])
    proc = sshd.start(b["netns"], run / "start-sshd.sh", run / "sshd.log")
    b["sshd_pid"] = proc.pid
    record.save(directory, rec)
    sshd.wait_listening(b["addr"], proc, run / "sshd.log")
    return b


def memory(directory: Path, board: str, limit: int, above_idle: bool = False) -> dict:
    """A new memory limit for a board, live (its cgroup; swap capped with it, as `up` does).
    `above_idle`: `limit` on top of what the board's own processes hold now (its sshd), so a job
    gets `limit` whatever the board runs besides it."""
    rec, b = _up_board(directory, board)
    if above_idle:
        limit += cgroups.anon_bytes(b["cgroup"])
    cgroups.set_limit(rec["cgroup"]["version"], b["cgroup"], limit)
    b["memory"] = limit
    record.save(directory, rec)
    return b


def _up_board(directory: Path, board: str) -> tuple[dict, dict]:
    rec = record.load(directory)
    if rec is None or rec.get("state") != "up":
        raise TestbedError(f"no testbed is up in {directory}", 2)
    b = next((b for b in rec["boards"] if b["name"] == board), None)
    if b is None:
        names = ", ".join(x["name"] for x in rec["boards"])
        raise TestbedError(f"no board {board!r} (boards: {names})", 2)
    return rec, b


# ---------------------------------------------------------------- link

def link(directory: Path, board: str, action: str, rate: int | None = None,
         delay_ms: float | None = None, loss_pct: float | None = None) -> dict:
    """`up`/`down`: the board's bridge-side TAP (its cable); `set`: new rate/delay/loss, live."""
    rec, b = _up_board(directory, board)
    if action in ("up", "down"):
        net.ip("link", "set", "dev", b["host_tap"], action)
        return b
    for key, value in (("rate_bps", rate), ("delay_ms", delay_ms), ("loss_pct", loss_pct)):
        if value is not None:
            b[key] = value
    record.save(directory, rec)
    _write_links(rec)
    if procs.is_ours(rec["linkemu"]["pid"], rec["linkemu"]["config"]):
        os.kill(rec["linkemu"]["pid"], signal.SIGHUP)
    return b
