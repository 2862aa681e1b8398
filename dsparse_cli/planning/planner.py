"""The DSparse planner: each device trains the most important units its memory can hold.

Pure python on a cost model (a measured `Profile`, or a hand-made `CostTable`); no torch.

Rules (see DESIGN.md, "The planner"):
* Units are ranked by importance (`order`, most important first).
* Each device gets the longest prefix of the ranking whose predicted whole-process peak, plus
  the launcher's private memory (`launcher_bytes`: torchrun's agent runs on the board too), fits
  its budget. A larger budget can only lengthen the prefix, so plans are nested and the distinct
  device-sets form a chain.
* A device that cannot hold forward + the top-ranked unit's update is an error naming it (or,
  with `exclude_small`, it is left out and reported).
* Every unit is trained by some device unless `allow_frozen`.
* Ranks are the devices' positions in inventory order among the included ones; equal budgets
  give equal plans, so ties need no further rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from dsparse_cli.errors import ConfigError
from dsparse_cli.sizes import format_size

SMALL_HINT = "raise memory_limit, lower --batch-size, or pass --exclude-small"


class CostModel(Protocol):
    """What the planner needs: whole-process peak and training bytes of updating a unit set."""

    @property
    def num_units(self) -> int: ...

    @property
    def unit_names(self) -> list[str]: ...

    def peak_bytes(self, updated: Iterable[int]) -> int: ...

    def training_bytes(self, updated: Iterable[int]) -> int: ...


@dataclass
class CostTable:
    """A hand-made additive cost model (tests, what-ifs):
    training(S) = weights + Σ_{u∈S} grad_opt[u] + A(S) + work, with
    A(S) = Σ_{u∈S} saved[u] + Σ_{u>min S, u∉S} passthrough[u]; peak = base + training."""

    base: int
    weights: int
    grad_opt: list[int]
    saved: list[int]
    passthrough: list[int] | None = None
    work: int = 0
    names: list[str] | None = None
    launcher_bytes: int = 0

    @property
    def num_units(self) -> int:
        return len(self.grad_opt)

    @property
    def unit_names(self) -> list[str]:
        return self.names or [f"unit{i}" for i in range(self.num_units)]

    def training_bytes(self, updated: Iterable[int]) -> int:
        s = set(updated)
        if not s:
            return self.weights + self.work
        passthrough = self.passthrough or [0] * self.num_units
        act = sum(self.saved[u] for u in s) + sum(passthrough[u] for u in range(min(s), self.num_units) if u not in s)
        return self.weights + sum(self.grad_opt[u] for u in s) + act + self.work

    def peak_bytes(self, updated: Iterable[int]) -> int:
        return self.base + self.training_bytes(updated)


@dataclass(frozen=True)
class Device:
    name: str
    budget_bytes: int
    extra_bytes: int = 0             # what its allocator holds beyond the cost model's figures


@dataclass
class DevicePlan:
    name: str
    rank: int
    budget_bytes: int
    units: list[int]                 # ascending unit indices this device updates
    predicted_peak_bytes: int
    predicted_training_bytes: int


@dataclass
class Excluded:
    name: str
    budget_bytes: int
    needed_bytes: int
    reason: str


@dataclass
class PlanResult:
    devices: list[DevicePlan]
    order: list[int]
    full_update_peak_bytes: int
    full_update_training_bytes: int
    min_peak_bytes: int              # forward + the top-ranked unit's update
    launcher_bytes: int = 0          # the launcher (supervisor or torchrun's agent) next to the worker
    excluded: list[Excluded] = field(default_factory=list)
    frozen_units: list[int] = field(default_factory=list)   # trained by no device (allow_frozen)


def depth_order(num_units: int) -> list[int]:
    """Later units first: the classifier is the most important."""
    return list(range(num_units - 1, -1, -1))


def _check_order(order: Sequence[int], n: int) -> list[int]:
    order = list(order)
    if sorted(order) != list(range(n)):
        raise ValueError(f"importance order must rank each of the {n} units once, got {order}")
    return order


def plan_devices(devices: Sequence[Device], cost: CostModel, order: Sequence[int] | None = None, *,
                 allow_frozen: bool = False, exclude_small: bool = False,
                 launcher_bytes: int | None = None) -> PlanResult:
    """Assign each device the longest prefix of `order` that fits its budget (see module doc).
    `launcher_bytes`: the launcher next to the worker (default: the cost model's, torchrun's)."""
    n = cost.num_units
    order = _check_order(depth_order(n) if order is None else order, n)
    if not devices:
        raise ConfigError("no boards to plan for", "add boards to cluster.yaml")
    peaks = [0] + [cost.peak_bytes(order[:k]) for k in range(1, n + 1)]
    launcher = int(getattr(cost, "launcher_bytes", 0) if launcher_bytes is None else launcher_bytes)
    needs_of = [0] + [p + launcher for p in peaks[1:]]   # what the board holds: worker + agent
    top = cost.unit_names[order[0]]
    planned, excluded = [], []
    for dev in devices:
        k = max((k for k in range(1, n + 1) if needs_of[k] + dev.extra_bytes <= dev.budget_bytes), default=0)
        if k == 0:
            least = needs_of[1] + dev.extra_bytes
            needs = (f"board {dev.name}: budget {format_size(dev.budget_bytes)}, needs at least "
                     f"{format_size(least)} to train the {top}")
            if not exclude_small:
                raise ConfigError(needs, SMALL_HINT)
            excluded.append(Excluded(dev.name, dev.budget_bytes, least, needs.split(": ", 1)[1]))
            continue
        planned.append((dev, k))
    if not planned:
        raise ConfigError(f"no board can train even the {top}: it needs {format_size(needs_of[1])} per board",
                          "raise memory_limit or lower --batch-size")
    largest_dev, largest_k = max(planned, key=lambda p: (p[1], p[0].budget_bytes))  # first in order on ties
    frozen = sorted(order[largest_k:])
    if frozen and not allow_frozen:
        raise ConfigError(
            f"no board can train every unit: the largest, {largest_dev.name} (budget "
            f"{format_size(largest_dev.budget_bytes)}), fits {largest_k} of {n} units; a full update "
            f"needs {format_size(needs_of[n] + largest_dev.extra_bytes)}",
            "raise its memory_limit, lower --batch-size, or pass --allow-frozen")
    plans = [DevicePlan(dev.name, rank, dev.budget_bytes, sorted(order[:k]), peaks[k],
                        cost.training_bytes(order[:k])) for rank, (dev, k) in enumerate(planned)]
    return PlanResult(devices=plans, order=order, full_update_peak_bytes=peaks[n],
                      full_update_training_bytes=cost.training_bytes(range(n)), min_peak_bytes=peaks[1],
                      launcher_bytes=launcher,
                      excluded=excluded, frozen_units=frozen)
