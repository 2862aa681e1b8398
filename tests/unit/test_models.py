"""Models by spec: torchvision models beyond the hand-split five, user model files (with and
without `dsparse_units`), the torch-free spec checker, the profile's hooks and `dsparse models`."""

from __future__ import annotations

import json
import textwrap

import pytest

from dsparse_cli import modelspec
from dsparse_cli.errors import ConfigError
from dsparse_cli.planning import profile as P

torch = pytest.importorskip("torch")
from dsparse_cli.runtime.models import (ModelError, build_model, list_available, split_units,  # noqa: E402
                                        unit_params)


def _train_step(model) -> None:
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["squeezenet1_1", "mnasnet0_5", "regnet_x_400mf"])
def test_torchvision_models_beyond_the_five_build_split_and_train(name):
    torch.manual_seed(0)
    model = build_model(name, 10)
    units = split_units(model, name)
    assert len(units) >= 5
    covered = [id(p) for u in units for p in unit_params(model, u)]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())   # each parameter exactly once
    _train_step(model)


def test_generic_rule_opens_a_trunk_of_blocks_and_keeps_small_sequentials():
    units = split_units(build_model("squeezenet1_1"), "squeezenet1_1")
    # features: a conv then Fire blocks (opened, parameter-free ReLU/MaxPool skipped); the classifier
    # (Dropout, Conv2d, ReLU, pool: leaves only) stays one unit, the head
    assert [u.name for u in units] == ["features.0", "features.3", "features.4", "features.6", "features.7",
                                       "features.9", "features.10", "features.11", "features.12", "classifier"]
    assert units[-1].modules == ("classifier",)


def test_hand_splits_are_kept():
    units = split_units(build_model("resnet18"), "resnet18")
    assert units[0].modules == ("conv1", "bn1") and units[-1].name == "classifier"


def test_parameters_on_the_root_are_an_error_naming_them():
    class Tokened(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token = torch.nn.Parameter(torch.zeros(3))
            self.fc = torch.nn.Linear(3, 2)

    with pytest.raises(ModelError, match=r"root module \(token\).*dsparse_units"):
        split_units(Tokened(), "x")


def test_unknown_name_is_a_model_error():
    with pytest.raises(ModelError, match="unknown model 'resnet_999'.*dsparse models"):
        build_model("resnet_999")


USER_MODEL = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.body = nn.Conv2d(4, 8, 3)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

        def forward(self, x):
            return self.head(self.body(self.stem(x)))

    def make(num_classes):
        return Net(num_classes)
"""


def _write(tmp_path, text: str, name: str = "my_net.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_user_file_without_dsparse_units_uses_the_generic_rule(tmp_path):
    spec = f"{_write(tmp_path, USER_MODEL)}:make"
    model = build_model(spec, 7)
    assert model.head[2].out_features == 7
    assert [u.name for u in split_units(model, spec)] == ["stem", "body", "head"]
    assert modelspec.parse(spec) == (modelspec.FILE, str(tmp_path / "my_net.py"), "make")   # the file a job ships


def test_user_file_with_dsparse_units_and_a_factory_without_num_classes(tmp_path):
    text = USER_MODEL + """
    def make_fixed():
        return Net()

    def dsparse_units(model):
        return [("trunk", ["stem", "body"]), ("classifier", ["head.2"])]
    """
    spec = f"{_write(tmp_path, text)}:make_fixed"
    model = build_model(spec, 3)   # the factory takes no num_classes: called plainly
    assert model.head[2].out_features == 10
    units = split_units(model, spec)
    assert [(u.name, u.modules) for u in units] == [("trunk", ("stem", "body")), ("classifier", ("head.2",))]
    _train_step(model)


def test_dsparse_units_that_leave_a_parameter_out_fail(tmp_path):
    text = USER_MODEL + """
    def dsparse_units(model):
        return [("trunk", ["stem"]), ("classifier", ["head"])]
    """
    spec = f"{_write(tmp_path, text)}:make"
    with pytest.raises(ModelError, match="outside every unit.*body"):
        split_units(build_model(spec), spec)


def test_a_file_spec_is_found_by_its_base_name_in_search_dirs(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write(run_dir, USER_MODEL)
    spec = "/home/user/elsewhere/my_net.py:make"   # the path on the control machine
    with pytest.raises(ModelError, match="my_net.py not found"):
        build_model(spec)
    assert isinstance(build_model(spec, 10, search_dirs=[str(run_dir)]), torch.nn.Module)


def test_modelspec_parse():
    assert modelspec.parse("resnet18") == ("name", "resnet18", None)
    assert modelspec.parse("nets/a.py:make") == ("file", "nets/a.py", "make")
    assert modelspec.parse("pkg.mod:make") == ("module", "pkg.mod", "make")
    with pytest.raises(ValueError, match="no factory"):
        modelspec.parse("nets/a.py:")


def test_check_names_the_line_of_a_syntax_error(tmp_path):
    path = _write(tmp_path, "import torch\n\ndef make(:\n    pass\n")
    with pytest.raises(ValueError, match=r"my_net.py line 3: "):
        modelspec.check(f"{path}:make")


def test_check_a_factory_the_file_does_not_define(tmp_path):
    path = _write(tmp_path, USER_MODEL)
    modelspec.check(f"{path}:make")   # def
    modelspec.check(f"{path}:Net")    # class
    with pytest.raises(ValueError, match="defines no 'build' at top level"):
        modelspec.check(f"{path}:build")


def test_check_a_missing_file_and_module(tmp_path):
    with pytest.raises(ValueError, match="model file .*nope.py not found"):
        modelspec.check(f"{tmp_path}/nope.py:make")
    with pytest.raises(ValueError, match="module no_such_pkg_x.mod not found"):
        modelspec.check("no_such_pkg_x.mod:make")
    modelspec.check("json.decoder:JSONDecoder")


def test_profile_checks_names_and_files_as_config_errors(tmp_path):
    P.check_model("mnasnet0_5")   # a torchvision name
    with pytest.raises(ConfigError, match="unknown model 'resnet_999'"):
        P.check_model("resnet_999")
    with pytest.raises(ConfigError, match="not found"):
        P.check_args(f"{tmp_path}/nope.py:make", 8, 32, "float32", "sgd")


def test_profile_key_follows_edits_of_the_model_file(tmp_path):
    path = _write(tmp_path, USER_MODEL)
    spec = f"{path}:make"
    key = P.profile_key(spec, 10, 32, 8, "float32", "sgd", torch="2")
    assert P.profile_key(spec, 10, 32, 8, "float32", "sgd", torch="2") == key
    path.write_text(path.read_text() + "\n# edited\n")
    assert P.profile_key(spec, 10, 32, 8, "float32", "sgd", torch="2") != key


def test_modelspec_is_shipped_and_stdlib_only():
    import ast
    import sys
    from pathlib import Path

    from dsparse_cli.jobs.shipping import runtime_files

    assert "dsparse_cli/modelspec.py" in {rel for _, rel in runtime_files()}
    tree = ast.parse(Path(modelspec.__file__).read_text())
    tops = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    tops |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert tops <= set(sys.stdlib_module_names) | {"__future__"}


# the hand-split torchvision four, one generic model and one that cannot be split
FEW = ["mobilenet_v2", "mobilenet_v3_small", "resnet18", "shufflenet_v2_x0_5", "squeezenet1_1", "vit_b_16"]


def test_list_available_on_the_meta_device(monkeypatch):
    from dsparse_cli.runtime import models

    monkeypatch.setattr(models, "torchvision_names", lambda: FEW)
    rows = {r["name"]: r for r in list_available()}
    assert rows["mobilenet_v2"]["source"] == "hand split" and rows["mobilenet_v2"]["units"] == 20
    assert rows["squeezenet1_1"] == {"name": "squeezenet1_1", "source": "generic", "parameters": 727626,
                                     "units": 10, "error": None}
    assert rows["vit_b_16"]["units"] is None and "class_token" in rows["vit_b_16"]["error"]
    assert not [r for r in rows.values() if r["error"] and r["name"] != "vit_b_16"]


def test_dsparse_models_command(monkeypatch):
    from typer.testing import CliRunner

    from dsparse_cli.cli import models as command  # noqa: F401  (registers the command)
    from dsparse_cli.cli.app import app, options
    from dsparse_cli.runtime import models

    monkeypatch.setattr(models, "torchvision_names", lambda: FEW)
    monkeypatch.setattr(options, "json", False)
    monkeypatch.setenv("COLUMNS", "120")
    table = CliRunner().invoke(app, ["models"])
    assert table.exit_code == 0, table.output
    lines = {line.split()[1]: line for line in table.output.splitlines() if line.startswith("│")}
    assert "hand split" in lines["mobilenet_v2"] and "20" in lines["mobilenet_v2"]
    assert "727.6 k" in lines["squeezenet1_1"] and " 10 " in lines["squeezenet1_1"]
    assert "vit_b_16: parameters on its root module (class_token)" in table.output
    doc = json.loads(CliRunner().invoke(app, ["models", "--json"]).output)
    units = {r["name"]: r["units"] for r in doc["models"]}
    assert units == {"mobilenet_v2": 20, "mobilenet_v3_small": 14, "resnet18": 10, "shufflenet_v2_x0_5": 19,
                     "tiny_cnn": 4, "squeezenet1_1": 10, "vit_b_16": None}


def test_torchvision_names_read_from_source_are_what_torchvision_lists():
    import torchvision

    from dsparse_cli import modelspec

    assert modelspec.torchvision_names() == set(torchvision.models.list_models(module=torchvision.models))
