"""Board probe: runs ON the board (piped to `python3 -`), prints one JSON object.

Standard library only, and kept compatible with Python 3.6 (no dataclasses, no walrus,
no annotations, no capture_output/text= in subprocess) because boards run whatever
python their OS ships (Jetson R32 = Ubuntu 18.04 = 3.6).

Layout: pure parsers (text in, values out; unit-tested against tests/fixtures/probe/)
followed by thin collectors that read the real files, then main(argv).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys

UNLIMITED_V1 = 1 << 60          # cgroup v1 reports "unlimited" as ~2^63 rounded to a page
KIB = 1024

# the `dsparse probe --json` contract: always present in the output (None when unknown)
CONTRACT_KEYS = (
    "hostname", "kind", "model", "l4t_release", "arch", "cpus", "cpus_allowed", "cpu_quota",
    "cpus_effective", "cpu_model", "mem_total_bytes", "mem_available_bytes", "swap_total_bytes",
    "swap_free_bytes", "zram_bytes", "nvmap_bytes", "cgroup_version", "cgroup_limit_bytes",
    "cgroup_usage_bytes", "memory_limit_bytes", "usable_memory_bytes", "usable_memory_source",
    "python", "python_executable", "torch", "torchvision", "cuda", "cuda_device",
    "cuda_memory_bytes", "cuda_shared_memory", "disk_free_bytes", "workdir", "iface",
    "address", "warnings",
)


# ---------------------------------------------------------------- pure parsers

def parse_meminfo(text):
    """/proc/meminfo -> {key: value}; "kB" values are converted to bytes."""
    out = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        if len(parts) > 1 and parts[1].lower() == "kb":
            value *= KIB
        out[key.strip()] = value
    return out


def mem_available(meminfo):
    """(bytes, estimated). Kernels < 3.14 lack MemAvailable: estimate it the old way."""
    if "MemAvailable" in meminfo:
        return meminfo["MemAvailable"], False
    keys = ("MemFree", "Buffers", "Cached")
    if not any(k in meminfo for k in keys):
        return None, True
    return sum(meminfo.get(k, 0) for k in keys), True


def parse_cgroup_v2_max(text):
    """memory.max -> bytes, or None when "max" (unlimited) or unreadable."""
    return parse_int(text)   # "max" is no integer


def parse_cgroup_v1_limit(text):
    """memory.limit_in_bytes -> bytes, or None when unlimited (>= 2^60) or unreadable."""
    value = parse_int(text)
    if value is None or value < 0 or value >= UNLIMITED_V1:
        return None
    return value


def parse_int(text):
    """A file holding one integer (memory.current, usage_in_bytes, disksize) -> int or None."""
    parts = (text or "").split()
    try:
        return int(parts[0]) if parts else None
    except ValueError:
        return None


def parse_memory_stat(text):
    """cgroup memory.stat ("key value" lines) -> {key: int}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def inactive_file_bytes(stat):
    """Reclaimable page cache inside a cgroup (v1 names it total_inactive_file)."""
    for key in ("total_inactive_file", "inactive_file"):
        if key in stat:
            return stat[key]
    return 0


def parse_proc_self_cgroup(text):
    """/proc/self/cgroup -> {"v1": {controller: path}, "v2": path or None}."""
    v1, v2 = {}, None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":
            v2 = path
            continue
        for ctrl in controllers.split(","):
            if ctrl:
                v1[ctrl] = path
    return {"v1": v1, "v2": v2}


def _unescape_mount(path):
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _mountinfo_rows(text):
    """Yield (root, mountpoint, fstype, super_options) per mountinfo line."""
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        yield (_unescape_mount(fields[3]), _unescape_mount(fields[4]), tail[0],
               tail[2].split(","))


def parse_mountinfo_cgroup_v1(text, controller):
    """(root, mountpoint) of the v1 hierarchy carrying `controller`, or None."""
    for root, mountpoint, fstype, opts in _mountinfo_rows(text):
        if fstype == "cgroup" and controller in opts:
            return root, mountpoint
    return None


def parse_mountinfo_cgroup2(text):
    """(root, mountpoint) of the cgroup2 (unified) mount, or None."""
    for root, mountpoint, fstype, _opts in _mountinfo_rows(text):
        if fstype == "cgroup2":
            return root, mountpoint
    return None


def cgroup_dir(mount_root, mountpoint, cg_path):
    """Directory of cgroup `cg_path` given where its hierarchy is mounted. Containers without a
    cgroup namespace mount only their own subtree (mount root "/docker/<id>") while
    /proc/self/cgroup still shows the full path."""
    cg_path = cg_path or "/"
    if mount_root not in ("", "/"):
        if cg_path == mount_root or cg_path.startswith(mount_root.rstrip("/") + "/"):
            cg_path = cg_path[len(mount_root.rstrip("/")):] or "/"
        else:
            cg_path = "/"
    return os.path.normpath(mountpoint + "/" + cg_path.lstrip("/"))


def cgroup_levels(directory, mountpoint):
    """`directory` and each ancestor up to and including `mountpoint` (a parent's limit
    applies to its children too)."""
    levels = []
    directory, mountpoint = os.path.normpath(directory), os.path.normpath(mountpoint)
    while True:
        levels.append(directory)
        if directory == mountpoint or not directory.startswith(mountpoint + "/"):
            return levels
        directory = os.path.dirname(directory)


def tightest_cgroup(levels):
    """levels: [(limit or None, usage or None, reclaimable)] -> (limit, usage, reclaimable)
    of the level leaving the least headroom, or (None, None, 0) when nothing is limited."""
    best, best_room = (None, None, 0), None
    for limit, usage, reclaim in levels:
        if limit is None:
            continue
        room = limit - max((usage or 0) - reclaim, 0)
        if best_room is None or room < best_room:
            best, best_room = (limit, usage, reclaim), room
    return best


def parse_cgroup_v2_cpu_max(text):
    """cpu.max ("max 100000" or "150000 100000") -> CPUs (float) or None."""
    parts = (text or "").split()
    if len(parts) < 1 or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100000
    except ValueError:
        return None
    return quota / period if period > 0 else None


def parse_cgroup_v1_cpu_quota(quota_text, period_text):
    """cpu.cfs_quota_us (-1 = unlimited) and cpu.cfs_period_us -> CPUs (float) or None."""
    quota, period = parse_int(quota_text), parse_int(period_text)
    if quota is None or quota <= 0 or not period:
        return None
    return quota / period


def effective_cpus(cpus, allowed, quota):
    """The CPUs a process may use: its affinity (else the machine's count), capped by a cgroup
    quota rounded down (1.5 CPUs keep one core busy, not two), at least 1; None if nothing is
    known. torch ignores quotas, so the worker sizes its threads with this rule too
    (dsparse_cli/runtime/cpus.py imports this file, which is shipped with the runtime)."""
    limits = [n for n in (allowed or cpus,) if n]
    if quota:
        limits.append(max(1, int(quota)))
    return max(1, min(limits)) if limits else None


def parse_tegra_release(text):
    """/etc/nv_tegra_release first line "# R32 (release), REVISION: 7.4, ..." -> "R32.7.4"."""
    m = re.search(r"#\s*R(\d+)\s*\(\w+\),\s*REVISION:\s*([0-9][0-9.]*)", text or "")
    if not m:
        return None
    return "R%s.%s" % (m.group(1), m.group(2).rstrip("."))


def clean_model_string(data):
    """Device-tree model (bytes, NUL-terminated) or DMI text -> clean str, or None."""
    if data is None:
        return None
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    data = data.replace("\x00", " ").strip()
    return data or None


def classify_kind(model, tegra_release, arch):
    """jetson | rpi | x86 | arm | unknown."""
    low = (model or "").lower()
    arch = (arch or "").lower()
    if tegra_release or "jetson" in low or low.startswith("nvidia"):
        return "jetson"
    if "raspberry pi" in low:
        return "rpi"
    if arch in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "x86"
    if arch.startswith("arm") or arch.startswith("aarch64"):
        return "arm"
    return "unknown"


# ARM "CPU part" ids seen on edge boards (/proc/cpuinfo has no "model name" on a Pi)
ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53", ("0x41", "0xd04"): "Cortex-A35",
    ("0x41", "0xd05"): "Cortex-A55", ("0x41", "0xd07"): "Cortex-A57",
    ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd09"): "Cortex-A73",
    ("0x41", "0xd0b"): "Cortex-A76", ("0x41", "0xd0c"): "Neoverse-N1",
    ("0x41", "0xd42"): "Cortex-A78AE", ("0x41", "0xd41"): "Cortex-A78",
    ("0x41", "0xb76"): "ARM1176", ("0x41", "0xc07"): "Cortex-A7",
    ("0x4e", "0x004"): "NVIDIA Carmel", ("0x4e", "0x003"): "NVIDIA Denver 2",
}


def parse_cpuinfo_model(text):
    """/proc/cpuinfo -> CPU model name, or None."""
    fields = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key not in fields:
            fields[key] = value.strip()
    if fields.get("model name"):
        return fields["model name"]
    part = ARM_PARTS.get((fields.get("cpu implementer", "").lower(),
                          fields.get("cpu part", "").lower()))
    return part or fields.get("hardware") or fields.get("processor") or None


def parse_ip_route_get(text):
    """`ip -o route get ADDR` -> (iface, src); either is None when absent."""
    iface = src = None
    tokens = (text or "").split()
    for i, tok in enumerate(tokens[:-1]):
        if tok == "dev" and iface is None:
            iface = tokens[i + 1]
        elif tok == "src" and src is None:
            src = tokens[i + 1]
    return iface, src


def parse_ip_addr(text, address):
    """`ip -o addr` -> name of the interface that holds `address`, or None."""
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("inet", "inet6") and parts[3].split("/")[0] == address:
            return parts[1].rstrip(":").split("@")[0]
    return None


def parse_if_inet6(text, address):
    """/proc/net/if_inet6 -> interface holding IPv6 `address`, or None."""
    try:
        want = socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError):
        return None
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) >= 6 and len(parts[0]) == 32:
            try:
                if bytes.fromhex(parts[0]) == want:
                    return parts[5]
            except ValueError:
                continue
    return None


def usable_memory(avail, cg_limit, cg_usage, inv_limit):
    """Smallest of MemAvailable, cgroup headroom and the inventory limit -> (bytes, source).
    `cg_usage` should already exclude reclaimable page cache. Ties keep the earlier source."""
    candidates = []
    if avail is not None:
        candidates.append((avail, "meminfo"))
    if cg_limit is not None:
        candidates.append((max(cg_limit - (cg_usage or 0), 0), "cgroup"))
    if inv_limit is not None:
        candidates.append((inv_limit, "inventory"))
    return min(candidates, key=lambda c: c[0]) if candidates else (None, None)


# ---------------------------------------------------------------- collectors

def read_text(path, default=None):
    try:
        with open(path, "r", errors="replace") as f:
            return f.read()
    except (OSError, IOError):
        return default


def read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except (OSError, IOError):
        return None


def collect_model():
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        model = clean_model_string(read_bytes(path))
        if model:
            return model
    return clean_model_string(read_text("/sys/class/dmi/id/product_name"))


def zram_bytes(sys_block="/sys/block"):
    """Sum of the zram devices' sizes (swap on a Pi is usually zram: RAM, not disk)."""
    try:
        names = [n for n in os.listdir(sys_block) if n.startswith("zram")]
    except OSError:
        return 0
    return sum(parse_int(read_text(os.path.join(sys_block, n, "disksize"))) or 0 for n in names)


def collect_memory(info, warnings, meminfo_path="/proc/meminfo", sys_block="/sys/block"):
    meminfo = parse_meminfo(read_text(meminfo_path, ""))
    avail, estimated = mem_available(meminfo)
    if estimated:
        warnings.append("no MemAvailable in /proc/meminfo; estimated from MemFree+Buffers+Cached")
    info["mem_total_bytes"] = meminfo.get("MemTotal")
    info["mem_available_bytes"] = avail
    info["swap_total_bytes"] = meminfo.get("SwapTotal")
    info["swap_free_bytes"] = meminfo.get("SwapFree")
    info["nvmap_bytes"] = meminfo.get("NvMapMemUsed")
    info["zram_bytes"] = zram_bytes(sys_block)


# cgroup version -> (limit file, its parser, usage file)
_MEMORY_FILES = {1: ("memory.limit_in_bytes", parse_cgroup_v1_limit, "memory.usage_in_bytes"),
                 2: ("memory.max", parse_cgroup_v2_max, "memory.current")}


def _memory_level(version, directory):
    limit_file, parse_limit, usage_file = _MEMORY_FILES[version]
    limit = parse_limit(read_text(os.path.join(directory, limit_file)))
    usage = parse_int(read_text(os.path.join(directory, usage_file)))
    stat = parse_memory_stat(read_text(os.path.join(directory, "memory.stat"), ""))
    return limit, usage, inactive_file_bytes(stat)


def locate_cgroup(controller, self_cgroup, mountinfo, fs_root=""):
    """-> (version, [our cgroup directory, its parents..., the mount root]) or (None, []).
    `self_cgroup`/`mountinfo`: texts of /proc/self/cgroup and /proc/self/mountinfo; `fs_root`
    prefixes mount points (tests point it at a fixture tree). A v1 hierarchy carrying the
    controller wins (hybrid hosts mount an empty cgroup2 too)."""
    own = parse_proc_self_cgroup(self_cgroup)
    version, mount, path = None, None, None
    if controller in own["v1"]:
        mount = parse_mountinfo_cgroup_v1(mountinfo, controller)
        version, path = 1, own["v1"][controller]
    if mount is None and own["v2"] is not None:
        mount = parse_mountinfo_cgroup2(mountinfo) or ("/", "/sys/fs/cgroup")
        version, path = 2, own["v2"]
        if controller not in read_text(fs_root + mount[1] + "/cgroup.controllers", "").split():
            return None, []
    if mount is None:
        return None, []
    top = fs_root + mount[1]
    directory = fs_root + cgroup_dir(mount[0], mount[1], path)
    if not os.path.isdir(directory):
        directory = top
    return version, cgroup_levels(directory, top)


def find_cgroup(controller):
    return locate_cgroup(controller, read_text("/proc/self/cgroup", ""),
                         read_text("/proc/self/mountinfo", ""))


def cgroup_memory(version, dirs):
    """-> dict of the cgroup_* fields and the (limit, non-reclaimable usage) to budget with."""
    levels = [_memory_level(1 if version == 1 else 2, d) for d in dirs]
    limit, usage, reclaim = tightest_cgroup(levels)
    if limit is None and levels:
        usage, reclaim = levels[0][1], levels[0][2]
    fields = {"cgroup_version": version, "cgroup_limit_bytes": limit,
              "cgroup_usage_bytes": usage, "cgroup_reclaimable_bytes": reclaim if version else None}
    used = max((usage or 0) - reclaim, 0) if limit is not None else None
    return fields, (limit, used)


def collect_cgroup_memory(info):
    fields, budget = cgroup_memory(*find_cgroup("memory"))
    info.update(fields)
    return budget


def cgroup_cpu_quota(version, dirs):
    """Smallest CPU quota (in CPUs) over our cgroup and its parents, or None."""
    quotas = []
    for d in dirs:
        if version == 2:
            q = parse_cgroup_v2_cpu_max(read_text(os.path.join(d, "cpu.max")))
        else:
            q = parse_cgroup_v1_cpu_quota(read_text(os.path.join(d, "cpu.cfs_quota_us")),
                                          read_text(os.path.join(d, "cpu.cfs_period_us")))
        if q is not None:
            quotas.append(q)
    return min(quotas) if quotas else None


def collect_cpus(info):
    info["cpus"] = os.cpu_count()
    info["cpus_allowed"] = (len(os.sched_getaffinity(0))
                            if hasattr(os, "sched_getaffinity") else None)
    info["cpu_quota"] = cgroup_cpu_quota(*find_cgroup("cpu"))
    info["cpus_effective"] = effective_cpus(info["cpus"], info["cpus_allowed"], info["cpu_quota"])
    info["cpu_model"] = parse_cpuinfo_model(read_text("/proc/cpuinfo", ""))


def collect_disk(workdir, info, warnings):
    path = os.path.abspath(os.path.expanduser(workdir))
    info["workdir"] = path
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        warnings.append("cannot create workdir %s: %s" % (path, e.strerror or e))
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)  # measure the filesystem it would live on
    try:
        st = os.statvfs(probe)
        info["disk_free_bytes"] = st.f_bavail * st.f_frsize
    except OSError as e:
        info["disk_free_bytes"] = None
        warnings.append("cannot measure free disk at %s: %s" % (probe, e))


def _run(argv, timeout):
    """-> (rc, stdout) or (None, "") when the command cannot run."""
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           stdin=subprocess.DEVNULL, timeout=timeout,
                           universal_newlines=True)
        return p.returncode, p.stdout
    except (OSError, subprocess.SubprocessError):
        return None, ""


def resolve_master(master):
    """Hostname or literal -> IP literal (first address), or None."""
    try:
        return socket.getaddrinfo(master, None, 0, socket.SOCK_DGRAM)[0][4][0]
    except (socket.gaierror, OSError, UnicodeError, IndexError):
        return None


def _iface_of_address(address, use_ip=True):
    if not address:
        return None
    if use_ip and shutil.which("ip"):
        iface = parse_ip_addr(_run(["ip", "-o", "addr"], 5)[1], address)
        if iface:
            return iface
    if ":" in address:
        return parse_if_inet6(read_text("/proc/net/if_inet6", ""), address)
    return _iface_of_ipv4_ioctl(address)


def _iface_of_ipv4_ioctl(address):
    """Ask the kernel for each interface's IPv4 address (SIOCGIFADDR) when `ip` is absent."""
    try:
        import fcntl
        import struct
        names = [name for _idx, name in socket.if_nameindex()]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except (ImportError, OSError, AttributeError):
        return None
    try:
        for name in names:
            try:
                req = struct.pack("256s", name.encode()[:15])
                res = fcntl.ioctl(sock.fileno(), 0x8915, req)  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(res[20:24]) == address:
                return name
    finally:
        sock.close()
    return None


def _udp_source(address):
    """Source address the kernel would use toward `address` (connect() sends nothing)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.connect((address, 9))
        return sock.getsockname()[0]
    except OSError:
        return None
    finally:
        sock.close()


def route_to(master, use_ip=True):
    """-> (iface, source address, warning or None) toward `master`; use_ip=False takes the path
    of a board without iproute2 (busybox images)."""
    address = resolve_master(master)
    if address is None:
        return None, None, "cannot resolve master address %r" % master
    iface = src = None
    if use_ip and shutil.which("ip"):
        rc, out = _run(["ip", "-o", "route", "get", address], 5)
        if rc == 0:
            iface, src = parse_ip_route_get(out)
    if src is None:
        src = _udp_source(address)
    if src is None:
        return iface, None, "no route to master %s" % master
    if iface is None:
        iface = _iface_of_address(src, use_ip)
    return iface, src, None


TORCH_MARK = "DSPARSE_TORCH_JSON "
TORCH_CODE = r"""
import json
out = {"torch": None, "torchvision": None, "cuda": False, "cuda_device": None,
       "cuda_memory_bytes": None, "cuda_integrated": None, "error": None}
try:
    import torch
    out["torch"] = torch.__version__
    import torch.distributed as dist
    out["gloo"] = bool(dist.is_available() and dist.is_gloo_available())
    try:
        try:
            from importlib import metadata  # the version without the import (seconds on a Pi)
        except ImportError:  # Python < 3.8
            metadata = None
        if metadata:
            out["torchvision"] = metadata.version("torchvision")
        else:
            import torchvision
            out["torchvision"] = torchvision.__version__
    except Exception as e:
        out["error"] = "torchvision: %s: %s" % (type(e).__name__, e)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(cuda=True, cuda_device=p.name, cuda_memory_bytes=int(p.total_memory),
                   cuda_integrated=bool(getattr(p, "is_integrated", False)))
except ImportError as e:
    out["error"] = "torch not importable: %s" % e
except Exception as e:
    out["error"] = "torch: %s: %s" % (type(e).__name__, e)
print("__MARK__" + json.dumps(out))
""".replace("__MARK__", TORCH_MARK)


def parse_torch_output(stdout):
    """Last line carrying TORCH_MARK -> dict, or None."""
    for line in reversed((stdout or "").splitlines()):
        if line.startswith(TORCH_MARK):
            try:
                return json.loads(line[len(TORCH_MARK):])
            except ValueError:
                return None
    return None


def collect_torch(timeout):
    """Import torch in a child of this interpreter (slow on a Pi, may hang) -> (dict, warning)."""
    try:
        p = subprocess.Popen([sys.executable, "-c", TORCH_CODE], cwd="/",
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True,
                             start_new_session=True)  # own group: kill helpers on timeout
    except OSError as e:
        return None, "cannot run %s for the torch check: %s" % (sys.executable, e)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.communicate()
        return {"timed_out": True}, "import torch did not finish within %gs; torch reported as missing" % timeout
    result = parse_torch_output(stdout)
    if result is None:
        tail = (stderr or "").strip().splitlines()
        return None, "torch check failed (rc %s): %s" % (p.returncode, tail[-1] if tail else "")
    return result, result.pop("error", None)


def collect(args):
    warnings = []
    info = {"hostname": socket.gethostname(), "arch": platform.machine(),
            "python": platform.python_version(), "python_executable": sys.executable,
            "memory_limit_bytes": args.memory_limit}

    model = collect_model()
    release = parse_tegra_release(read_text("/etc/nv_tegra_release", ""))
    info.update(model=model, l4t_release=release,
                kind=classify_kind(model, release, info["arch"]))

    steps = [
        lambda: collect_memory(info, warnings),
        lambda: info.update(_cg=collect_cgroup_memory(info)),
        lambda: collect_cpus(info),
        lambda: collect_disk(args.workdir, info, warnings),
    ]
    for step in steps:
        try:
            step()
        except Exception as e:  # one broken source must not lose the whole probe
            warnings.append("probe step failed: %s: %s" % (type(e).__name__, e))

    cg_limit, cg_used = info.pop("_cg", (None, None))
    info["usable_memory_bytes"], info["usable_memory_source"] = usable_memory(
        info.get("mem_available_bytes"), cg_limit, cg_used, args.memory_limit)

    iface, address, warning = route_to(args.master)
    info["master"], info["iface"], info["address"] = args.master, iface, address
    if warning:
        warnings.append(warning)

    collect_torch_info(info, args, warnings)
    info["warnings"] = warnings
    for key in CONTRACT_KEYS:
        info.setdefault(key, None)
    return info


def collect_torch_info(info, args, warnings):
    torch, warning = (None, None) if args.no_torch else collect_torch(args.torch_timeout)
    torch = torch or {}
    if warning:
        warnings.append(warning)
    # gloo None: not known (no torch, or its import timed out)
    for key in ("torch", "torchvision", "gloo", "cuda_device", "cuda_memory_bytes"):
        info[key] = torch.get(key)
    info["torch_timed_out"] = bool(torch.get("timed_out"))  # proved nothing: the preflight checks
    info["cuda"] = bool(torch.get("cuda"))
    # Jetson GPUs allocate from the same RAM MemAvailable reports: never count it twice
    info["cuda_shared_memory"] = bool(info["cuda"] and (info.get("kind") == "jetson"
                                                        or torch.get("cuda_integrated")))


def build_parser():
    p = argparse.ArgumentParser(description="dsparse board probe (prints one JSON object)")
    p.add_argument("--master", default="127.0.0.1",
                   help="address of the master, to find the interface that reaches it")
    p.add_argument("--workdir", default="~", help="measure free disk here")
    p.add_argument("--memory-limit", type=int, default=None,
                   help="inventory memory limit in bytes")
    p.add_argument("--torch-timeout", type=float, default=60.0,
                   help="seconds allowed for `import torch, torchvision` and CUDA queries")
    p.add_argument("--no-torch", action="store_true", help="skip the torch check (fast)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    sys.stdout.write(json.dumps(collect(args), sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
