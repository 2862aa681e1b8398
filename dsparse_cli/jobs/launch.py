"""Start a training job: write job and plan files to every board, start one launcher per board
(dsparse's standard-library supervisor, or torchrun) with the worker under it.

Everything that can be checked is checked on every board before anything is started anywhere,
so a bad board never leaves half a job running. Each launcher runs in its own session; its
PID (== PGID) is recorded locally as soon as it exists so `dsparse stop` can always find it.
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from dsparse_cli.contract import DATASETS, JobSpec, JobState, Plan, plan_hash
from dsparse_cli.errors import EXIT_BOARD_FAILED, ConfigError, Interrupted, JobError
from dsparse_cli.inventory import Inventory, Target
from dsparse_cli.jobs import preflight, records, shipping, workload
from dsparse_cli.jobs.records import BoardRun, JobRecord
from dsparse_cli.remote import connect, fan_out
from dsparse_cli.remote.base import Transport
from dsparse_cli.remote.shell import under_home
from dsparse_cli.runtime.cpus import THREADS_ENV, process_cpus


def check_options(opts: JobSpec, plan: Plan) -> None:
    if opts.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {opts.dataset!r}", f"choose one of {', '.join(DATASETS)}")
    if opts.dataset == "cifar10" and not opts.download:
        if not opts.data_dir or not Path(opts.data_dir).expanduser().is_dir():
            raise ConfigError(f"cifar10 needs --data-dir with the dataset (got {opts.data_dir!r})",
                              "point --data-dir at a torchvision CIFAR-10 folder or add --download")
    if opts.batch_size > plan.batch_size:
        raise ConfigError(
            f"--batch-size {opts.batch_size} is larger than the plan's {plan.batch_size}: "
            "the plan's memory figures would not hold",
            f"re-run `dsparse plan --batch-size {opts.batch_size}`")
    if opts.epochs < 1 or (opts.max_steps is not None and opts.max_steps < 1):
        raise ConfigError("--epochs and --max-steps must be at least 1")


def check_probe_facts(inv: Inventory, plan: Plan) -> None:
    """The plan was made from a probe: a board it found without torch cannot run the job. A probe
    whose `import torch` merely timed out (a slow board) proved nothing: the preflight checks it."""
    from dsparse_cli.probing.collect import read_cache

    cache = read_cache(inv)
    cached = cache.answered() if cache else {}
    for d in plan.devices:
        facts = plan.probe.get(d.name) or {}
        if d.name in cached and cached[d.name].torch_timed_out:
            continue
        if facts.get("source") == "probe" and not facts.get("torch"):
            raise ConfigError(f"the probe found no torch on board {d.name} (the plan was made from that probe)",
                              "install torch and torchvision there, then re-run `dsparse probe` and `dsparse plan`")


def warn_torch_changed(name: str, found: dict, plan: Plan) -> None:
    planned = (plan.probe.get(name) or {}).get("torch")
    # The probe reports torch.__version__ ("2.5.0+cu124"), the package metadata may drop the local part.
    if planned and found.get("torch") and found["torch"].split("+")[0] != planned.split("+")[0]:
        from dsparse_cli.console import warning

        warning(f"board {name} now has torch {found['torch']}, the plan was made with {planned}; "
                "re-run `dsparse probe` and `dsparse plan` if its memory figures changed")


def probe_ifaces(inv: Inventory, plan: Plan) -> dict[str, str]:
    """Per board, the interface toward the master that the probe found: the probe cache first
    (it is the newest), then the plan's probe facts. Entries probed for another master are skipped."""
    from dsparse_cli.probing.collect import read_cache

    found = {n: f["iface"] for n, f in plan.probe.items() if (f or {}).get("iface")}
    cache = read_cache(inv)
    for b in (cache.answered() if cache else {}).values():
        if b.iface and b.extra.get("master") in (None, inv.master_addr):
            found[b.name] = b.iface
    return found


def probed_gloo(inv: Inventory) -> dict[str, bool | None]:
    """Per board, whether the last probe found torch built with gloo (None: not known)."""
    from dsparse_cli.probing.collect import read_cache

    cache = read_cache(inv)
    return {name: info.gloo for name, info in (cache.answered() if cache else {}).items()}


def settle_master(inv: Inventory, plan: Plan) -> None:
    """The rendezvous store runs on rank 0 (torch's env:// and torchrun's static rendezvous alike),
    so the master address must be the rank-0 board's. By default it is the first board's host; when the plan leaves that board
    out (`--exclude-small`), the default follows rank 0. An explicit master.addr that is another
    board's host is an error (any other address may be rank 0's on another interface)."""
    rank0 = inv.board(plan.devices[0].name)
    if not inv.master_explicit:
        inv.master_addr = rank0.host
        return
    other = next((b.name for b in inv.boards if b.host == inv.master_addr and b.host != rank0.host), None)
    if other:
        why = "which the plan leaves out" if plan.device(other) is None else "not rank 0"
        raise ConfigError(f"master.addr {inv.master_addr} is board {other}'s, {why}; "
                          f"the rendezvous runs on rank 0 ({rank0.name}, {rank0.host})",
                          f"set master.addr to {rank0.host} or remove it from cluster.yaml")


def check_port_free(inv: Inventory) -> None:
    """The rendezvous port on the master must be free, or the rendezvous fails late and obscurely."""
    if not all(b.local for b in inv.boards):
        return  # checked on the rank-0 board by the SSH path
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As torch's TCPStore does: a port left in TIME_WAIT by a previous job is free to listen on.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((inv.master_addr, inv.master_port))
        except OSError:
            raise ConfigError(f"port {inv.master_port} on {inv.master_addr} is already in use",
                              "stop what holds it or pass --master-port") from None


def worker_command(target: Target, rank: int, world: int, inv: Inventory, run_dir: str) -> str:
    """The board's launcher and the worker under it: dsparse's standard-library supervisor, or
    torchrun (`launcher: torchrun`) with a static rendezvous on rank 0. `exec`: the recorded pid
    (== pgid == sid) is the launcher itself, not a shell waiting on it."""
    q = shlex.quote
    worker = ["-m", "dsparse_cli.runtime.worker", "--plan", q(f"{run_dir}/plan.json"), "--job", q(f"{run_dir}/job.json")]
    if inv.launcher == "torchrun":
        launcher = ["-m", "torch.distributed.run", "--nnodes", str(world), "--node-rank", str(rank),
                    "--nproc-per-node", "1", "--master-addr", q(inv.master_addr), "--master-port", str(inv.master_port),
                    "--max-restarts", "0", "--monitor-interval", "1"]
    else:
        launcher = ["-m", "dsparse_cli.runtime.supervise", "--rank", str(rank), "--world", str(world),
                    "--master-addr", q(inv.master_addr), "--master-port", str(inv.master_port), "--"]
    return " ".join(["exec", q(target.python), *launcher, *worker])


def worker_threads(target: Target, inv: Inventory) -> int | None:
    """The torch threads of the board's worker: cluster.yaml's `threads:`; for a simulated board
    its share of this machine's CPUs (they all run here); else None: the worker takes the CPUs
    it may really use (affinity and cgroup quota, which torch alone would ignore)."""
    if target.threads:
        return target.threads
    if target.local:
        return max(1, process_cpus() // max(1, sum(1 for b in inv.boards if b.local)))
    return None


def worker_env(target: Target, inv: Inventory, pkg_dir: str, probed_iface: str | None = None,
               allocator: str = "lean") -> dict[str, str]:
    """The worker's environment. Collectives bind to the inventory's `iface`, else to the one the
    probe found toward the master (so gloo/NCCL never pick a wrong interface on multi-homed boards)."""
    from dsparse_cli.planning.profile import allocator_env

    iface = target.iface or probed_iface or ("lo" if target.local else None)
    # The plan's memory figures hold for the allocator it was made with (lean: glibc returns freed
    # memory at once, as the profile measured; 1.6x per step for it, measured: BENCHMARKS).
    env = {"PYTHONPATH": pkg_dir, "PYTHONUNBUFFERED": "1", "TORCH_CPP_LOG_LEVEL": "ERROR", **allocator_env(allocator)}
    threads = worker_threads(target, inv)
    if threads:
        env[THREADS_ENV] = str(threads)
    if iface:
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = iface
    return env


def run_dir_for(target: Target, job_id: str) -> str:
    base = target.workdir if target.local else target.workdir.rstrip("/")
    return f"{base}/runs/{job_id}"


def new_record(inv: Inventory, plan: Plan, job_id: str, hash_of_plan: str) -> JobRecord:
    """The job's record: each board's target as resolved now (so stop/status/logs reach it even
    after cluster.yaml changes) and the cluster file by its absolute path (found from anywhere)."""
    targets = [inv.board(d.name) for d in plan.devices]
    boards = [BoardRun(d.name, d.rank, t.local, run_dir_for(t, job_id), target=t)
              for d, t in zip(plan.devices, targets)]
    return JobRecord(job_id, inv.name, str(inv.path.resolve()) if inv.path else None, hash_of_plan,
                     inv.master_addr, inv.master_port, boards)


def _stage_board(transport: Transport, target: Target, run: BoardRun, plan: dict, job: dict,
                 staging: Path, files: list[tuple[Path, str]]) -> str:
    """Write plan.json and job.json, and the job's own files (model file, weights), into the
    board's run dir; ship the runtime to SSH boards. Returns the PYTHONPATH the worker needs there."""
    local_dir = staging / run.name
    local_dir.mkdir(parents=True, exist_ok=True)
    for name, doc in (("plan.json", plan), ("job.json", job)):
        (local_dir / name).write_text(json.dumps(doc, indent=1, sort_keys=True))
        transport.put(str(local_dir / name), f"{run.run_dir}/{name}")
    for local_file, name in files:
        transport.put(str(local_file), f"{run.run_dir}/{name}")
    if target.local:
        return str(shipping.package_root())
    workdir = run.workdir
    pkg = f"{workdir}/pkg"
    shipping.ship_runtime(transport, pkg, local_dir)
    if job.get("data_dir") == f"{workdir}/data":
        transport.put(str(shipping.digits_file()), f"{workdir}/data/digits.csv.gz")
    return pkg


def _reset_run(transport: Transport, run: BoardRun) -> None:
    """Before a resumed attempt: the last attempt's heartbeat would read as this one's (failed,
    or a dead worker pid), and its log would be shown again. Keep the log as worker.log.N."""
    q = shlex.quote
    old_log = f"{run.log_path}.{int(time.time())}"
    transport.run(f"rm -f {q(run.status_path)} {q(run.run_dir + '/summary.json')}; "
                  f"if [ -f {q(run.log_path)} ]; then mv -f {q(run.log_path)} {q(old_log)}; fi", timeout=30)


def _write_board_record(transport: Transport, run: BoardRun, rec: JobRecord, staging: Path) -> None:
    """`workdir/job.json` on the board: which job runs there now, so it can be found on the board."""
    doc = {"id": rec.id, "cluster": rec.cluster, "rank": run.rank, "run_dir": run.run_dir,
           "pid": run.pid, "pgid": run.pgid, "started": run.started, "plan_hash": rec.plan_hash,
           "master_addr": rec.master_addr, "master_port": rec.master_port, "attempt": rec.attempts}
    local = staging / run.name / "board-job.json"
    local.write_text(json.dumps(doc, indent=1, sort_keys=True))
    transport.put(str(local), f"{run.workdir}/job.json")


@contextmanager
def ctrl_c_after():
    """Hold Ctrl-C until the block is done: between a launcher's start and its record, a
    KeyboardInterrupt would leave a process that `stop` cannot find."""
    caught = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    except ValueError:   # not the main thread: signals are not ours to hold
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def start_job(inv: Inventory, doc: dict, opts: JobSpec, *, connect_timeout: float,
              accept_new_host_keys: bool = False,
              resume_of: JobRecord | None = None) -> tuple[JobRecord, dict[str, Transport]]:
    """Stage every board, then start every board. Raises before starting anything when a board
    cannot be staged; stops what it started when a later start fails."""
    plan = Plan.from_dict(doc)
    check_options(opts, plan)
    if plan.launcher != inv.launcher:
        raise ConfigError(f"the plan was made for the {plan.launcher} launcher, cluster.yaml asks for {inv.launcher}",
                          "re-run `dsparse plan`: the launcher's memory is part of every budget")
    work = workload.prepare(inv, plan, opts)
    check_probe_facts(inv, plan)
    settle_master(inv, plan)
    check_port_free(inv)
    rec = resume_of or new_record(inv, plan, records.new_job_id(), plan_hash(doc))
    rec.options = opts.to_dict()
    if resume_of:
        rec.attempts += 1
        rec.advance(JobState.STARTING)
        rec.failed_board, rec.error = None, None
        for run in rec.boards:   # the last attempt's processes are gone: not this one's to show or stop
            run.pid = run.pgid = run.worker_pid = None
    by_name = {b.name: b for b in inv.boards}
    staging = inv.state_dir / "jobs" / f"{rec.id}.staging"
    world = len(rec.boards)

    ifaces, gloo, need_disk = probe_ifaces(inv, plan), probed_gloo(inv), preflight.checkpoint_bytes(plan)
    checks: dict[str, preflight.BoardCheck] = {}

    def stage(run: BoardRun):
        target = run.target = by_name[run.name]   # a resume reaches boards as cluster.yaml says now
        transport = connect(target, connect_timeout=connect_timeout, accept_new_host_keys=accept_new_host_keys)
        try:
            check = checks[run.name] = preflight.check_board(
                transport, target, rank=run.rank, master=inv.master_addr,
                port=inv.master_port if run.rank == 0 and not target.local else None,
                iface=target.iface or ifaces.get(run.name) or ("lo" if target.local else None),
                need_disk=need_disk, gloo=gloo.get(run.name))
            found = check.found
            if check.problems:
                return transport, None
            if not target.local:
                warn_torch_changed(run.name, found, plan)
                run.run_dir = under_home(run.run_dir, found["home"])
            job = replace(work.spec, id=rec.id, workdir=run.run_dir, resume=resume_of is not None).to_dict()
            data_dir = workload.board_data_dir(target, work.spec)
            job["data_dir"] = under_home(data_dir, found["home"]) if data_dir and not target.local else data_dir
            if not target.local and opts.dataset == "digits" and not opts.data_dir:
                # shipped with the runtime, so boards need no scikit-learn
                job["data_dir"] = run.workdir + "/data"
            pkg = _stage_board(transport, target, run, doc, job, staging, work.files)
        except BaseException:
            transport.close()
            raise
        return transport, pkg

    staged = fan_out([by_name[r.name] for r in rec.boards],
                     lambda t: stage(next(r for r in rec.boards if r.name == t.name)))
    failed = [r for r in staged if not r.ok]
    if checks:
        preflight.same_torch(list(checks.values()))
    problems = [p for c in checks.values() for p in c.problems]
    if failed or problems:
        for r in staged:
            if r.ok:
                r.value[0].close()
        if failed:
            raise JobError(f"board {failed[0].name}: {failed[0].error}; nothing was started",
                           exit_code=EXIT_BOARD_FAILED)
        raise preflight.PreflightError(problems, preflight.rows(list(checks.values())))
    transports = {r.name: r.value[0] for r in staged}
    try:
        records.save(inv.state_dir, rec)
        for run, result in zip(rec.boards, staged):
            target, (transport, pkg) = by_name[run.name], result.value
            if resume_of:
                _reset_run(transport, run)
            env = worker_env(target, inv, pkg, ifaces.get(run.name), plan.device(run.name).allocator)
            with ctrl_c_after():   # recorded at once: stop must find it even if we die now
                proc = transport.start_detached(worker_command(target, run.rank, world, inv, run.run_dir),
                                                log_path=run.log_path, env=env, cwd=run.run_dir)
                run.pid, run.pgid, run.started = proc.pid, proc.pgid, time.time()
                records.save(inv.state_dir, rec)
            _write_board_record(transport, run, rec, staging)
    except BaseException as exc:
        from dsparse_cli.jobs.stop import stop_job

        started = sum(1 for r in rec.boards if r.pid)
        stop_job(inv, rec, transports=transports)
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted during the launch: stopped the {started} board(s) started so far",
                              "resume with `dsparse train --resume`") from None
        if isinstance(exc, Exception) and not isinstance(exc, JobError):
            raise JobError(f"could not start the job: {exc}") from exc
        raise
    rec.advance(JobState.RUNNING)
    records.save(inv.state_dir, rec)
    return rec, transports
