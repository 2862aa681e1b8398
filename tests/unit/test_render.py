"""Tables that fit the terminal: at 80 columns the essential columns only, every cell whole; a
failed board's error on its own line under the table; all columns when wide enough or `render.wide`."""

from __future__ import annotations

import re

import pytest
from rich.console import Console
from test_planfile import make_doc

from dsparse_cli import render
from dsparse_cli.probing.parse import DeviceInfo

HOST_KEY_ERROR = ("host key for 192.168.100.23:22 is not known (run `ssh-keyscan -p 22 192.168.100.23 "
                  ">> ~/.ssh/known_hosts` or pass --accept-new-host-keys)")
PROBE_ALL = ["board", "kind", "model", "arch", "cpus", "mem total", "available", "cgroup limit", "usable",
             "torch", "address", "link"]
BOARD_ALL = ["board", "state", "epoch", "step", "loss", "acc", "samples/s", "peak / budget", "agg ms/step",
             "bytes/step", "hb age"]


@pytest.fixture(autouse=True)
def _not_wide(monkeypatch):
    monkeypatch.setattr(render, "wide", False)


def show(renderable, width: int = 80, **print_kw) -> str:
    """What `console.print(renderable)` writes on a terminal `width` columns wide."""
    console = Console(width=width, record=True, no_color=True)
    console.print(renderable, **print_kw)
    return console.export_text()


def cells(text: str) -> list[list[str]]:
    """Each table line (headers and rows) as its stripped cells."""
    return [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in text.splitlines() if line[:1] in "│┃"]


def fits(text: str, width: int = 80) -> bool:
    return all(len(line.rstrip()) <= width for line in text.splitlines())


def probe_infos() -> list[DeviceInfo]:
    ok = DeviceInfo(name="jetson-orin-lab", kind="jetson", model="NVIDIA Jetson Orin Nano", arch="aarch64",
                    cpus=6, mem_total_bytes=8 << 30, mem_available_bytes=6 << 30, usable_memory_bytes=3 << 30,
                    torch="2.3.0+nv24.5", address="192.168.100.21", iface="eth0")
    return [ok, DeviceInfo.failed("pi-kitchen", HOST_KEY_ERROR)]


def board_rows() -> list[dict]:
    running = {"name": "jetson-orin", "state": "running", "epoch": 2, "epochs": 4, "global_step": 110,
               "total_steps": 200, "loss": 0.4321, "accuracy": 0.875, "samples_per_s": 123.4,
               "peak_process_bytes": 961 << 20, "budget_bytes": 1536 << 20, "agg_ms_per_step": 12.5,
               "bytes_per_step": 8 << 20, "heartbeat_age_s": 1.2, "error": None}
    lost = {"name": "pi-kitchen", "state": "unreachable", "global_step": 1100, "total_steps": 2000,
            "error": "did not answer for 9s (TimeoutError: timed out)"}
    return [running, {**running, "name": "demo-rpi4", "state": "finished", "global_step": 200}, lost]


def test_probe_at_80_columns_keeps_cells_whole_and_the_error_under_the_table():
    text = show(render.probe_table("lab", probe_infos()), soft_wrap=True)
    assert fits(text.split("pi-kitchen: ")[0])
    assert cells(text) == [["board", "kind", "usable", "torch", "address"],
                           ["jetson-orin-lab", "jetson", "3.0 GiB", "2.3.0+nv24.5", "192.168.100.21 (eth0)"],
                           ["pi-kitchen", "failed", "", "", ""]]
    assert f"pi-kitchen: {HOST_KEY_ERROR}" in text.splitlines()   # whole, on one line


def test_probe_error_line_is_whole_even_when_the_console_wraps_it():
    text = show(render.probe_table("lab", probe_infos()))
    after = text.split("└")[-1].split("\n", 1)[1]
    assert fits(text) and " ".join(after.split()) == f"pi-kitchen: {HOST_KEY_ERROR}"
    assert "pi-kitchen: host key for" in after.splitlines()[0]


def test_plan_at_80_columns_shows_the_essential_columns_whole():
    doc = make_doc()
    for d, name in zip(doc["devices"], ("jetson-orin-lab", "pi-kitchen-01", "pi-garage-02")):
        d["name"] = name
        d["measured_training_bytes"] = d["measured_peak_bytes"] = d["predicted_training_bytes"]
    text = show(render.plan_view(doc))
    assert fits(text)
    rows = cells(text)
    assert rows[0] == ["rank", "board", "budget", "predicted peak", "units updated"]
    assert [r[1] for r in rows[1:4]] == ["jetson-orin-lab", "pi-kitchen-01", "pi-garage-02"]
    assert rows[1][4] == "0-2 (u0..u2)" and rows[2][4] == "1-2 (u1..u2)"
    assert ["group", "op", "ranks", "root", "units", "every", "bytes/step"] in rows   # the groups table fits whole


def test_follower_and_status_at_80_columns_show_board_state_and_step_whole():
    follower = show(render.board_table("job 20261127-183132-4784", board_rows(), {"jetson-orin": 2 << 30}))
    status = render.status_table({"job": "20261127-183132-4784", "state": "degraded", "boards": board_rows()})
    status.caption = "cluster lab"   # as `dsparse status` captions it
    status_text = show(status)
    for text in (follower, status_text):
        assert fits(text) and "…" not in text
        rows = cells(text)
        assert rows[0] == ["board", "state", "step", "loss", "acc", "peak / budget"]
        assert [r[:3] for r in rows[1:]] == [["jetson-orin", "running", "110/200"],
                                            ["demo-rpi4", "finished", "200/200"],
                                            ["pi-kitchen", "unreachable", "1100/2000"]]
        assert "did not answer" not in text   # errors are the caller's lines, never cells
    assert "961.0 MiB / 2.0 GiB" in follower and "961.0 MiB / 1.5 GiB" in status_text
    assert "cluster lab" in status_text


def test_narrower_still_drops_the_least_essential_columns_rather_than_cut_cells():
    rows = board_rows()
    rows[0]["name"] = "jetson-orin-nano-lab"
    assert cells(show(render.board_table("job j", rows)))[0] == ["board", "state", "step", "loss", "peak / budget"]
    narrow = cells(show(render.board_table("job j", rows), width=50))
    assert narrow[0] == ["board", "state", "step"] and narrow[1] == ["jetson-orin-nano-lab", "running", "110/200"]


def test_wide_terminal_shows_every_column():
    assert cells(show(render.probe_table("lab", probe_infos()), width=200))[0] == PROBE_ALL
    assert cells(show(render.board_table("job j", board_rows()), width=200))[0] == BOARD_ALL
    plan = cells(show(render.plan_view(make_doc()), width=200))
    assert plan[0] == ["rank", "board", "budget", "predicted peak", "full-update peak", "training saving",
                       "units updated", "link", "wire/step"]


def test_render_wide_shows_every_column_at_80(monkeypatch):
    monkeypatch.setattr(render, "wide", True)
    text = show(render.probe_table("lab", probe_infos()), soft_wrap=True)  # soft wrap: lines are not cropped
    assert cells(text)[0] == PROBE_ALL
    assert "jetson-orin-lab" in text and "NVIDIA Jetson Orin Nano" in text
    assert f"pi-kitchen: {HOST_KEY_ERROR}" in text.splitlines()
    assert cells(show(render.board_table("job j", board_rows()), soft_wrap=True))[0] == BOARD_ALL
