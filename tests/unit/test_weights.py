"""Pretrained weights: files in every form dsparse writes, a resized head, a wrong architecture,
torchvision names from torch hub's cache, and a board that has no cached copy. Nothing here
downloads: TORCH_HOME is a tmp dir and every download goes to a dead proxy on loopback."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from dsparse_cli.runtime.models import build_model, split_units  # noqa: E402
from dsparse_cli.runtime.weights import WeightsError, cache_path, check_weights_name, load_weights  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _model(spec: str, classes: int, seed: int):
    torch.manual_seed(seed)
    model = build_model(spec, classes)
    return model, split_units(model, spec)


def _equal(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_a_state_dict_with_another_head_loads_the_trunk_and_keeps_the_new_head(tmp_path):
    source, _ = _model("tiny_cnn", 5, seed=1)
    torch.save(source.state_dict(), tmp_path / "five.pt")
    model, units = _model("tiny_cnn", 10, seed=2)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    what = load_weights(model, units, str(tmp_path / "five.pt"), spec="tiny_cnn")
    assert what == "weights file five.pt (head re-initialised for 10 classes)"
    got, src = model.state_dict(), source.state_dict()
    trunk = [k for k in got if not k.startswith("classifier.")]
    assert trunk and _equal(got, src, trunk)
    assert _equal(got, fresh, ["classifier.weight", "classifier.bias"])


@pytest.mark.parametrize("wrap", [lambda sd: {"format": 1, "model": sd, "epoch": 3},
                                  lambda sd: {"format": "dsparse-model", "state_dict": sd, "meta": {"model": "x"}}],
                         ids=["checkpoint", "model-file"])
def test_a_dsparse_checkpoint_or_model_file_loads_whole(tmp_path, wrap):
    source, _ = _model("tiny_cnn", 10, seed=1)
    torch.save(wrap(source.state_dict()), tmp_path / "ckpt.pt")
    model, units = _model("tiny_cnn", 10, seed=2)
    assert load_weights(model, units, str(tmp_path / "ckpt.pt"), spec="tiny_cnn") == "weights file ckpt.pt"
    assert _equal(model.state_dict(), source.state_dict(), source.state_dict())


def test_a_weights_file_is_found_by_base_name_in_search_dirs(tmp_path):
    (tmp_path / "run").mkdir()
    source, _ = _model("tiny_cnn", 10, seed=1)
    torch.save(source.state_dict(), tmp_path / "run" / "w.pt")
    model, units = _model("tiny_cnn", 10, seed=2)
    load_weights(model, units, "/control/side/w.pt", spec="tiny_cnn", search_dirs=[str(tmp_path / "run")])
    assert _equal(model.state_dict(), source.state_dict(), source.state_dict())
    with pytest.raises(WeightsError, match="weights file /control/side/w.pt not found"):
        load_weights(model, units, "/control/side/w.pt", spec="tiny_cnn")


def test_weights_of_another_model_fail_naming_the_first_key(tmp_path):
    other, _ = _model("squeezenet1_1", 10, seed=1)
    torch.save(other.state_dict(), tmp_path / "squeeze.pt")
    model, units = _model("tiny_cnn", 10, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match=r"do not fit tiny_cnn: features\.0\.0\.weight is missing \(the model's is \[8, 3, 3, 3\]\)"):
        load_weights(model, units, str(tmp_path / "squeeze.pt"), spec="tiny_cnn")
    assert _equal(model.state_dict(), before, before)   # nothing half-loaded


def test_a_trunk_shape_mismatch_names_both_shapes(tmp_path):
    state = _model("tiny_cnn", 10, seed=1)[0].state_dict()
    state["features.1.0.weight"] = torch.zeros(16, 8, 5, 5)
    torch.save(state, tmp_path / "bad.pt")
    model, units = _model("tiny_cnn", 10, seed=2)
    with pytest.raises(WeightsError, match=r"features\.1\.0\.weight is \[16, 8, 5, 5\] in the weights, \[16, 8, 3, 3\] in the model"):
        load_weights(model, units, str(tmp_path / "bad.pt"), spec="tiny_cnn")


def test_a_torchvision_name_loads_from_torch_hubs_cache():
    import torchvision

    weights = torchvision.models.get_model_weights("squeezenet1_1")["DEFAULT"]
    path = cache_path(weights)
    assert path.startswith(torch.hub.get_dir())
    imagenet, _ = _model("squeezenet1_1", 1000, seed=1)   # stands in for the real file
    import os

    os.makedirs(os.path.dirname(path))
    torch.save(imagenet.state_dict(), path)
    model, units = _model("squeezenet1_1", 10, seed=2)
    assert load_weights(model, units, "DEFAULT", spec="squeezenet1_1") == \
        "weights IMAGENET1K_V1 (head re-initialised for 10 classes)"
    assert _equal(model.state_dict(), imagenet.state_dict(), ["features.0.weight", "features.12.expand3x3.bias"])


def test_googlenet_weights_with_auxiliary_heads_load_into_the_plain_model():
    import os

    import torchvision

    weights = torchvision.models.get_model_weights("googlenet")["IMAGENET1K_V1"]
    os.makedirs(os.path.dirname(cache_path(weights)))
    torch.manual_seed(1)
    full = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, num_classes=1000)
    torch.save(full.state_dict(), cache_path(weights))
    model, units = _model("googlenet", 10, seed=2)
    assert "head re-initialised" in load_weights(model, units, "IMAGENET1K_V1", spec="googlenet")
    assert torch.equal(model.conv1.conv.weight, full.conv1.conv.weight)


def test_no_cached_copy_and_no_download_says_where_to_put_it():
    import torchvision

    weights = torchvision.models.get_model_weights("squeezenet1_1")["IMAGENET1K_V1"]
    model, units = _model("squeezenet1_1", 10, seed=2)
    with pytest.raises(WeightsError) as err:
        load_weights(model, units, "IMAGENET1K_V1", spec="squeezenet1_1")
    message = str(err.value)
    assert message.startswith(f"no cached copy of squeezenet1_1 weights IMAGENET1K_V1 at {cache_path(weights)}")
    assert "downloading" in message and "copy that file there" in message and "\n" not in message


def test_check_weights_name():
    with pytest.raises(WeightsError, match="^model tiny_cnn has no torchvision weights; pass a weights file$"):
        check_weights_name("tiny_cnn", "DEFAULT")
    with pytest.raises(WeightsError, match="no torchvision weights"):
        check_weights_name("nets/my.py:make", "DEFAULT")
    with pytest.raises(WeightsError, match="has no weights 'IMAGENET9'; choose one of IMAGENET1K_V1, DEFAULT"):
        check_weights_name("squeezenet1_1", "IMAGENET9")
    check_weights_name("mobilenet_v2", "IMAGENET1K_V2")   # a hand-split model has torchvision's weights
    check_weights_name("resnet18", "default")
