"""Collective timeouts are the job's, in every process group (issue #16: a subgroup made with
torch's defaults waits gloo's 30 minutes for a peer that is gone)."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.distributed as dist

from dsparse_cli.runtime.aggregate import GroupedAggregator
from dsparse_cli.runtime.models import build_model, units_from_plan

from _runtime_helpers import make_plan, run_ranks

pytestmark = pytest.mark.slow
TIMEOUT_S = 3.0


def _subgroup_waits_only_the_job_timeout(rank: int, world: int, out: str) -> None:
    plan = make_plan([[0, 1, 2, 3], [0, 1, 2, 3], [3]])     # ranks 0 and 1 share units 0-2
    model = build_model("tiny_cnn")
    agg = GroupedAggregator(plan, rank, model, units_from_plan(plan), timeout_s=TIMEOUT_S)
    pair = next(g for g in agg.groups if g.op == "allreduce" and g.ranks == [0, 1])
    if rank == 0:                        # rank 1 never joins: it "went away"
        started = time.monotonic()
        try:
            dist.all_reduce(torch.ones(4), group=pair.pg)
            result = {"raised": False}
        except RuntimeError as exc:
            result = {"raised": True, "error": str(exc).splitlines()[0]}
        result["waited_s"] = time.monotonic() - started
        with open(out, "w") as fh:
            json.dump(result, fh)
    dist.barrier()                        # the world group (60 s in the helper) ends the test


def test_a_subgroup_collective_gives_up_after_the_job_timeout(tmp_path):
    out = tmp_path / "rank0.json"
    run_ranks(_subgroup_waits_only_the_job_timeout, 3, str(out))
    result = json.loads(out.read_text())
    assert result["raised"], result
    assert TIMEOUT_S - 0.5 <= result["waited_s"] < 30, result     # not gloo's 30 minutes
