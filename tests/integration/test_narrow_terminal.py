"""`dsparse probe` and `dsparse status` on an 80-column terminal (COLUMNS=80): every cell whole, a
failed board's error on its own line under the table; `--json` the same at any width."""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest
from test_probe_cli import cluster

from helpers import run_cli

pytestmark = pytest.mark.integration
NARROW = {"COLUMNS": "80"}


def cells(text: str) -> list[list[str]]:
    """Each table line (headers and rows) as its stripped cells."""
    return [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in text.splitlines() if line[:1] in "│┃"]


def test_probe_at_80_columns_names_the_failed_board_under_the_table(tmp_path, sshd):
    known = tmp_path / "known_hosts"
    known.write_text("")   # ssh0's host key is unknown: it fails, `here` answers
    path = cluster(tmp_path, sshd, known_hosts=known)
    proc = run_cli("probe", "--cluster", str(path), "--connect-timeout", "5", cwd=tmp_path, env=NARROW)
    assert proc.returncode == 1, proc.stderr
    rows = cells(proc.stdout)
    assert rows[0][:3] == ["board", "kind", "usable"] and len(rows[0]) < 11
    assert rows[1][:2] == ["ssh0", "failed"] and rows[2][0] == "here" and rows[2][2] == "900.0 MiB"
    assert all(len(line) <= 80 for line in proc.stdout.split("ssh0: ")[0].splitlines())
    error = proc.stdout.split("└")[-1].splitlines()[1]   # the line under the table, whole
    assert error.startswith(f"ssh0: host key for {sshd.host}:{sshd.port} is not known")
    assert "or pass --accept-new-host-keys" in error


def test_probe_json_does_not_depend_on_the_width(tmp_path, sshd):
    known = tmp_path / "known_hosts"
    known.write_text("")
    path = cluster(tmp_path, sshd, known_hosts=known, local=False)
    docs = [run_cli("probe", "--cluster", str(path), "--json", cwd=tmp_path, env={"COLUMNS": w}).stdout
            for w in ("80", "200")]
    assert json.loads(docs[0]) == json.loads(docs[1])
    assert "host key" in json.loads(docs[0])["boards"][0]["error"]


def _job_with_heartbeats(tmp_path, heartbeats: dict[str, dict]):
    """A recorded job of local boards (no processes) whose run dirs hold these heartbeats."""
    from dsparse_cli.inventory import load_inventory
    from dsparse_cli.jobs import records
    from dsparse_cli.jobs.launch import new_record

    boards = "".join(f"  - {{name: {n}, local: true, workdir: {tmp_path / n}}}\n" for n in heartbeats)
    (tmp_path / "cluster.yaml").write_text(f"name: lab\nboards:\n{boards}")
    inv = load_inventory(tmp_path / "cluster.yaml")
    plan = SimpleNamespace(devices=[SimpleNamespace(name=n, rank=i) for i, n in enumerate(heartbeats)])
    rec = new_record(inv, plan, "20261127-183132-4784", "h")
    records.save(inv.state_dir, rec)
    for run in rec.boards:
        (tmp_path / run.name / "runs" / rec.id).mkdir(parents=True)
        hb = {"job": rec.id, "rank": run.rank, "name": run.name, "time": time.time(), **heartbeats[run.name]}
        (tmp_path / run.name / "runs" / rec.id / "status.json").write_text(json.dumps(hb))


def test_status_at_80_columns_shows_board_state_and_step_whole(tmp_path):
    progress = {"epoch": 2, "epochs": 4, "global_step": 110, "total_steps": 200, "loss": 0.4321,
                "accuracy": 0.875, "samples_per_s": 99.5, "peak_process_bytes": 961 << 20, "agg_ms_per_step": 12.5,
                "bytes_per_step": 8 << 20}
    error = "CUDA out of memory: tried to allocate 20.00 MiB (GPU 0; 3.8 GiB total capacity; 2.9 GiB in use)"
    _job_with_heartbeats(tmp_path, {"demo-jetson": {**progress, "state": "running"},
                                    "demo-x86": {**progress, "state": "finished", "global_step": 200},
                                    "demo-rpi4": {**progress, "state": "failed", "error": error}})
    proc = run_cli("status", "--cluster", str(tmp_path / "cluster.yaml"), cwd=tmp_path, env=NARROW)
    assert proc.returncode == 1, proc.stderr
    rows = cells(proc.stdout)
    assert rows[0] == ["board", "state", "step", "loss", "acc", "peak / budget"]
    assert [r[:3] for r in rows[1:]] == [["demo-jetson", "running", "110/200"],
                                        ["demo-x86", "finished", "200/200"],
                                        ["demo-rpi4", "failed", "110/200"]]
    assert all(len(line) <= 80 for line in proc.stdout.splitlines())
    assert " ".join(proc.stderr.split()).count(f"demo-rpi4: {error}") == 1   # once, under the table
    json_doc = run_cli("status", "--cluster", str(tmp_path / "cluster.yaml"), "--json", cwd=tmp_path, env=NARROW)
    assert [b["global_step"] for b in json.loads(json_doc.stdout)["boards"]] == [110, 200, 110]
