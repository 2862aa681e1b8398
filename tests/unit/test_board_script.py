"""Run the real board script on this machine, the way `dsparse probe` runs it on a board."""

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from dsparse_cli.probing import BOARD_SCRIPT_PATH, board_script_source
from dsparse_cli.probing import board_script as bs
from dsparse_cli.probing.parse import parse_probe_output

# the `dsparse probe --json` contract, spelled out here so dropping a key fails
CONTRACT = [
    "hostname", "kind", "model", "l4t_release", "arch", "cpus", "cpus_allowed", "cpu_model",
    "mem_total_bytes", "mem_available_bytes", "swap_total_bytes", "swap_free_bytes",
    "zram_bytes", "nvmap_bytes", "cgroup_version", "cgroup_limit_bytes", "cgroup_usage_bytes",
    "memory_limit_bytes", "usable_memory_bytes", "usable_memory_source", "python",
    "python_executable", "torch", "torchvision", "cuda", "cuda_device", "cuda_memory_bytes",
    "cuda_shared_memory", "disk_free_bytes", "workdir", "iface", "address", "warnings",
]


def run_script(args, *, stdin=False, python=sys.executable, prefix=(), env=None):
    """-> parsed JSON; asserts exit 0 and exactly one line of stdout."""
    if stdin:
        argv = [*prefix, python, "-", *args]
        p = subprocess.run(argv, input=board_script_source(), capture_output=True, text=True,
                           timeout=120, env=env)
    else:
        argv = [*prefix, python, BOARD_SCRIPT_PATH, *args]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip().splitlines()) == 1, p.stdout
    return json.loads(p.stdout)


def meminfo_kb(key):
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One complete probe, torch included, through stdin as over SSH."""
    workdir = tmp_path_factory.mktemp("probe") / "a" / "b"
    return run_script(["--workdir", str(workdir), "--master", "127.0.0.1"], stdin=True)


def test_contract_fields_present(full):
    missing = [k for k in CONTRACT if k not in full]
    assert not missing
    assert full["warnings"] == [] or all(isinstance(w, str) for w in full["warnings"])


def test_memory_matches_this_machine(full):
    assert full["mem_total_bytes"] == meminfo_kb("MemTotal") * 1024
    assert full["swap_total_bytes"] == meminfo_kb("SwapTotal") * 1024
    # MemAvailable moves by GiBs while other torch processes come and go: bound it by MemTotal.
    assert 0 < full["mem_available_bytes"] <= full["mem_total_bytes"]
    assert 0 < full["usable_memory_bytes"] <= full["mem_available_bytes"]
    assert full["usable_memory_source"] in ("meminfo", "cgroup")
    assert full["cgroup_version"] in (1, 2, None)


def test_identity_and_python(full):
    import platform
    import socket

    assert full["hostname"] == socket.gethostname()
    assert full["arch"] == platform.machine()
    assert full["python"] == platform.python_version()
    assert full["python_executable"] == sys.executable
    assert full["cpus"] == os.cpu_count()
    assert full["cpus_allowed"] == len(os.sched_getaffinity(0))
    assert full["kind"] in ("jetson", "rpi", "x86", "arm", "unknown")
    if platform.machine() == "x86_64" and not Path("/etc/nv_tegra_release").exists():
        assert full["kind"] == "x86"


def test_torch_versions_from_child(full):
    # the wheel's metadata may drop the local "+cpu"/"+cu121" suffix that __version__ keeps
    assert full["torch"].split("+")[0] == metadata.version("torch").split("+")[0]
    assert full["torchvision"].split("+")[0] == metadata.version("torchvision").split("+")[0]
    assert isinstance(full["cuda"], bool)
    if not full["cuda"]:
        assert full["cuda_device"] is None and full["cuda_memory_bytes"] is None
        assert full["cuda_shared_memory"] is False


def test_workdir_created_and_disk_measured(full, tmp_path):
    assert os.path.isdir(full["workdir"]) and full["workdir"].endswith("/a/b")
    st = os.statvfs(full["workdir"])
    assert abs(full["disk_free_bytes"] - st.f_bavail * st.f_frsize) < (1 << 30)


def test_route_to_loopback(full):
    assert full["iface"] == "lo" and full["address"] == "127.0.0.1"


def test_workdir_tilde_expanded(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path))
    out = run_script(["--workdir", "~/dsparse-work", "--no-torch"], env=env)
    assert out["workdir"] == str(tmp_path / "dsparse-work")
    assert (tmp_path / "dsparse-work").is_dir()


def test_inventory_limit_wins(tmp_path):
    out = run_script(["--workdir", str(tmp_path), "--memory-limit", "1000000", "--no-torch"])
    assert out["usable_memory_bytes"] <= 1_000_000
    assert out["usable_memory_source"] == "inventory"
    assert out["memory_limit_bytes"] == 1_000_000


def test_unresolvable_master_still_prints_json(tmp_path):
    out = run_script(["--workdir", str(tmp_path), "--master", "no-such-host.invalid",
                      "--no-torch"], stdin=True)
    assert out["iface"] is None and out["address"] is None
    assert any("no-such-host.invalid" in w for w in out["warnings"])
    assert out["mem_total_bytes"] == meminfo_kb("MemTotal") * 1024


def _can_unshare_net():
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare_net(), reason="needs unshare -n (root)")
def test_no_route_to_master_in_empty_netns(tmp_path):
    # a fresh network namespace has no routes at all: `ip route get` and connect() both fail
    out = run_script(["--workdir", str(tmp_path), "--master", "10.1.2.3", "--no-torch"],
                     prefix=["unshare", "-n"])
    assert out["iface"] is None and out["address"] is None
    assert any("no route to master 10.1.2.3" in w for w in out["warnings"])


def _routable(address):
    p = subprocess.run(["ip", "-o", "route", "get", address], capture_output=True, text=True)
    return p.returncode == 0


@pytest.mark.skipif(not shutil.which("ip"), reason="needs iproute2 to compare with")
@pytest.mark.parametrize("target", ["127.0.0.1", "10.1.2.3", "2001:db8::1"])
def test_fallback_without_ip_agrees_with_ip(target):
    # use_ip=False: UDP connect() for the source, SIOCGIFADDR / if_inet6 for the interface
    if not _routable(target):
        pytest.skip(f"this machine has no route to {target}")
    with_ip = bs.route_to(target, use_ip=True)
    without = bs.route_to(target, use_ip=False)
    assert with_ip[2] is None and with_ip == without


def test_torch_timeout_reports_null_and_warns(tmp_path):
    out = run_script(["--workdir", str(tmp_path), "--torch-timeout", "0.01"])
    assert out["torch"] is None and out["torchvision"] is None and out["cuda"] is False
    assert any("did not finish within 0.01s" in w for w in out["warnings"])
    assert out["torch_timed_out"] is True


OLD_PYTHONS = [p for p in (os.path.expanduser(f"~/.pyenv/versions/{v}/bin/python3")
                           for v in ("3.6.15", "3.8.18")) if os.path.exists(p)]


@pytest.mark.skipif(not OLD_PYTHONS, reason="no pyenv 3.6/3.8 interpreter on this machine")
@pytest.mark.parametrize("python", OLD_PYTHONS)
def test_runs_on_old_board_pythons(python, tmp_path):
    out = run_script(["--workdir", str(tmp_path), "--torch-timeout", "30"], stdin=True,
                     python=python)
    assert out["python"].startswith(python.split("/versions/")[1][:3])
    assert out["mem_total_bytes"] == meminfo_kb("MemTotal") * 1024
    missing = [k for k in CONTRACT if k not in out]
    assert not missing
    if out["torch"] is None:  # torch is not installed for those interpreters
        assert any("torch" in w for w in out["warnings"])


def test_parse_py_reads_real_output(full):
    info = parse_probe_output("local0", json.dumps(full) + "\n")
    assert info.ok and info.name == "local0"
    assert info.mem_total_bytes == full["mem_total_bytes"]
    assert info.torch == full["torch"]


# ---------------------------------------------------------------- a real memory cgroup

def _make_limited_cgroup(tmp_name, parent_limit):
    """Create <own memory cgroup>/<tmp_name>/child with the limit on the parent only.
    -> (procs file to join, [dirs to remove]) or None when not permitted here."""
    version, dirs = bs.find_cgroup("memory")
    if version is None:
        return None
    parent = os.path.join(dirs[0], tmp_name)
    child = os.path.join(parent, "child")
    limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
    try:
        os.mkdir(parent)
    except OSError:
        return None
    try:
        os.mkdir(child)
        with open(os.path.join(parent, limit_file), "w") as f:
            f.write(str(parent_limit))
    except OSError:
        for d in (child, parent):
            if os.path.isdir(d):
                os.rmdir(d)
        return None
    return os.path.join(child, "cgroup.procs"), [child, parent]


def test_real_cgroup_limit_on_parent_is_found(tmp_path):
    limit = 300_000_000
    made = _make_limited_cgroup(f"dsparse-probe-test-{os.getpid()}", limit)
    if made is None:
        pytest.skip("cannot create a memory cgroup here (needs root and a writable cgroupfs)")
    procs, cleanup = made
    try:
        shell = f'echo $$ > {procs} && exec "$0" "$@"'
        out = run_script(["--workdir", str(tmp_path), "--no-torch"],
                         prefix=["sh", "-c", shell])
    finally:
        for d in cleanup:
            os.rmdir(d)
    # the kernel rounds the limit down to a page
    assert limit - 65536 < out["cgroup_limit_bytes"] <= limit
    assert out["usable_memory_source"] == "cgroup"
    assert out["usable_memory_bytes"] <= out["cgroup_limit_bytes"]
    assert out["cgroup_usage_bytes"] > 0


@pytest.mark.skipif(not shutil.which("taskset"), reason="taskset (util-linux) is not installed")
def test_effective_cpus_follow_the_affinity():
    out = run_script(["--no-torch"], prefix=["taskset", "-c", "0"])
    assert out["cpus_allowed"] == 1 and out["cpus_effective"] == 1
    assert out["cpus_effective"] == bs.effective_cpus(out["cpus"], out["cpus_allowed"], out["cpu_quota"])
