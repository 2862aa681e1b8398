"""`dsparse data push DIR`: each board gets exactly its shard, a second push sends nothing, a bad
folder copies nothing; and the same push over SSH, with SFTP and over the exec channel."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dsparse_cli.jobs import datapush
from dsparse_cli.runtime import imagefolder
from dsparse_cli.runtime.imagefolder import scan, shard
from helpers import make_digits_imagefolder, one_line_error, run_cli, seed_profile

CLUSTER = """name: local2
boards:
  - {{name: a, local: true, memory_limit: 1900MiB, data_dir: {a_data}}}
  - {{name: b, local: true, memory_limit: 1800MiB}}
"""


@pytest.fixture(scope="module")
def planned(tmp_path_factory, tiny_cnn_profile) -> Path:
    """cluster.yaml (board a with its own data_dir, b with the default) and a plan (what a push
    reads from it: the boards' ranks and the model's classes), from the session's profile."""
    d = tmp_path_factory.mktemp("push")
    (d / "cluster.yaml").write_text(CLUSTER.format(a_data=d / "a-data"))
    seed_profile(tiny_cnn_profile, d / ".dsparse")
    proc = run_cli("plan", "--model", "tiny_cnn", "--batch-size", "16", "--json", cwd=d)
    assert proc.returncode == 0, proc.stderr
    make_digits_imagefolder(d / "digits", per_class=9)
    return d


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_push_copies_each_board_its_shard_and_only_once(planned):
    proc = run_cli("data", "push", "digits", "--json", cwd=planned)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    index = scan(str(planned / "digits"), 0.2)
    assert (doc["train"], doc["val"], doc["bad_images"]) == (len(index.train), len(index.val), 0)
    dirs = {"a": planned / "a-data", "b": planned / ".dsparse" / "boards" / "b" / "data" / "digits"}
    for board, rank in (("a", 0), ("b", 1)):
        mine = shard(index, rank, 2)
        expected = {p for p, _ in mine.train + mine.val}
        row = next(r for r in doc["boards"] if r["name"] == board)
        assert row["ok"] and row["rank"] == rank and Path(row["data_dir"]) == dirs[board]
        assert (row["files"], row["sent"], row["skipped"]) == (len(expected), len(expected), 0)
        assert row["bytes_sent"] == sum((planned / "digits" / p).stat().st_size for p in expected)
        assert _files(dirs[board]) == expected | {imagefolder.MANIFEST}   # no tar left behind
        loaded = imagefolder.read_manifest(str(dirs[board]))
        assert (loaded.train, loaded.val, loaded.rank, loaded.world) == (mine.train, mine.val, rank, 2)

    again = run_cli("data", "push", "digits", "--json", cwd=planned)
    assert again.returncode == 0, again.stderr
    for row in json.loads(again.stdout)["boards"]:
        assert (row["sent"], row["bytes_sent"], row["skipped"]) == (0, 0, row["files"])

    (dirs["b"] / mine.train[0][0]).unlink()          # resumable: only what is missing travels
    table = run_cli("data", "push", "digits", "--wide", cwd=planned)
    assert table.returncode == 0, table.stderr
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]]
             for line in table.stdout.splitlines() if line.startswith("│")}
    assert lines["a"][3:5] == ["0", str(lines["a"][2])] and lines["b"][3] == "1"
    assert "10 classes" in table.stderr


@pytest.mark.slow
def test_a_missing_or_bad_folder_copies_nothing(planned, tmp_path):
    before = _files(planned)
    proc = run_cli("data", "push", "nowhere", cwd=planned)
    assert proc.returncode == 2
    assert one_line_error(proc) == "error: data dir nowhere not found"
    bad = shutil.copytree(planned / "digits", tmp_path / "bad")
    (bad / "3" / "3_0004.png").write_bytes(b"broken")
    proc = run_cli("data", "push", str(bad), cwd=planned)
    assert proc.returncode == 2 and "image 3/3_0004.png in" in one_line_error(proc)
    assert _files(planned) == before


@pytest.mark.slow
def test_a_board_that_fails_is_named_and_the_others_still_get_theirs(planned, tmp_path):
    d = shutil.copytree(planned, tmp_path / "c", ignore=shutil.ignore_patterns("a-data", "boards"))
    (d / "blocker").write_text("a file where a folder should be")
    (d / "cluster.yaml").write_text(CLUSTER.format(a_data=d / "blocker" / "data"))
    proc = run_cli("data", "push", "digits", "--wide", cwd=d)
    assert proc.returncode == 1, proc.stderr
    assert "│ a     │ 0    │" in proc.stdout and "failed" in proc.stdout
    assert any(line.startswith("a: ") and "blocker" in line for line in proc.stdout.splitlines())
    assert (d / ".dsparse" / "boards" / "b" / "data" / "digits" / imagefolder.MANIFEST).is_file()


def test_push_without_a_plan_says_so(tmp_path):
    (tmp_path / "cluster.yaml").write_text("name: x\nboards:\n  - {name: a, local: true}\n")
    make_digits_imagefolder(tmp_path / "digits", classes=range(2), per_class=2)
    proc = run_cli("data", "push", "digits", cwd=tmp_path)
    assert proc.returncode == 2 and "run `dsparse plan` first" in one_line_error(proc)


# --- over SSH ------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("sftp", [True, False], ids=["sftp", "exec-channel"])
def test_push_over_ssh(sftp, tmp_path, request):
    from conftest import target_for
    from sshd import SSHDUnavailable, start_sshd

    (tmp_path / "sshd").mkdir()
    try:
        server = request.getfixturevalue("sshd") if sftp else start_sshd(tmp_path / "sshd", sftp=False)
    except SSHDUnavailable as e:
        pytest.skip(str(e))
    if not sftp:
        request.addfinalizer(server.stop)
    root = make_digits_imagefolder(tmp_path / "digits", classes=range(3), per_class=6)
    index = scan(str(root), 0.2)
    target = target_for(server, name=f"ssh-{sftp}", known_hosts=server.known_hosts,
                        data_dir=str(tmp_path / "board-data"))
    prepared = datapush.Prepared(root, index, [], [(target, shard(index, 0, 1), target.data_dir)], 3)
    seen = []
    first = datapush.push(prepared, connect_timeout=10, on_progress=lambda *a: seen.append(a))
    assert first[0].ok, first[0].error
    assert (first[0].value.sent, first[0].value.skipped) == (18, 0)
    assert _files(tmp_path / "board-data") == {p for p, _ in index.train + index.val} | {imagefolder.MANIFEST}
    assert seen[-1][1] == seen[-1][2] == sum(os.path.getsize(root / p) for p, _ in index.train + index.val)
    second = datapush.push(prepared, connect_timeout=10)
    assert (second[0].value.sent, second[0].value.skipped) == (0, 18)
