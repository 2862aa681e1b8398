"""The typed records between stages (dsparse_cli/contract.py): checked reads, round trips, states."""

from __future__ import annotations

import json

import pytest

from dsparse_cli.contract import (JOB_TRANSITIONS, WORKER_TRANSITIONS, ContractError, HeartbeatDoc, JobSpec,
                                  JobState, Plan, WorkerState, check_transition, plan_hash)
from dsparse_cli.jobs.records import JobRecord
from dsparse_cli.runtime.heartbeat import Heartbeat

from test_planfile import make_doc


def test_a_real_plan_round_trips_exactly_and_keeps_unknown_keys():
    doc = make_doc()
    doc["devices"][0]["measured_peak_bytes"] = 123      # written by --verify, unknown to the record
    plan = Plan.from_dict(doc)
    assert plan.devices[0].name == "jetson" and plan.devices[0].units == [0, 1, 2]
    assert plan.groups and all(g.op in ("allreduce", "broadcast") for g in plan.groups)
    again = plan.to_dict()
    assert again == doc and plan_hash(again) == plan_hash(doc)
    assert plan.boards() == ["jetson", "pi-a", "pi-b"]


@pytest.mark.parametrize("change,message", [
    (lambda d: d["devices"][1].update(rank=5), "plan.devices[1] (pi-a) has rank 5: a rank is its index"),
    (lambda d: d["devices"][0]["units"].append(9), "plan.devices[0] (jetson) trains unit 9"),
    (lambda d: d["groups"][0].update(op="gather"), "plan.groups[0].op is 'gather'"),
    (lambda d: d.update(batch_size="64"), "plan.batch_size is '64', not an integer"),
    (lambda d: d["units"][1].pop("modules"), "plan.units[1] is missing modules"),
    (lambda d: d.update(sync_every=0), "plan.sync_every is 0, must be at least 1"),
    (lambda d: d.update(version=7), "plan version 7 is not supported (expected 1)"),
])
def test_a_bad_plan_is_one_line_naming_the_key(change, message):
    doc = make_doc()
    change(doc)
    with pytest.raises(ContractError) as err:
        Plan.from_dict(doc)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_job_spec_defaults_round_trip_and_checks():
    spec = JobSpec()
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert JobSpec.from_dict({"epochs": 3, "id": "j"}).lr == spec.lr     # missing keys take the default
    for doc, message in [({"epochz": 3}, "job has an unknown key 'epochz'"),
                         ({"epochs": "3"}, "job.epochs is '3', not an integer"),
                         ({"eval": 1}, "job.eval is 1, not true/false"),
                         ({"optimizer": "rmsprop"}, "job.optimizer is 'rmsprop': choose sgd, sgd-momentum, adam"),
                         ({"compression": {}}, "job.compression is missing name")]:
        with pytest.raises(ContractError, match=message):
            JobSpec.from_dict(doc)


def test_job_record_moves_only_along_written_transitions():
    rec = JobRecord("j", "c", None, "h", "a", 1, [])
    for state in (JobState.RUNNING, JobState.STOPPING, JobState.STOPPED, JobState.STARTING, JobState.FAILED):
        rec.advance(state)
        assert rec.state == state
    with pytest.raises(ContractError, match="JobState cannot go from failed to running"):
        rec.advance("running")
    assert JobRecord.from_dict(json.loads(rec.to_json())).state is JobState.FAILED
    assert set(JOB_TRANSITIONS) == set(JobState)


def test_worker_never_leaves_a_final_state(tmp_path):
    hb = Heartbeat(str(tmp_path), "j", 0, "b0", interval=0)
    hb.set_state("running")
    hb.set_state("finished")
    with pytest.raises(ContractError, match="finished to failed"):
        hb.set_state("failed")
    assert set(WORKER_TRANSITIONS) == set(WorkerState)
    check_transition(WORKER_TRANSITIONS, "running", "running")    # staying put is not a transition


def test_heartbeat_reader_keeps_what_a_newer_worker_adds_and_refuses_bad_states():
    hb = HeartbeatDoc.from_dict({"state": "running", "step": 3, "time": 1.5, "new_key": 1})
    assert hb.step == 3 and hb.extra == {"new_key": 1} and hb.to_dict()["new_key"] == 1
    with pytest.raises(ContractError, match="status.json.state is 'exploded'"):
        HeartbeatDoc.from_dict({"state": "exploded"})
    assert f"{WorkerState.RUNNING}" == "running" and json.dumps(WorkerState.RUNNING) == '"running"'
