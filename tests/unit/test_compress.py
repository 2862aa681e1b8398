"""Compressors without torch.distributed: specs, round trips, exact bytes, error feedback."""

import io
import math

import pytest
import torch
from torch import nn

from dsparse_cli.runtime.compress import StatsSnapshot, make_compressor
from dsparse_cli.runtime.compress import codec
from dsparse_cli.runtime.compress.base import CompressStats

NO_MOMENTUM = [{"name": "none"}, {"name": "fp16"}, {"name": "topk", "momentum": 0},
               {"name": "pbgc", "momentum": 0}]
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors on a shared 2-core box: more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SPARSE = [{"name": "topk", "momentum": 0, "warmup_steps": 0}, {"name": "pbgc", "momentum": 0}]
# denser settings, so error feedback reaches its steady state within a short test
DENSER = [{"name": "fp16"}, {"name": "topk", "momentum": 0, "density": 0.1},
          {"name": "pbgc", "momentum": 0, "key_fraction": 0.02, "sparse_fraction": 0.1}]


def ids(spec):
    return spec["name"]


def step(c, g, key="b"):
    """-> (a the compressor saw, decompressed payload, residual, payload); momentum must be 0."""
    e = c.residual(key)
    a = g.float() + (e if e is not None else 0)
    payload, r = c.compress(g, key)
    return a, c.decompress(payload), r, payload


# --- specs -------------------------------------------------------------------------------------

def test_make_compressor_names_and_exchange_kind():
    for name, dense in [("none", True), ("fp16", True), ("topk", False), ("pbgc", False)]:
        c = make_compressor({"name": name})
        assert c.name == name and c.dense is dense
    assert make_compressor(None).name == "none"
    # DGC momentum correction: the optimizer must then run without momentum
    assert make_compressor({"name": "topk"}).momentum == 0.9
    assert make_compressor({"name": "pbgc", "momentum": 0}).momentum == 0.0
    assert make_compressor({"name": "none"}).momentum == 0.0
    # None means "default", so the CLI can pass unset flags through
    assert make_compressor({"name": "topk", "density": None}).opts["density"] == 0.01


@pytest.mark.parametrize("spec,words", [
    ({"name": "zip"}, ["unknown compression", "zip", "pbgc"]),
    ({"density": 0.1}, ["name"]),
    ("topk", ["name"]),
    ({"name": "topk", "densty": 0.1}, ["unknown option", "densty", "density"]),
    ({"name": "topk", "density": 0}, ["density", "(0, 1]"]),
    ({"name": "topk", "density": 1.5}, ["density"]),
    ({"name": "topk", "density": "0.1"}, ["density"]),
    ({"name": "topk", "momentum": 1.0}, ["momentum"]),
    ({"name": "topk", "warmup_steps": 2.5}, ["warmup_steps", "integer"]),
    ({"name": "pbgc", "entropy_bins": True}, ["entropy_bins"]),
    ({"name": "pbgc", "entropy_bins": 1}, ["entropy_bins"]),
    ({"name": "pbgc", "key_fraction": 0.6}, ["key_fraction"]),
    ({"name": "pbgc", "key_fraction": 0.5, "sparse_fraction": 0.6}, ["sparse_fraction"]),
    ({"name": "fp16", "density": 0.1}, ["unknown option", "density"]),
])
def test_bad_specs_raise_one_line_value_error(spec, words):
    with pytest.raises(ValueError) as e:
        make_compressor(spec)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


# --- wire format -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100])
def test_bits_round_trip(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = codec.pack_bits(mask)
    assert packed.numel() == math.ceil(n / 8)
    assert torch.equal(codec.unpack_bits(packed, n), mask)


@pytest.mark.parametrize("positions,numel,code,nbytes", [
    ([5, 10**8], 2 * 10**8, codec.IDX_INT32, 8),  # huge gaps: 1526 skip codes cost more
    ([3, 70000, 200000], 300000, codec.IDX_GAP16, 10),  # two gaps need one skip code each
    ([0, 65535, 65535 * 3, 65535 * 3 + 1], 10**6, codec.IDX_GAP16, 14),  # gaps of 0, 1, 2, 0+1
    ([0, 5, 65535 + 5, 65536 + 10], 10**6, codec.IDX_GAP16, 10),
    (list(range(0, 1000, 3)), 1000, codec.IDX_BITMAP, 125),  # dense: the bitmap is smaller
    ([], 50, codec.IDX_INT32, 0),
])
def test_index_codec_picks_smallest_and_round_trips(positions, numel, code, nbytes):
    idx = torch.tensor(positions, dtype=torch.long)
    got_code, b = codec.encode_indices(idx, numel)
    assert (got_code, b.numel()) == (code, nbytes)
    assert torch.equal(codec.decode_indices(got_code, b, numel), idx)


@pytest.mark.parametrize("density", [1e-5, 1e-3, 0.05, 0.5])
def test_index_codec_round_trips_random_sets(density):
    numel = 300000
    gen = torch.Generator().manual_seed(int(density * 1e5))
    idx = (torch.rand(numel, generator=gen) < density).nonzero().reshape(-1)
    code, b = codec.encode_indices(idx, numel)
    assert b.numel() <= min(4 * idx.numel(), (numel + 7) // 8)
    assert torch.equal(codec.decode_indices(code, b, numel), idx)


def test_pack_unpack_keeps_fields_and_counts_every_byte():
    fields = [torch.tensor([1.5, -2.0]), torch.tensor([7], dtype=torch.int32),
              torch.empty(0), torch.tensor([1, 2, 3], dtype=torch.uint8)]
    buf = codec.pack([4, 5], fields, torch.device("cpu"))
    assert buf.dtype == torch.uint8
    assert buf.numel() == 4 * (2 + 2 + 4) + 8 + 4 + 0 + 3
    meta, out = codec.unpack(buf)
    assert meta == [4, 5]
    assert torch.equal(codec.from_bytes(out[0], torch.float32), fields[0])
    assert torch.equal(codec.from_bytes(out[1], torch.int32), fields[1])
    assert out[2].numel() == 0 and torch.equal(out[3], fields[3])
    with pytest.raises(ValueError, match="corrupt"):
        codec.unpack(torch.cat([buf, buf[:1]]))


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", NO_MOMENTUM, ids=ids)
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 50000])
def test_round_trip_sent_plus_residual_is_input(spec, n):
    c = make_compressor(spec)
    gen = torch.Generator().manual_seed(n)
    for _ in range(4):
        g = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4
        a, sent, r, payload = step(c, g)
        assert sent.shape == a.shape and r.shape == a.shape
        if spec["name"] == "pbgc":  # a - sign*scale, added back, may round in the last bit
            tol = 1e-6 * float(a.abs().max()) if n else 0.0
            assert torch.allclose(sent + r, a, rtol=0, atol=tol)
        else:
            assert torch.equal(sent + r, a)
        if spec["name"] in ("topk", "pbgc") and n >= 1000:
            assert payload.nbytes < 4 * n / 2  # actually compressed (topk still warming up)
            assert r.abs().sum() > 0  # and something was held back


def test_fp16_clamps_instead_of_overflowing():
    c = make_compressor({"name": "fp16"})
    g = torch.tensor([1e6, -1e6, 1.0])
    a, sent, r, _ = step(c, g)
    assert torch.isfinite(sent).all() and sent[0] == 65504.0
    assert torch.equal(sent + r, a)


def test_topk_matches_a_reference_dgc_with_momentum_masking():
    m, d, n = 0.9, 0.05, 400  # n < min_sample: the threshold is exact, so selection is too
    c = make_compressor({"name": "topk", "momentum": m, "density": d, "warmup_steps": 0})
    u = torch.zeros(n)
    v = torch.zeros(n)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        g = torch.randn(n, generator=gen)
        u = m * u + g
        v = v + u
        k = math.ceil(d * n)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[v.abs().topk(k).indices] = True
        expected = torch.where(mask, v, torch.zeros(n))
        v[mask] = 0
        u[mask] = 0
        payload, r = c.compress(g, "b")
        assert torch.allclose(c.decompress(payload), expected, atol=1e-5)
        assert torch.allclose(r, v, atol=1e-5)


def test_topk_density_warms_up_exponentially():
    c = make_compressor({"name": "topk", "density": 0.01, "warmup_steps": 4,
                         "warmup_density": 0.25})
    ds = [c.density_at(s) for s in range(6)]
    assert ds[0] == pytest.approx(0.25) and ds[4] == ds[5] == 0.01
    assert all(x > y for x, y in zip(ds[:4], ds[1:5]))
    assert ds[2] == pytest.approx(math.sqrt(0.25 * 0.01))


def test_pbgc_payload_bytes_are_exact():
    c = make_compressor({"name": "pbgc"})
    n = 100000
    g = torch.randn(n, generator=torch.Generator().manual_seed(3))
    payload, _ = c.compress(g, "b")
    (code_k, code_s, n_k, n_s), fields = codec.unpack(payload.data)
    assert n_k > 0 and n_s > 0
    ib_k, ib_s = fields[1].numel(), fields[4].numel()
    assert code_k == code_s == codec.IDX_GAP16  # gaps are small at these densities
    assert ib_k >= 2 * n_k and ib_s >= 2 * n_s
    assert payload.nbytes == (4 * (2 + 4 + 5) + 4 * n_k + ib_k
                              + 4 + math.ceil(n_s / 8) + ib_s)
    assert [f.numel() for f in fields[:4:2]] == [4 * n_k, 4]
    assert fields[3].numel() == math.ceil(n_s / 8)  # one sign bit per sparse value
    assert 4 * n / payload.nbytes > 37.1


# --- error feedback ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", DENSER, ids=ids)
def test_error_feedback_sum_of_sent_converges_to_sum_of_gradients(spec):
    c = make_compressor(spec)
    gen = torch.Generator().manual_seed(7)
    n = 5000
    mu = torch.randn(n, generator=gen) * 0.3
    sum_g = torch.zeros(n)
    sum_sent = torch.zeros(n)
    gaps = []
    for _ in range(100):
        g = mu + torch.randn(n, generator=gen)
        _, sent, r, _ = step(c, g)
        sum_g += g
        sum_sent += sent
        # nothing is lost: what was sent plus what is held back is everything
        assert torch.allclose(sum_sent + r, sum_g, atol=1e-3)
        gaps.append(float((sum_sent - sum_g).norm() / sum_g.norm()))
    assert gaps[-1] < 0.5 * gaps[9]
    if spec["name"] == "fp16":
        assert gaps[-1] < 1e-3


@pytest.mark.parametrize("spec", SPARSE, ids=ids)
def test_residual_stays_bounded(spec):
    c = make_compressor(spec)
    gen = torch.Generator().manual_seed(8)
    norms = []
    for _ in range(80):
        _, _, r, _ = step(c, torch.randn(5000, generator=gen))
        norms.append(float(r.norm()))
    # grows while it fills, then levels off instead of growing like sqrt(steps) or worse
    assert max(norms[60:]) < 1.3 * max(norms[30:50])


# --- degenerate buckets ------------------------------------------------------------------------

@pytest.mark.parametrize("spec", NO_MOMENTUM + [{"name": "topk"}, {"name": "pbgc"}], ids=ids)
def test_all_zero_and_empty_buckets(spec):
    c = make_compressor(spec)
    for n in (0, 1, 1000):
        for _ in range(3):
            payload, r = c.compress(torch.zeros(n), f"z{n}")
            sent = c.decompress(payload)
            assert sent.shape == (n,) and not sent.any() and not r.any()
            if not c.dense:
                assert payload.nbytes <= 64  # a header, no values


@pytest.mark.parametrize("spec", SPARSE, ids=ids)
def test_all_equal_bucket_is_capped_and_round_trips(spec):
    c = make_compressor(spec)
    n = 10000
    for _ in range(3):
        a, sent, r, payload = step(c, torch.full((n,), 0.5))
        assert torch.allclose(sent + r, a, rtol=0, atol=1e-6)
        # every element ties at the threshold: the exact top-k cap bounds what is sent
        assert int((sent != 0).sum()) <= 0.05 * n
        assert payload.nbytes < 4 * n / 10


# --- stats -------------------------------------------------------------------------------------

def test_stats_count_steps_per_key_and_snapshots_subtract():
    s = CompressStats()
    s.record("a", dense=400, sent=10, wire=18, ms=1.0)
    s.record("b", dense=400, sent=30, wire=38, ms=1.0)
    first = s.snapshot()
    assert (first.steps, first.dense_bytes, first.sent_bytes) == (1, 800, 40)
    assert s.ratio == 20.0 and s.steps == 1
    s.record("a", dense=400, sent=20, wire=28, ms=3.0)
    s.record("b", dense=400, sent=20, wire=28, ms=3.0)
    d = s.snapshot().since(first)
    assert d == StatsSnapshot(dense_bytes=800, sent_bytes=40, wire_bytes=56, compress_ms=6.0,
                              steps=1)
    per = s.snapshot().per_step()
    assert per["dense_bytes_per_step"] == 800 and per["compression_ratio"] == 20.0
    assert per["compress_ms_per_step"] == 4.0
    assert StatsSnapshot().ratio == 1.0


def test_reduce_on_a_one_rank_group_moves_and_counts_nothing():
    for spec in NO_MOMENTUM:
        c = make_compressor(spec)
        g = torch.randn(100)
        out = c.reduce(g, None, 1, "b")
        assert torch.equal(out, g) and out.data_ptr() != g.data_ptr()
        assert c.stats.sent_bytes == 0 and c.residual("b") is None


def test_compression_never_draws_from_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for spec in [{"name": "topk"}, {"name": "pbgc"}]:
        c = make_compressor(spec)
        for _ in range(3):
            c.compress(torch.randn(20000, generator=torch.Generator().manual_seed(1)), "b")
    assert torch.equal(torch.rand(3), expected)


# --- a realistic gradient stream ---------------------------------------------------------------

def _train_mlp(spec, steps=80):
    """A small MLP on synthetic data; gradients replaced by what the compressor sends.
    -> (compressor, first loss, last loss, relative error-feedback gaps per step)."""
    torch.manual_seed(0)
    x = torch.randn(1024, 32)
    y = (x @ torch.randn(32, 10) + 0.5 * torch.randn(1024, 10)).argmax(1)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    c = make_compressor(spec)
    params = list(model.parameters())
    # SGD by hand (torch.optim's first step imports torch._dynamo: seconds on a busy box)
    mom = 0.0 if c.momentum else 0.9  # momentum corrected in the compressor, or here
    bufs = [torch.zeros_like(p) for p in params]
    sum_g = sum_sent = 0
    gaps, losses = [], []
    for _ in range(steps):
        i = torch.randint(0, 1024, (64,))
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        grads = torch.autograd.grad(loss, params)
        losses.append(float(loss.detach()))
        g = torch.cat([x.reshape(-1) for x in grads])
        with torch.no_grad():  # as the aggregator will call it
            payload, _ = c.compress(g, "mlp")
            sent = c.decompress(payload)
        c.stats.record("mlp", dense=4 * g.numel(), sent=payload.nbytes, wire=0, ms=0.0)
        sum_g, sum_sent = sum_g + g, sum_sent + sent
        gaps.append(float((sum_sent - sum_g).norm() / sum_g.norm()))
        off = 0
        with torch.no_grad():
            for p, b in zip(params, bufs):
                b.mul_(mom).add_(sent[off:off + p.numel()].view_as(p))
                p.sub_(0.05 * b)
                off += p.numel()
    return c, sum(losses[:5]) / 5, sum(losses[-5:]) / 5, gaps


def test_pbgc_on_a_real_gradient_stream_beats_the_paper_ratio_and_learns():
    c, first, last, _ = _train_mlp({"name": "pbgc"})  # momentum correction, plain SGD
    assert c.stats.ratio > 37.1
    assert last < 0.5 * first
    rep = c.report()
    assert rep["compression_ratio"] == c.stats.ratio
    assert rep["pbgc_predictor_mae_log"] is not None and rep["pbgc_predictor_mae_log"] < 0.5
    assert rep["pbgc_predicted_share"] > 0  # the regressor took over after warm-up


def test_pbgc_error_feedback_converges_on_a_real_gradient_stream():
    c, first, last, gaps = _train_mlp({"name": "pbgc", "momentum": 0})  # SGD momentum
    assert c.stats.ratio > 37.1
    assert last < 0.5 * first
    assert gaps[-1] < 0.5 and gaps[-1] < 0.7 * gaps[4]


@pytest.mark.parametrize("spec", SPARSE, ids=ids)
def test_non_finite_gradients_fail_loudly_instead_of_stalling(spec):
    c = make_compressor(spec)
    with pytest.raises(FloatingPointError, match="non-finite gradient in bucket 'b'"):
        c.compress(torch.tensor([1.0, float("nan"), 2.0]), "b")


@pytest.mark.parametrize("spec", [{"name": "fp16"}, {"name": "topk"},
                                  {"name": "pbgc", "warmup_steps": 2, "refit_every": 2}],
                         ids=ids)
def test_state_dict_resumes_exactly(spec):
    """A run resumed from a checkpoint sends exactly what the uninterrupted run sends."""
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(3000, generator=gen) for _ in range(12)]
    a = make_compressor(spec)
    for g in grads[:6]:
        a.compress(g, "b")
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # through a real checkpoint file format
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = make_compressor(spec)
    b.load_state_dict(state)
    for g in grads[6:]:
        pa, ra = a.compress(g, "b")
        pb, rb = b.compress(g, "b")
        assert torch.equal(pa.data, pb.data) and torch.equal(ra, rb)
    with pytest.raises(ValueError, match="compression state"):
        make_compressor({"name": "none"}).load_state_dict(state)
