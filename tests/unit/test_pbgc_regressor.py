"""The PBGC quantile regressor tracks a drifting distribution; pbgc uses it once warm."""

import math
import pytest
import torch

from dsparse_cli.runtime.compress import make_compressor
from dsparse_cli.runtime.compress.pbgc import entropy, interp
from dsparse_cli.runtime.compress.regressor import QuantileRegressor

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors on a shared 2-core box: more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LEVELS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]


def exact_log_quantiles(a: torch.Tensor) -> torch.Tensor:
    s = a.abs().log().sort(descending=True).values
    return torch.stack([s[math.ceil(p * s.numel()) - 1] for p in LEVELS])


def synthetic_stream(steps=100, n=20000):
    """Gradients whose scale oscillates and whose tails grow heavier over time."""
    gen = torch.Generator().manual_seed(0)
    for t in range(steps):
        sigma = 0.3 + 1.2 * t / steps  # log-normal spread: heavier tails as t grows
        scale = math.exp(math.sin(t / 8))
        yield t, scale * torch.randn(n, generator=gen) * torch.exp(
            sigma * torch.randn(n, generator=gen))


def test_predicted_quantiles_track_the_measured_ones():
    reg = QuantileRegressor(len(LEVELS))
    errs, const_errs, last_errs, top_pred, top_meas = [], [], [], [], []
    first_shape = last_shape = None
    for t, a in synthetic_stream():
        s = math.log(float(a.abs().mean()))
        q = exact_log_quantiles(a)
        pred = reg.predict(s, t)
        err = reg.observe(q, s, t)
        if pred is None:
            first_shape = last_shape = q - s
            continue
        assert err == float((pred - q).abs().mean())  # the reported error is the real one
        if t >= 20:
            errs.append(err)
            const_errs.append(float((s + first_shape - q).abs().mean()))
            last_errs.append(float((s + last_shape - q).abs().mean()))
            top_pred.append(float(pred[0]))
            top_meas.append(float(q[0]))
        last_shape = q - s
    mae = sum(errs) / len(errs)
    const = sum(const_errs) / len(const_errs)
    last = sum(last_errs) / len(last_errs)
    assert mae < 0.1, mae  # about 10% in magnitude
    assert mae < 0.25 * const, (mae, const)  # it follows the drift a frozen shape misses
    assert mae <= last, (mae, last)  # and learns more than "same shape as last time"
    corr = torch.corrcoef(torch.tensor([top_pred, top_meas]))[0, 1]
    assert corr > 0.98
    assert reg.mae is not None and reg.fitted == 99
    assert reg.warm(20, 0.5) and not reg.warm(200, 0.5) and not reg.warm(20, 1e-6)


def test_pbgc_hands_over_to_the_regressor_and_reports_its_error():
    c = make_compressor({"name": "pbgc", "warmup_steps": 10, "refit_every": 4})
    kept = []
    for _, a in synthetic_stream(steps=60):
        payload, _ = c.compress(a, "b")
        kept.append(payload.nbytes)
    rep = c.report()
    # sampled quantiles for the first 10 measurements + the first step, predictions after
    assert rep["pbgc_predicted_share"] == (60 - 11) / 60
    assert 0 < rep["pbgc_predictor_mae_log"] < 0.3
    # the thresholds it sets hit the key fraction it was asked for, within a factor of 2
    assert 0.5 < rep["pbgc_key_fraction_observed"] / rep["pbgc_key_fraction_target"] < 2
    assert 0 < rep["pbgc_entropy"] <= 1


def test_pbgc_falls_back_to_samples_when_the_regressor_is_poor():
    c = make_compressor({"name": "pbgc", "warmup_steps": 2, "max_log_error": 1e-9})
    for _, a in synthetic_stream(steps=20, n=5000):
        c.compress(a, "b")
    assert c.report()["pbgc_predicted_share"] == 0.0


def test_entropy_and_interpolation():
    assert entropy(torch.full((100,), 3.0), 16) == 0.0  # all equal: concentrated
    assert entropy(torch.linspace(0, 1, 1600), 16) > 0.99  # uniform: spread out
    spiky = torch.cat([torch.zeros(990), torch.linspace(0, 1, 10)])
    assert 0 < entropy(spiky, 16) < 0.2
    logp = [math.log(0.001), math.log(0.01), math.log(0.1)]
    q = [0.0, -1.0, -3.0]
    assert interp(logp, q, 0.01) == -1.0
    assert interp(logp, q, math.sqrt(0.001 * 0.01)) == pytest.approx(-0.5)  # linear in log p
    assert interp(logp, q, 1e-9) == 0.0 and interp(logp, q, 0.9) == -3.0  # clamped


def test_pbgc_trains_its_regressor_under_no_grad():
    c = make_compressor({"name": "pbgc", "warmup_steps": 1})
    with torch.no_grad():  # as the aggregator calls it
        for _, a in synthetic_stream(steps=6, n=5000):
            c.compress(a, "b")
    assert c.report()["pbgc_predicted_share"] > 0
