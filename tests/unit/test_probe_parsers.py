"""The board script's pure parsers against files captured in the style of real boards."""

from pathlib import Path

import pytest

from dsparse_cli.errors import RemoteError
from dsparse_cli.probing import board_script as bs
from dsparse_cli.probing.parse import DeviceInfo, parse_probe_output

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "probe"


def text(name: str) -> str:
    return (FIX / name).read_text()


# ---------------------------------------------------------------- meminfo

def test_meminfo_jetson_orin_bytes_and_nvmap():
    m = bs.parse_meminfo(text("meminfo_jetson_agx_orin.txt"))
    assert m["MemTotal"] == 64335836 * 1024
    assert m["MemAvailable"] == 60987652 * 1024
    assert m["NvMapMemUsed"] == 431616 * 1024
    assert m["SwapTotal"] == 32167920 * 1024
    assert m["HugePages_Total"] == 0            # unitless counters are not scaled
    assert m["Inactive(file)"] == 2390792 * 1024


def test_meminfo_rpi4_zram_swap():
    m = bs.parse_meminfo(text("meminfo_rpi4_zram.txt"))
    assert m["MemTotal"] == 3885396 * 1024
    assert m["SwapTotal"] == 1942524 * 1024 and m["SwapFree"] == 1938428 * 1024
    assert "NvMapMemUsed" not in m
    assert bs.mem_available(m) == (3412248 * 1024, False)


def test_meminfo_x86_huge_vmalloc_value():
    m = bs.parse_meminfo(text("meminfo_x86.txt"))
    assert m["VmallocTotal"] == 34359738367 * 1024
    assert m["MemAvailable"] == 27634712 * 1024
    assert m["Hugepagesize"] == 2048 * 1024


def test_meminfo_without_memavailable_is_estimated():
    m = bs.parse_meminfo(text("meminfo_old_kernel.txt"))
    assert "MemAvailable" not in m
    avail, estimated = bs.mem_available(m)
    assert estimated and avail == (612344 + 20480 + 180224) * 1024


def test_meminfo_garbage_and_empty():
    assert bs.parse_meminfo("") == {}
    m = bs.parse_meminfo("MemTotal: lots kB\nnot a line\nFoo:\nBar: 7\n")
    assert m == {"Bar": 7}
    assert bs.mem_available({}) == (None, True)


def test_zram_sum_from_sys_block():
    assert bs.zram_bytes(str(FIX / "sys_block_rpi4")) == 1989148672
    assert bs.zram_bytes(str(FIX / "does-not-exist")) == 0


def test_collect_memory_from_fixture_files():
    info, warnings = {}, []
    bs.collect_memory(info, warnings, str(FIX / "meminfo_jetson_agx_orin.txt"),
                      str(FIX / "sys_block_rpi4"))
    assert info["nvmap_bytes"] == 431616 * 1024 and info["zram_bytes"] == 1989148672
    assert warnings == []
    bs.collect_memory(info, warnings, str(FIX / "meminfo_old_kernel.txt"), "/nonexistent")
    assert info["nvmap_bytes"] is None and len(warnings) == 1 and "MemAvailable" in warnings[0]


# ---------------------------------------------------------------- cgroup files

def test_cgroup_v2_max():
    assert bs.parse_cgroup_v2_max(text("cgv2_memory.max.max")) is None
    assert bs.parse_cgroup_v2_max(text("cgv2_memory.max.1g")) == 1 << 30
    assert bs.parse_cgroup_v2_max(None) is None
    assert bs.parse_cgroup_v2_max("") is None
    assert bs.parse_cgroup_v2_max("max\n") is None and bs.parse_cgroup_v2_max("5\n") == 5


def test_cgroup_v1_limit_unlimited_and_real():
    assert bs.parse_cgroup_v1_limit(text("cgv1_memory.limit_in_bytes.unlimited")) is None
    assert bs.parse_cgroup_v1_limit(text("cgv1_memory.limit_in_bytes.unlimited_64k_pages")) is None
    assert bs.parse_cgroup_v1_limit(text("cgv1_memory.limit_in_bytes.2g")) == 2 << 30
    assert bs.parse_cgroup_v1_limit("-1\n") is None
    assert bs.parse_cgroup_v1_limit(None) is None
    assert bs.parse_cgroup_v1_limit("1152921504606846976") is None          # exactly 2^60
    assert bs.parse_cgroup_v1_limit("1152921504606846975") == (1 << 60) - 1


def test_usage_and_stat_files():
    assert bs.parse_int(text("cgv1_memory.usage_in_bytes")) == 734003200
    assert bs.parse_int(text("cgv2_memory.current")) == 312705024
    assert bs.parse_int("max") is None and bs.parse_int(None) is None
    v2 = bs.parse_memory_stat(text("cgv2_memory.stat"))
    v1 = bs.parse_memory_stat(text("cgv1_memory.stat"))
    assert bs.inactive_file_bytes(v2) == 83886080
    assert bs.inactive_file_bytes(v1) == 314572800              # total_ (hierarchical) wins
    assert v1["hierarchical_memory_limit"] == 2 << 30
    assert bs.inactive_file_bytes({}) == 0


def test_cpu_quota_files():
    assert bs.parse_cgroup_v2_cpu_max(text("cgv2_cpu.max.max")) is None
    assert bs.parse_cgroup_v2_cpu_max(text("cgv2_cpu.max.1_5")) == 1.5
    period = text("cgv1_cpu.cfs_period_us")
    assert bs.parse_cgroup_v1_cpu_quota(text("cgv1_cpu.cfs_quota_us.unlimited"), period) is None
    assert bs.parse_cgroup_v1_cpu_quota(text("cgv1_cpu.cfs_quota_us.2cpus"), period) == 2.0
    assert bs.parse_cgroup_v1_cpu_quota(None, period) is None


def test_effective_cpus_takes_affinity_capped_by_the_quota_rounded_down():
    assert bs.effective_cpus(8, 4, 1.5) == 1          # 1.5 CPUs keep one core busy, not two
    assert bs.effective_cpus(8, 4, None) == 4         # no quota: the affinity
    assert bs.effective_cpus(8, 4, 0.5) == 1          # at least 1
    assert bs.effective_cpus(8, None, None) == 8      # no affinity call: the machine's count
    assert bs.effective_cpus(8, 2, 3.0) == 2
    assert bs.effective_cpus(None, None, None) is None
    info = parse_probe_output("b0", _probe_json(cpus=8, cpus_allowed=4, cpu_quota=1.5, cpus_effective=1))
    assert info.cpus_effective == 1 and info.cpu_quota == 1.5


def test_proc_self_cgroup_v1_v2_docker():
    v1 = bs.parse_proc_self_cgroup(text("proc_self_cgroup_v1.txt"))
    assert v1["v1"]["memory"] == "/user.slice/user-1000.slice/session-4.scope"
    assert v1["v1"]["cpu"] == v1["v1"]["cpuacct"] == "/user.slice"
    assert v1["v1"]["name=systemd"].endswith("session-4.scope")
    assert v1["v2"] == "/user.slice/user-1000.slice/session-4.scope"
    v2 = bs.parse_proc_self_cgroup(text("proc_self_cgroup_v2.txt"))
    assert v2 == {"v1": {}, "v2": "/user.slice/user-1000.slice/session-3.scope"}
    d = bs.parse_proc_self_cgroup(text("proc_self_cgroup_docker_v1.txt"))
    assert d["v2"] is None and d["v1"]["memory"].startswith("/docker/4b825dc6")
    assert bs.parse_proc_self_cgroup("") == {"v1": {}, "v2": None}
    # a path containing ':' stays whole
    assert bs.parse_proc_self_cgroup("0::/a:b\n")["v2"] == "/a:b"


def test_mountinfo_finds_memory_v1_and_cgroup2():
    assert bs.parse_mountinfo_cgroup_v1(text("mountinfo_v1.txt"), "memory") == ("/", "/sys/fs/cgroup/memory")
    assert bs.parse_mountinfo_cgroup_v1(text("mountinfo_v1.txt"), "cpu") == \
        ("/", "/sys/fs/cgroup/cpu,cpuacct")
    assert bs.parse_mountinfo_cgroup2(text("mountinfo_v1.txt")) == ("/", "/sys/fs/cgroup/unified")
    assert bs.parse_mountinfo_cgroup_v1(text("mountinfo_v2.txt"), "memory") is None
    assert bs.parse_mountinfo_cgroup2(text("mountinfo_v2.txt")) == ("/", "/sys/fs/cgroup")
    docker = bs.parse_mountinfo_cgroup_v1(text("mountinfo_docker_v1.txt"), "memory")
    assert docker == ("/docker/4b825dc642cb6eb9a060e54bf8d69288fbee4904", "/sys/fs/cgroup/memory")
    # name=systemd hierarchy must not be taken for the memory controller
    assert bs.parse_mountinfo_cgroup_v1(text("mountinfo_v1.txt"), "systemd") is None


def test_mountinfo_octal_escapes():
    line = "40 31 0:37 / /mnt/my\\040cg rw - cgroup cgroup rw,memory\n"
    assert bs.parse_mountinfo_cgroup_v1(line, "memory") == ("/", "/mnt/my cg")


def test_cgroup_dir_and_levels():
    assert bs.cgroup_dir("/", "/sys/fs/cgroup", "/user.slice/a.scope") == \
        "/sys/fs/cgroup/user.slice/a.scope"
    assert bs.cgroup_dir("/", "/sys/fs/cgroup", "/") == "/sys/fs/cgroup"
    docker = "/docker/4b825dc642cb6eb9a060e54bf8d69288fbee4904"
    assert bs.cgroup_dir(docker, "/sys/fs/cgroup/memory", docker) == "/sys/fs/cgroup/memory"
    assert bs.cgroup_dir(docker, "/sys/fs/cgroup/memory", docker + "/sub") == \
        "/sys/fs/cgroup/memory/sub"
    assert bs.cgroup_dir(docker, "/m", "/elsewhere") == "/m"       # not under the mount root
    assert bs.cgroup_levels("/sys/fs/cgroup/a/b", "/sys/fs/cgroup") == \
        ["/sys/fs/cgroup/a/b", "/sys/fs/cgroup/a", "/sys/fs/cgroup"]
    assert bs.cgroup_levels("/sys/fs/cgroup", "/sys/fs/cgroup") == ["/sys/fs/cgroup"]


def test_tightest_cgroup_takes_least_headroom():
    assert bs.tightest_cgroup([]) == (None, None, 0)
    assert bs.tightest_cgroup([(None, 5, 0), (None, 9, 0)]) == (None, None, 0)
    # child 1 GiB limit using 900 MiB beats parent 2 GiB limit using 1.5 GiB
    child, parent = (1 << 30, 900 << 20, 0), (2 << 30, 1536 << 20, 0)
    assert bs.tightest_cgroup([child, parent]) == child
    # reclaimable cache counts as headroom
    assert bs.tightest_cgroup([(1 << 30, 900 << 20, 800 << 20), parent]) == parent


def test_locate_cgroup_v2_tree_walks_up_to_the_limited_parent():
    root = str(FIX / "tree_v2")
    version, dirs = bs.locate_cgroup("memory", text("proc_self_cgroup_v2.txt"),
                                     text("mountinfo_v2.txt"), fs_root=root)
    assert version == 2
    assert dirs[0] == root + "/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope"
    assert dirs[-1] == root + "/sys/fs/cgroup" and len(dirs) == 4
    fields, (limit, used) = bs.cgroup_memory(version, dirs)
    assert fields["cgroup_version"] == 2
    assert fields["cgroup_limit_bytes"] == 2 << 30               # from user.slice
    assert fields["cgroup_usage_bytes"] == 1610612736
    assert fields["cgroup_reclaimable_bytes"] == 536870912
    assert (limit, used) == (2 << 30, 1610612736 - 536870912)
    assert bs.cgroup_cpu_quota(version, dirs) == 2.0


def test_locate_cgroup_v2_without_memory_controller():
    # hybrid host whose cgroup2 mount carries no controllers
    version, dirs = bs.locate_cgroup("memory", "0::/\n", text("mountinfo_v2.txt"),
                                     fs_root=str(FIX / "nonexistent"))
    assert (version, dirs) == (None, [])


def test_locate_cgroup_docker_v1():
    root = str(FIX / "tree_docker_v1")
    version, dirs = bs.locate_cgroup("memory", text("proc_self_cgroup_docker_v1.txt"),
                                     text("mountinfo_docker_v1.txt"), fs_root=root)
    assert version == 1 and dirs == [root + "/sys/fs/cgroup/memory"]
    fields, (limit, used) = bs.cgroup_memory(version, dirs)
    assert fields["cgroup_limit_bytes"] == 2 << 30 and fields["cgroup_usage_bytes"] == 734003200
    assert used == 734003200 - 314572800
    assert bs.usable_memory(8 << 30, limit, used, None) == ((2 << 30) - used, "cgroup")


def test_cgroup_memory_unlimited_reports_usage_of_own_cgroup():
    fields, budget = bs.cgroup_memory(None, [])
    assert budget == (None, None) and fields["cgroup_version"] is None
    assert fields["cgroup_reclaimable_bytes"] is None


# ---------------------------------------------------------------- board identity

def test_tegra_release_r32_and_r36():
    assert bs.parse_tegra_release(text("nv_tegra_release_r32.txt")) == "R32.7.4"
    assert bs.parse_tegra_release(text("nv_tegra_release_r36.txt")) == "R36.3.0"
    assert bs.parse_tegra_release("") is None
    assert bs.parse_tegra_release(None) is None
    assert bs.parse_tegra_release("TARGET_USERSPACE_LIB_DIR=nvidia\n") is None


def test_clean_model_string_strips_nul():
    raw = (FIX / "model_jetson_agx_orin.bin").read_bytes()
    assert raw.endswith(b"\0")
    assert bs.clean_model_string(raw) == "NVIDIA Jetson AGX Orin Developer Kit"
    assert bs.clean_model_string((FIX / "model_rpi4.bin").read_bytes()) == \
        "Raspberry Pi 4 Model B Rev 1.4"
    assert bs.clean_model_string(text("dmi_product_name_x86.txt")) == "OptiPlex 7080"
    assert bs.clean_model_string(b"\0") is None
    assert bs.clean_model_string(None) is None


@pytest.mark.parametrize("model,release,arch,kind", [
    ("NVIDIA Jetson AGX Orin Developer Kit", "R36.3.0", "aarch64", "jetson"),
    ("NVIDIA Jetson Nano Developer Kit", None, "aarch64", "jetson"),   # container: no release file
    (None, "R32.7.4", "aarch64", "jetson"),
    ("Raspberry Pi 4 Model B Rev 1.4", None, "aarch64", "rpi"),
    ("Raspberry Pi 3 Model B Plus Rev 1.3", None, "armv7l", "rpi"),
    ("OptiPlex 7080", None, "x86_64", "x86"),
    (None, None, "x86_64", "x86"),
    ("Rockchip RK3588 EVB", None, "aarch64", "arm"),
    (None, None, "riscv64", "unknown"),
    (None, None, "", "unknown"),
])
def test_classify_kind(model, release, arch, kind):
    assert bs.classify_kind(model, release, arch) == kind


def test_cpuinfo_model():
    assert bs.parse_cpuinfo_model(text("cpuinfo_x86.txt")) == \
        "Intel(R) Core(TM) i7-10700 CPU @ 2.90GHz"
    assert bs.parse_cpuinfo_model(text("cpuinfo_rpi4.txt")) == "Cortex-A72"
    assert bs.parse_cpuinfo_model(text("cpuinfo_jetson_agx_orin.txt")) == \
        "ARMv8 Processor rev 1 (v8l)"
    assert bs.parse_cpuinfo_model("") is None


# ---------------------------------------------------------------- network

@pytest.mark.parametrize("name,expected", [
    ("ip_route_get_via.txt", ("eth0", "192.168.1.42")),
    ("ip_route_get_direct.txt", ("l4tbr0", "192.168.55.1")),
    ("ip_route_get_local.txt", ("lo", "127.0.0.1")),
    ("ip_route_get_ipv6.txt", ("wlan0", "2001:db8::42")),
    ("ip_route_get_unreachable.txt", (None, None)),
])
def test_ip_route_get(name, expected):
    assert bs.parse_ip_route_get(text(name)) == expected


def test_ip_route_get_empty():
    assert bs.parse_ip_route_get("") == (None, None)
    assert bs.parse_ip_route_get("10.0.0.1 dev") == (None, None)     # truncated


def test_ip_addr_and_if_inet6():
    addr = text("ip_o_addr.txt")
    assert bs.parse_ip_addr(addr, "192.168.1.42") == "eth0"
    assert bs.parse_ip_addr(addr, "127.0.0.1") == "lo"
    assert bs.parse_ip_addr(addr, "2001:db8::42") == "wlan0"
    assert bs.parse_ip_addr(addr, "10.10.0.5") == "eth0.10"
    assert bs.parse_ip_addr(addr, "192.168.1.4") is None          # prefix of another address
    inet6 = text("if_inet6.txt")
    assert bs.parse_if_inet6(inet6, "2001:db8::42") == "wlan0"
    assert bs.parse_if_inet6(inet6, "::1") == "lo"
    assert bs.parse_if_inet6(inet6, "2001:db8::43") is None
    assert bs.parse_if_inet6(inet6, "not-an-address") is None


# ---------------------------------------------------------------- usable memory

def test_usable_memory_min_and_source():
    gib = 1 << 30
    assert bs.usable_memory(8 * gib, None, None, None) == (8 * gib, "meminfo")
    assert bs.usable_memory(8 * gib, 2 * gib, gib // 2, None) == (gib + gib // 2, "cgroup")
    assert bs.usable_memory(8 * gib, 2 * gib, gib // 2, gib) == (gib, "inventory")
    assert bs.usable_memory(gib, 4 * gib, 0, 2 * gib) == (gib, "meminfo")
    assert bs.usable_memory(None, None, None, 3 * gib) == (3 * gib, "inventory")
    assert bs.usable_memory(None, None, None, None) == (None, None)
    # over-limit usage clamps to 0 rather than going negative
    assert bs.usable_memory(8 * gib, gib, 2 * gib, None) == (0, "cgroup")
    # ties keep the earlier (more basic) source
    assert bs.usable_memory(gib, gib, 0, gib) == (gib, "meminfo")


# ---------------------------------------------------------------- torch child output

def test_parse_torch_output():
    line = bs.TORCH_MARK + '{"torch": "2.3.0", "cuda": true}'
    assert bs.parse_torch_output("UserWarning: noise\n" + line + "\n") == \
        {"torch": "2.3.0", "cuda": True}
    assert bs.parse_torch_output("") is None
    assert bs.parse_torch_output(bs.TORCH_MARK + "{broken") is None


# ---------------------------------------------------------------- parse.py

def _probe_json(**over):
    import json

    data = {"hostname": "orin", "kind": "jetson", "mem_total_bytes": 1, "usable_memory_bytes": 5,
            "usable_memory_source": "meminfo", "cuda": True, "cuda_shared_memory": True,
            "warnings": ["w"], "future_field": {"x": 1}}
    data.update(over)
    return json.dumps(data)


def test_parse_probe_output_ok_keeps_extras_and_skips_banners():
    info = parse_probe_output("b0", "Welcome to Ubuntu\n" + _probe_json() + "\n")
    assert info.ok and info.name == "b0" and info.kind == "jetson"
    assert info.usable_memory_bytes == 5 and info.cuda_shared_memory
    assert info.to_dict()["future_field"] == {"x": 1}
    assert parse_probe_output("b0", _probe_json()).hostname == "orin"


@pytest.mark.parametrize("stdout,stderr,needle", [
    ("", "sh: 1: python3: not found\n", "python3: not found"),
    ("Traceback (most recent call last):\n  File x\nSyntaxError: invalid syntax\n", "",
     "SyntaxError: invalid syntax"),
    ("[1, 2, 3]\n", "", "[1, 2, 3]"),
    ("", "", "no output"),
    ("x" * 500, "", "x" * 100),
])
def test_parse_probe_output_garbage_is_one_line_remote_error(stdout, stderr, needle):
    with pytest.raises(RemoteError) as exc:
        parse_probe_output("pi4", stdout, stderr)
    msg = exc.value.one_line()
    assert "\n" not in msg and msg.startswith("pi4:") and needle in msg
    assert len(exc.value.message) < 200


def test_parse_probe_output_bad_field_type():
    with pytest.raises(RemoteError) as exc:
        parse_probe_output("pi4", _probe_json(mem_total_bytes="lots"))
    assert "mem_total_bytes" in exc.value.message and "\n" not in exc.value.one_line()


def test_failed_device_info():
    info = DeviceInfo.failed("b3", "connection refused")
    assert not info.ok and info.error == "connection refused" and info.usable_memory_bytes is None
