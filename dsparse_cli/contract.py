"""The records that cross stages: the plan, the job spec and the heartbeat, with their states.

Both sides import this module: the control side (plan, train, status) and the runtime on the
board, so it uses only the standard library and is shipped with the runtime. Files on disk stay
plain JSON; `from_dict` is the one place a reader checks a document, with a one-line
`ContractError` naming the first bad key. Unknown keys are kept (`extra`), so a newer writer's
additions survive a round trip and the plan hash does not change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum


class ContractError(ValueError):
    """A document that does not follow its contract; the message names the key."""


class _State(str, Enum):
    def __str__(self) -> str:  # the value in f-strings and JSON, on every Python version
        return self.value


class WorkerState(_State):
    """What a worker reports in `status.json`."""
    STARTING = "starting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"


# A worker never leaves a final state; a resumed attempt is a new worker with a new heartbeat.
WORKER_TRANSITIONS = {
    WorkerState.STARTING: {WorkerState.RUNNING, WorkerState.FAILED, WorkerState.STOPPED},
    WorkerState.RUNNING: {WorkerState.FINISHED, WorkerState.FAILED, WorkerState.STOPPED},
    WorkerState.FINISHED: set(), WorkerState.FAILED: set(), WorkerState.STOPPED: set(),
}


class JobState(_State):
    """A job as its local record holds it."""
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"   # `stop` records this before it signals anything
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"


_ENDED = {JobState.FINISHED, JobState.FAILED, JobState.STOPPED}
# Every final state may start again (`train --resume`); a stop ends in whatever caused it.
JOB_TRANSITIONS = {
    JobState.STARTING: {JobState.RUNNING, JobState.STOPPING} | _ENDED,
    JobState.RUNNING: {JobState.STOPPING} | _ENDED,
    JobState.STOPPING: set(_ENDED),
    **{s: {JobState.STARTING} for s in _ENDED},
}


class BoardStatus(_State):
    """One board of a job as `status` and the follower see it (heartbeat + processes)."""
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    STALE = "stale"             # alive, but no heartbeat for too long (e.g. a hung collective)
    UNREACHABLE = "unreachable"
    STOPPED = "stopped"         # failed because the job was stopped on request


class JobStatus(_State):
    """A whole job as `status` reports it: the record's state read together with its boards."""
    RUNNING = "running"
    DEGRADED = "degraded"       # a board is stale or unreachable
    STOPPING = "stopping"
    STOPPED = "stopped"
    FINISHED = "finished"
    FAILED = "failed"


# A heartbeat older than this on a live process is stuck (e.g. a hung collective): `status` and
# the follower call the board stale.
STALE_AFTER_S = 60.0


def check_transition(table: dict, old: str, new: str) -> None:
    """ContractError unless `old -> new` is written down in `table` (staying put is allowed)."""
    kind = type(next(iter(table)))
    old, new = kind(old), kind(new)
    if new != old and new not in table[old]:
        raise ContractError(f"{kind.__name__} cannot go from {old} to {new}")


def plan_hash(plan: dict) -> str:
    """What a job records and a checkpoint carries: sha256 of the plan's sorted JSON, 16 hex."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


# --- reading documents -------------------------------------------------------------------------
def _take(cls, doc, where: str):
    """An instance of the dataclass `cls` from a dict: required keys present, each value of the
    kind its field is annotated with, unknown keys kept in `extra` when the class has one."""
    if not isinstance(doc, dict):
        raise ContractError(f"{where} is {type(doc).__name__}, not an object")
    names = {f.name for f in fields(cls)} - {"extra"}
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in doc]
    if missing:
        raise ContractError(f"{where} is missing {', '.join(missing)}")
    for f in fields(cls):
        value = doc.get(f.name)
        if value is not None and not _is(value, _kinds(f.type)):
            raise ContractError(f"{where}.{f.name} is {value!r}, not {_kind_name(_kinds(f.type))}")
    known = {k: v for k, v in doc.items() if k in names}
    if "extra" in {f.name for f in fields(cls)}:
        known["extra"] = {k: v for k, v in doc.items() if k not in names}
    return cls(**known)


# A field's annotation (a string, as `from __future__ import annotations` leaves it) -> JSON kinds.
_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,),
          "dict": (dict,)}
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
          dict: "an object"}


def _kinds(annotation: str) -> tuple:
    return sum((_KINDS[t.strip()] for t in annotation.split("|") if t.strip() != "None"), ())


def _is(value, kinds: tuple) -> bool:
    if isinstance(value, bool) and bool not in kinds:
        return False  # True is an int to Python, never to a contract
    return isinstance(value, kinds)


def _kind_name(kinds: tuple) -> str:
    return _NAMES[float] if float in kinds else " or ".join(_NAMES[k] for k in kinds)


def _emit(record) -> dict:
    """The JSON document of a record: its fields, then its kept unknown keys."""
    doc = {f.name: getattr(record, f.name) for f in fields(record) if f.name != "extra"}
    doc = json.loads(json.dumps(doc, default=_emit))  # nested records and enums: plain JSON
    return {**doc, **getattr(record, "extra", {})}


# --- the plan ----------------------------------------------------------------------------------
@dataclass
class PlanUnit:
    """An update unit: the modules (qualified names, in order) whose state trains together."""
    index: int
    name: str
    modules: list
    param_bytes: int = 0
    buffer_bytes: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class PlanDevice:
    """One board in the plan: its rank (== its index in `devices`), budget and units it trains."""
    name: str
    rank: int
    units: list
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_training_bytes: int | None = None
    full_update_peak_bytes: int | None = None
    full_update_training_bytes: int | None = None
    allocator: str = "lean"             # ALLOCATORS: how its worker's glibc hands out memory
    extra: dict = field(default_factory=dict)


@dataclass
class PlanGroup:
    """A process group: `allreduce` averages gradients among `ranks`; `broadcast` sends the
    units' state (`state_bytes`) from `root` along `receivers` in their order (a chain) every
    `sync_every` steps."""
    op: str
    ranks: list
    units: list
    id: int | None = None
    root: int | None = None
    receivers: list = field(default_factory=list)
    bytes_per_step: float = 0   # a broadcast group also has `state_bytes` and its own `sync_every`
    extra: dict = field(default_factory=dict)


PLAN_VERSION = 1
GROUP_OPS = ("allreduce", "broadcast")
# lean (the default): freed memory goes back at once, so training memory follows live tensors as
# the profile measured it; fast: glibc's defaults, 1.6-1.9x faster CPU steps, more memory (BENCHMARKS)
ALLOCATORS = ("lean", "fast")


@dataclass
class Plan:
    """`.dsparse/plan.json`. Budgets and peaks are whole-process bytes (`memory_meaning`)."""
    model: str
    num_classes: int
    image_size: int
    batch_size: int
    optimizer: str
    units: list
    devices: list
    groups: list
    version: int = PLAN_VERSION
    cluster: str | None = None
    sync_every: int = 1
    base_bytes: int = 0
    launcher: str = "torchrun"          # what starts the worker; plans from before it say nothing
    launcher_bytes: int = 0
    probe: dict = field(default_factory=dict)
    excluded: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, doc: dict, where: str = "plan") -> "Plan":
        if isinstance(doc, dict) and doc.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise ContractError(f"plan version {doc.get('version')} is not supported (expected {PLAN_VERSION})")
        plan = _take(cls, doc, where)
        plan.units = [_take(PlanUnit, u, f"{where}.units[{i}]") for i, u in enumerate(plan.units)]
        plan.devices = [_take(PlanDevice, d, f"{where}.devices[{i}]") for i, d in enumerate(plan.devices)]
        plan.groups = [_take(PlanGroup, g, f"{where}.groups[{i}]") for i, g in enumerate(plan.groups)]
        plan._check(where)
        return plan

    def _check(self, where: str) -> None:
        for i, d in enumerate(self.devices):
            if d.rank != i:
                raise ContractError(f"{where}.devices[{i}] ({d.name}) has rank {d.rank}: a rank is its index")
            bad = [u for u in d.units if not isinstance(u, int) or not 0 <= u < len(self.units)]
            if bad:
                raise ContractError(f"{where}.devices[{i}] ({d.name}) trains unit {bad[0]!r}, "
                                    f"which the plan's {len(self.units)} units do not have")
            if d.allocator not in ALLOCATORS:
                raise ContractError(f"{where}.devices[{i}].allocator is {d.allocator!r}, "
                                    f"not one of {', '.join(ALLOCATORS)}")
        for i, g in enumerate(self.groups):
            if g.op not in GROUP_OPS:
                raise ContractError(f"{where}.groups[{i}].op is {g.op!r}, not one of {', '.join(GROUP_OPS)}")
            if any(not isinstance(r, int) or not 0 <= r < len(self.devices) for r in g.ranks):
                raise ContractError(f"{where}.groups[{i}] names a rank outside 0..{len(self.devices) - 1}")
        if self.sync_every < 1:
            raise ContractError(f"{where}.sync_every is {self.sync_every}, must be at least 1")

    def to_dict(self) -> dict:
        return _emit(self)

    def device(self, name: str) -> PlanDevice | None:
        return next((d for d in self.devices if d.name == name), None)

    def boards(self) -> list[str]:
        """Every board the plan was made for, included or left out."""
        return [d.name for d in self.devices] + [e["name"] for e in self.excluded]


# --- the job spec ------------------------------------------------------------------------------
# The compressor options `dsparse train` exposes, with THE default of each; the compressors in
# runtime/compress/ take these defaults too (their other options are internal tuning).
COMPRESSOR_OPTIONS = {
    "topk": {"density": 0.01, "warmup_steps": 20},
    "pbgc": {"key_fraction": 0.001, "entropy_bins": 32, "warmup_steps": 20},
}
DATASETS = ("digits", "cifar10", "synthetic", "imagefolder")
OPTIMIZERS = ("sgd", "sgd-momentum", "adam")
# The models with a hand-made unit split (runtime/models.py); any torchvision classification model
# and a user's own model file work too (`dsparse models` lists them).
MODELS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18", "shufflenet_v2_x0_5", "tiny_cnn")
BACKENDS = ("gloo", "nccl")
LR_SCHEDULES = ("cosine", "step", "constant")


@dataclass
class JobSpec:
    """`job.json`: what to train and how. Each default here is THE default: `dsparse train`'s
    options and the worker both take theirs from this class."""
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd-momentum"
    seed: int = 0
    sync_every: int | None = None       # None: the plan's
    compression: dict = field(default_factory=lambda: {"name": "none"})
    backend: str = "gloo"
    collective_timeout_s: float = 120.0
    heartbeat_s: float = 1.0
    checkpoint_every_steps: int | None = None
    eval: bool = True
    bn_batches: int = 8                 # batches per board BatchNorm statistics are recomputed over before
                                        # each evaluation and the hand-back (0: keep the running averages)
    lr_schedule: str = "cosine"
    log_every_steps: int = 10
    stop_grace_s: float = 8.0           # keep below the launcher's SIGKILL grace
    master_lost_s: float = 30.0         # a worker whose master is silent this long ends itself
    synthetic_samples: int | None = None
    weights: str | None = None          # a torchvision weights name (DEFAULT, IMAGENET1K_V1...) or a file
    val_fraction: float = 0.2           # imagefolder without train/ and val/: the share held out
    skip_bad_images: bool = False       # imagefolder: skip (and count) images that do not decode
    # Set by the launcher per board and attempt.
    id: str = "job"
    workdir: str | None = None
    resume: bool = False
    CHOICES = {"dataset": DATASETS, "optimizer": OPTIMIZERS, "backend": BACKENDS, "lr_schedule": LR_SCHEDULES}

    @classmethod
    def from_dict(cls, doc: dict, where: str = "job") -> "JobSpec":
        """Checked; unknown keys are an error here (a typo would silently train with a default)."""
        unknown = sorted(set(doc) - {f.name for f in fields(cls)}) if isinstance(doc, dict) else []
        if unknown:
            raise ContractError(f"{where} has an unknown key {unknown[0]!r}")
        spec = _take(cls, doc, where)
        for key, choices in cls.CHOICES.items():
            if getattr(spec, key) not in choices:
                raise ContractError(f"{where}.{key} is {getattr(spec, key)!r}: choose {', '.join(choices)}")
        if "name" not in spec.compression:
            raise ContractError(f"{where}.compression is missing name")
        return spec

    def to_dict(self) -> dict:
        return asdict(self)


# The trained model a finished job hands back, in rank 0's run dir and .dsparse/jobs/<id>/.
MODEL_FILE, MODEL_SIDECAR = "model.pt", "model.json"


# --- the heartbeat -----------------------------------------------------------------------------
@dataclass
class HeartbeatDoc:
    """`status.json`, written by the worker every `heartbeat_s` and at once on a state change.
    `time` is the board's clock: readers compare it with the board's clock, never their own.
    Memory: `peak_memory_bytes` is training memory (peak of private memory above the base point
    right before the first step), `base_memory_bytes` the whole process there, `peak_process_bytes`
    the whole process's peak."""
    job: str | None = None
    rank: int | None = None
    name: str | None = None
    state: str = WorkerState.STARTING.value
    epoch: int | None = None            # 1-based, the epoch in progress
    epochs: int | None = None
    step: int | None = None             # steps done in this epoch
    steps_per_epoch: int | None = None
    loss: float | None = None
    accuracy: float | None = None       # the same on every board (all-reduced eval)
    samples_per_s: float | None = None
    peak_memory_bytes: float | None = None
    base_memory_bytes: float | None = None
    agg_ms_per_step: float | None = None
    bytes_sent_per_step: float | None = None
    bytes_recv_per_step: float | None = None
    bytes_per_step: float | None = None
    dense_bytes_per_step: float | None = None
    compression_ratio: float | None = None
    compress_ms_per_step: float | None = None
    updated_units: list | None = None
    pid: int | None = None              # the worker's: the launcher stops its process group too
    time: float | None = None
    error: str | None = None
    peak_process_bytes: float | None = None
    global_step: int | None = None
    total_steps: int | None = None
    threads: int | None = None          # torch's intra-op threads (cluster.yaml `threads:` or effective CPUs)
    agg_ms_median: float | None = None  # over this attempt's steps, each step's own agg_ms
    agg_ms_p90: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, doc: dict, where: str = "status.json") -> "HeartbeatDoc":
        hb = _take(cls, doc, where)
        if hb.state not in {s.value for s in WorkerState}:
            raise ContractError(f"{where}.state is {hb.state!r}, not a worker state")
        return hb

    def to_dict(self) -> dict:
        return _emit(self)


# Beyond the original contract: whole-process peak, steps done over all epochs and the run's total,
# torch's threads, the spread of the aggregation time.
HEARTBEAT_EXTRA_KEYS = ("peak_process_bytes", "global_step", "total_steps", "threads", "agg_ms_median", "agg_ms_p90")
HEARTBEAT_KEYS = tuple(f.name for f in fields(HeartbeatDoc) if f.name not in HEARTBEAT_EXTRA_KEYS + ("extra",))
