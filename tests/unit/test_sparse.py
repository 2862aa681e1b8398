"""Train/eval modes of a sparse plan (dsparse_cli/runtime/sparse.py: set_train_mode)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsparse_cli.runtime.models import build_model, split_units
from dsparse_cli.runtime.sparse import set_train_mode


def _bn(model, i):
    return model.features[i][1]


def test_three_kinds_of_unit():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10)
    units = split_units(model, "tiny_cnn")
    set_train_mode(model, units, updated=[2, 3], trained_elsewhere=[1])
    nobody, elsewhere, here = _bn(model, 0), _bn(model, 1), _bn(model, 2)
    assert not nobody.training and nobody.momentum == 0.1           # frozen statistics
    assert elsewhere.training and elsewhere.momentum == 0.0         # batch statistics, stats kept
    assert here.training and here.momentum == 0.1

    before = elsewhere.running_mean.clone(), elsewhere.running_var.clone()
    x = torch.randn(16, 3, 32, 32)
    h = model.features[0](x)
    conv = model.features[1][0](h)
    out = elsewhere(conv)
    assert torch.equal(elsewhere.running_mean, before[0]) and torch.equal(elsewhere.running_var, before[1])
    expected = F.batch_norm(conv, None, None, elsewhere.weight, elsewhere.bias, training=True)
    assert torch.allclose(out, expected, atol=1e-6)                 # normalised as its trainer does


def test_momentum_is_restored_when_the_unit_trains_here_again():
    model = build_model("tiny_cnn", 10)
    units = split_units(model, "tiny_cnn")
    set_train_mode(model, units, updated=[3], trained_elsewhere=[0, 1, 2])
    assert all(_bn(model, i).momentum == 0.0 for i in range(3))
    set_train_mode(model, units, updated=[0, 1, 2, 3])
    assert all(_bn(model, i).momentum == 0.1 and _bn(model, i).training for i in range(3))
    set_train_mode(model, units, updated=[])
    assert not any(_bn(model, i).training for i in range(3)) and not model.classifier.training
