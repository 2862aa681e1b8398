"""A user's own job through the real entry point (issue #12): an image folder, a model of their
own or any torchvision one, weights from an earlier run, and the trained model back and exported.

The images are scikit-learn's digits written as PNG files (tests/helpers.py); the "related task"
a fine-tune starts from is digits 0-4, learned by an earlier job with a 5-class head.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from helpers import make_digits_imagefolder, one_line_error, run_cli

pytestmark = pytest.mark.slow

CLUSTER = """name: {name}
master: {{addr: 127.0.0.1, port: {port}}}
boards:
{boards}"""
TWO = "  - {name: a, local: true, memory_limit: 1900MiB}\n  - {name: b, local: true, memory_limit: 1800MiB}\n"
ONE = "  - {name: a, local: true, memory_limit: 4GiB}\n"
TINY = ("--model", "tiny_cnn", "--batch-size", "16", "--image-size", "16")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_dir(path: Path, boards: str = TWO) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cluster.yaml").write_text(CLUSTER.format(name=path.name, port=free_port(), boards=boards))
    return path


def plan(d: Path, *args: str) -> dict:
    proc = run_cli("plan", *args, "--json", cwd=d)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def train(d: Path, *args: str) -> dict:
    proc = run_cli("train", *args, "--json", cwd=d, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    return {"all": make_digits_imagefolder(root / "digits"),
            "low": make_digits_imagefolder(root / "digits04", classes=range(5))}


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    """Two local boards and a tiny_cnn plan for 10 classes (measured once)."""
    d = cluster_dir(tmp_path_factory.mktemp("ws") / "two")
    plan(d, *TINY)
    return d


def fresh(planned: Path, tmp_path: Path) -> Path:
    d = tmp_path / "c"
    shutil.copytree(planned, d)
    return cluster_dir(d)


@pytest.fixture(scope="module")
def trained(planned, images, tmp_path_factory) -> tuple[Path, dict]:
    d = fresh(planned, tmp_path_factory.mktemp("trained"))
    return d, train(d, "--dataset", "imagefolder", "--data-dir", str(images["all"]), "--epochs", "3", "--lr", "0.1")


def test_imagefolder_trains_on_two_boards_well_above_chance(trained):
    _, summary = trained
    assert summary["state"] == "finished" and len(summary["boards"]) == 2
    assert summary["accuracy"] > 0.3, summary["accuracy"]     # chance is 0.1


def test_the_model_comes_back_and_its_torchscript_predicts_the_same(trained, images):
    import torch
    from PIL import Image
    from torchvision import transforms

    from dsparse_cli.runtime.model_out import load_model

    d, summary = trained
    model_pt = Path(summary["model"])
    assert model_pt == d / ".dsparse" / "jobs" / summary["job"] / "model.pt"
    meta = json.loads(model_pt.with_name("model.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)] and meta["image_size"] == 16
    assert meta["job"] == summary["job"] and meta["accuracy"] == pytest.approx(summary["accuracy"])

    proc = run_cli("export", summary["job"], "--format", "torchscript", cwd=d)
    assert proc.returncode == 0, proc.stderr
    scripted = torch.jit.load(str(model_pt.with_name("model.ts")))
    model, _ = load_model(str(model_pt))
    # What the README tells a user to do with one image, for a batch of the held-out ones.
    tf = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor(),
                             transforms.Normalize(meta["normalize"]["mean"], meta["normalize"]["std"])])
    files = sorted(images["all"].glob("*/*.png"))[::40]
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        assert torch.equal(scripted(x).argmax(1), model(x).argmax(1))
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
    right = sum(meta["classes"][int(p)] == f.parent.name for p, f in zip(model(x).argmax(1), files))
    assert right / len(files) > 0.5

    proc = run_cli("export", summary["job"], "--format", "state_dict", "--out", str(d / "sd.pt"), cwd=d)
    assert proc.returncode == 0, proc.stderr
    assert set(torch.load(d / "sd.pt", weights_only=True)) == set(model.state_dict())
    assert json.loads((d / "sd.json").read_text())["classes"] == meta["classes"]


def test_finetuning_from_an_earlier_run_beats_random_weights(planned, images, tmp_path):
    # The earlier run: digits 0-4 under a 5-class plan of its own.
    low = cluster_dir(tmp_path / "low")
    plan(low, *TINY, "--num-classes", "5")
    earlier = train(low, "--dataset", "imagefolder", "--data-dir", str(images["low"]), "--epochs", "3", "--lr", "0.1")
    # One epoch of the full task, from those weights (the 5-class head re-initialised) and from scratch.
    d = fresh(planned, tmp_path)
    common = ("--dataset", "imagefolder", "--data-dir", str(images["all"]), "--epochs", "1", "--lr", "0.05")
    scratch = train(d, *common)
    tuned = train(d, *common, "--weights", earlier["model"])
    assert tuned["accuracy"] > scratch["accuracy"] + 0.1, (tuned["accuracy"], scratch["accuracy"])
    log = next((d / ".dsparse" / "boards" / "a" / "runs" / tuned["job"]).glob("worker.log*")).read_text()
    assert "re-initialised" in log


USER_MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.body(x), 1))


def make(num_classes=10):
    return Net(num_classes)
"""


@pytest.mark.parametrize("units", [None, "def dsparse_units(model):\n    return [('conv', ['body.0']), ('fc', ['head'])]\n"])
def test_a_user_model_file_plans_and_trains(tmp_path, units):
    d = cluster_dir(tmp_path / "own", ONE)
    (d / "mynet.py").write_text(USER_MODEL + (units or ""))
    doc = plan(d, "--model", "mynet.py:make", "--batch-size", "8", "--image-size", "16")
    assert [u["name"] for u in doc["units"]] == (["conv", "fc"] if units else ["body", "head"])
    summary = train(d, "--dataset", "synthetic", "--max-steps", "2")
    assert summary["state"] == "finished" and summary["boards"][0]["global_step"] == 2


@pytest.mark.parametrize("model", ["squeezenet1_1", "mnasnet0_5", "regnet_x_400mf"])
def test_torchvision_models_beyond_the_hand_split_five_plan_and_train(tmp_path, model):
    d = cluster_dir(tmp_path / model, ONE)
    doc = plan(d, "--model", model, "--batch-size", "4", "--image-size", "32")
    assert len(doc["units"]) >= 3
    if model != "regnet_x_400mf":
        return   # planned (its profile ran forward and backward unit by unit); one of them trains too
    summary = train(d, "--dataset", "synthetic", "--max-steps", "1")
    assert summary["state"] == "finished" and summary["boards"][0]["global_step"] == 1


# --- bad input: one line, exit 2, nothing overwritten ------------------------------------------------
def _unchanged(d: Path, proc, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert needle in one_line_error(proc)


def _jobs(d: Path) -> list[str]:
    return sorted(p.name for p in (d / ".dsparse" / "jobs").glob("*.json")) if (d / ".dsparse" / "jobs").is_dir() else []


def test_bad_image_folders_are_refused_before_anything_starts(planned, images, tmp_path):
    d = fresh(planned, tmp_path)
    before = _jobs(d)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next(images["all"].glob("0/*.png")), flat / "one.png")
    broken = tmp_path / "broken"
    shutil.copytree(images["low"], broken)
    (broken / "3" / "bad.png").write_bytes(b"\x89PNG not really")
    cases = [(tmp_path / "absent", "not found"), (flat, "no class subfolders"), (broken, "bad.png")]
    for folder, needle in cases:
        proc = run_cli("train", "--dataset", "imagefolder", "--data-dir", str(folder), cwd=d)
        _unchanged(d, proc, needle)
    assert _jobs(d) == before
    # --skip-bad-images trains on the rest and says how many it left out.
    summary = train(d, "--dataset", "imagefolder", "--data-dir", str(broken), "--skip-bad-images", "--max-steps", "2")
    logs = [p.read_text() for p in (d / ".dsparse" / "boards").glob(f"*/runs/{summary['job']}/worker.log")]
    assert len(logs) == 2 and sum("skipped 1 image" in text for text in logs) == 1   # the shard that had it


def test_bad_models_and_weights_are_refused(planned, tmp_path):
    import torch
    from torch import nn

    d = fresh(planned, tmp_path)
    plan_file = d / ".dsparse" / "plan.json"
    before = plan_file.read_bytes()
    (d / "broken.py").write_text("import torch\ndef make(:\n    pass\n")
    (d / "fine.py").write_text(USER_MODEL)
    other = tmp_path / "other.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2)).state_dict(), other)
    cases = [
        (("plan", "--model", "broken.py:make", *TINY[2:]), "line 2"),
        (("plan", "--model", "fine.py:build", *TINY[2:]), "build"),
        (("train", "--weights", str(other)), "other.pt: weights do not fit tiny_cnn: features.0.0.weight is missing"),
        (("train", "--weights", "DEFAULT"), "no torchvision weights"),
        (("train", "--weights", str(tmp_path / "absent.pt")), "not found"),
    ]
    for args, needle in cases:
        _unchanged(d, run_cli(*args, cwd=d), needle)
    assert plan_file.read_bytes() == before and _jobs(d) == []


@pytest.mark.parametrize("size,batch", [(128, 4), (224, 2)])
def test_bigger_inputs_where_activations_decide_what_fits(tmp_path, size, batch):
    """At 128x128 and 224x224 the profiler, the planner and the runtime work here, and a board with
    60 % of a full update's training memory gets a smaller plan (activations, not the base, decide).
    224 at batch 2: the profile's steps are most of this test's time."""
    d = cluster_dir(tmp_path / f"big{size}", "  - {name: a, local: true, training_memory: 4GiB}\n"
                                              "  - {name: b, local: true, training_memory: 4GiB}\n")
    args = ("--model", "mobilenet_v2", "--batch-size", str(batch), "--image-size", str(size))
    full = plan(d, *args)["devices"][0]["full_update_training_bytes"]
    (d / "cluster.yaml").write_text((d / "cluster.yaml").read_text().replace(
        "name: b, local: true, training_memory: 4GiB", f"name: b, local: true, training_memory: {int(full * 0.6)}B"))
    a, b = plan(d, *args)["devices"]
    assert len(a["units"]) == 20 and 0 < len(b["units"]) < 20
    assert b["predicted_training_bytes"] <= 0.6 * full < a["predicted_training_bytes"]
    if size == 224:
        return   # the 224 run trains too (checked by hand, 56 s here); the suite keeps its time budget
    summary = train(d, "--dataset", "synthetic", "--max-steps", "2", "--batch-size", str(batch))
    assert summary["state"] == "finished" and all(x["global_step"] == 2 for x in summary["boards"])
