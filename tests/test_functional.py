import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import wtacrs
from wtacrs import functional as wf
from wtacrs.estimator import budget


def saved_tensors(fn):
    """Run ``fn`` and return the distinct non-parameter storages saved for backward."""
    seen = {}

    def pack(t):
        seen.setdefault(id(t.untyped_storage()), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(seen.values())


def activation_bytes(tensors, params=()):
    param_storages = {id(p.untyped_storage()) for p in params}
    return sum(t.untyped_storage().nbytes() for t in tensors if id(t.untyped_storage()) not in param_storages)


def _linear_case(shape=(4, 32, 12), out=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    w = torch.randn(out, shape[-1], generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype)
    dz = torch.randn(*shape[:-1], out, generator=g, dtype=dtype)
    return x, w, b, dz


def _grads(fn, x, w, b, dz):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    fn(x, w, b).backward(dz)
    return x.grad, w.grad, b.grad


def test_linear_forward_is_exact():
    x, w, b, _ = _linear_case()
    out = wf.linear(x, w.requires_grad_(), b, ratio=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, F.linear(x, w, b))


@pytest.mark.parametrize("shape", [(4, 32, 12), (50, 12)])
def test_grad_input_and_grad_bias_equal_torch(shape):
    x, w, b, dz = _linear_case(shape)
    ref = _grads(F.linear, x, w, b, dz)
    got = _grads(lambda *a: wf.linear(*a, ratio=0.2, generator=torch.Generator().manual_seed(0)), x, w, b, dz)
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[2], ref[2])


def test_non_contiguous_input():
    x, w, b, dz = _linear_case((32, 4, 12))
    x = x.transpose(0, 1)  # [4, 32, 12], not contiguous
    dz = dz.transpose(0, 1)
    ref = _grads(F.linear, x, w, b, dz)
    got = _grads(lambda *a: wf.linear(*a, ratio=0.5, generator=torch.Generator().manual_seed(0)), x, w, b, dz)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[2], ref[2])


def test_exact_path_when_budget_covers_all_tokens():
    x, w, b, dz = _linear_case()
    ref = _grads(F.linear, x, w, b, dz)
    got = _grads(lambda *a: wf.linear(*a, ratio=1.0), x, w, b, dz)
    torch.testing.assert_close(got[1], ref[1])


def test_grad_weight_is_unbiased():
    x, w, b, dz = _linear_case((2, 24, 6), out=4, seed=1)
    x = x * torch.rand(2, 24, 1, generator=torch.Generator().manual_seed(2)) ** -1.5  # uneven row norms
    exact = _grads(F.linear, x, w, b, dz)[1]
    trials = 3000
    g = torch.Generator().manual_seed(3)
    w_ = w.clone().requires_grad_()
    estimates = []
    for _ in range(trials):
        w_.grad = None
        wf.linear(x, w_, ratio=0.25, generator=g).backward(dz)
        estimates.append(w_.grad.clone())
    est = torch.stack(estimates)
    bound = 5 * est.std(0) / math.sqrt(trials) + 1e-5 * exact.abs().max()
    assert ((est.mean(0) - exact).abs() <= bound).all()


def test_saved_bytes_are_k_rows_plus_fp32_weights_and_int32_indices():
    x, w, b, _ = _linear_case((4, 32, 12))
    w.requires_grad_()
    out, saved = saved_tensors(lambda: wf.linear(x, w, b, ratio=0.3, generator=torch.Generator().manual_seed(0)))
    k = budget(4 * 32, 0.3)
    assert activation_bytes(saved, params=[w]) == k * 12 * 4 + k * 4 + k * 4


def test_frozen_weight_stores_nothing_for_its_gradient():
    x, w, b, _ = _linear_case()
    x.requires_grad_()
    _, saved = saved_tensors(lambda: wf.linear(x, w, b, ratio=0.3))
    assert activation_bytes(saved, params=[w]) == 0


def test_shared_sample_is_stored_once():
    x, w, b, _ = _linear_case()
    w.requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    sample = wf.sample_input(x, ratio=0.3, generator=torch.Generator().manual_seed(0))
    _, saved = saved_tensors(lambda: (wf.linear(x, w, b, ratio=0.3, sample=sample), wf.linear(x, w2, b, ratio=0.3, sample=sample)))
    k = budget(128, 0.3)
    assert activation_bytes(saved, params=[w, w2]) == k * 12 * 4 + k * 4 + k * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_linear(dtype):
    x, w, b, dz = _linear_case(dtype=dtype)
    got = _grads(lambda *a: wf.linear(*a, ratio=0.3, generator=torch.Generator().manual_seed(0)), x, w, b, dz)
    assert all(t.dtype == dtype and torch.isfinite(t).all() for t in got)


# -- half precision: the sample weights (about n / k) must not overflow fp16 rows ---------------

# Entries of "large" rows: fp16 rows times weights of about n / k pass 65504 while the exact
# product stays finite; bf16 has fp32's range (its rows overflow only where their fp32 norms do,
# and those rows are kept exactly), so its large rows check the same path at the same precision.
LARGE = {torch.float16: 2.5e4, torch.bfloat16: 1e18}
HALF = [torch.float16, torch.bfloat16]


def _large(shape, dtype, seed, scale=None):
    """Entries of magnitude in [0.25, 1] * ``scale`` (``LARGE[dtype]`` by default), random signs."""
    g = torch.Generator().manual_seed(seed)
    magnitude = (0.25 + 0.75 * torch.rand(shape, generator=g)) * (LARGE[dtype] if scale is None else scale)
    return (magnitude * torch.randn(shape, generator=g).sign()).to(dtype)


def _assert_close_in(dtype, got, expected):
    """``got`` equals ``expected`` (fp64) to a few roundings of ``dtype``: rows, weighted rows and
    the result are each rounded once, relative to the largest entry of the result."""
    eps = torch.finfo(dtype).eps
    scale = float(expected.abs().max())
    torch.testing.assert_close(got.double(), expected, rtol=4 * eps, atol=4 * eps * scale)


def _folding_overflows(rows, weights, dtype):
    """Whether folding the weights into the rows in ``dtype`` (the old storage) gives inf."""
    return bool(torch.isinf((rows.float() * weights.unsqueeze(-1)).to(dtype)).any())


@pytest.mark.parametrize("dtype", HALF)
def test_weighted_product_applies_the_weights_in_fp32(dtype):
    from wtacrs.estimator import weighted_product

    rows = _large((8, 6), dtype, seed=0)
    grads = _large((8, 5), dtype, seed=1, scale=1e-3)
    weights = torch.linspace(3.0, 20.0, 8)
    got = weighted_product(grads, rows, weights, dtype)
    expected = (grads.double() * weights.double()[:, None]).T @ rows.double()
    assert got.dtype == dtype and torch.isfinite(got).all()
    _assert_close_in(dtype, got, expected)
    assert _folding_overflows(rows, weights, dtype) == (dtype == torch.float16)


@pytest.mark.parametrize("path", ["rows", "row_source"])
@pytest.mark.parametrize("ratio", [0.1, 0.3])
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_linear_weight_gradient_is_finite_and_matches_fp32(dtype, ratio, path):
    """fp16 rows of 2.5e4 with an upstream gradient of 1e-4: the exact dW is about 40, finite; the
    estimate from the same sample, computed in fp64, is finite too, and so must be the op's."""
    from wtacrs.rowsource import RowSource

    x = _large((4, 16, 8), dtype, seed=0)
    dz = _large((4, 16, 6), dtype, seed=1, scale=1e-4)
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(2)).to(dtype).requires_grad_()
    source = RowSource((x,), lambda ts, idx: ts[0].reshape(-1, 8).index_select(0, idx)) if path == "row_source" else None
    sample = wf.sample_input(x, ratio=ratio, generator=torch.Generator().manual_seed(3), row_source=source)
    _, weights, indices = sample
    wf.linear(x, w, ratio=ratio, sample=sample, row_source=source).backward(dz)

    rows = x.reshape(-1, 8)[indices.long()]
    estimate = (dz.reshape(-1, 6)[indices.long()].double() * weights.double()[:, None]).T @ rows.double()
    exact = dz.reshape(-1, 6).double().T @ x.reshape(-1, 8).double()
    limit = torch.finfo(dtype).max
    assert exact.abs().max() < limit and estimate.abs().max() < limit
    assert w.grad.dtype == dtype and torch.isfinite(w.grad).all()
    _assert_close_in(dtype, w.grad, estimate)
    if dtype == torch.float16:  # the case is one where the old storage overflowed
        assert _folding_overflows(rows, weights, dtype)


def test_half_precision_repro_from_the_issue():
    x = torch.full((2, 8, 8), 2.5e4).half().requires_grad_()
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).half().requires_grad_()
    y = wf.linear(x, w, ratio=0.3, generator=torch.Generator().manual_seed(0))
    y.backward(torch.full_like(y, 1e-4))
    exact = F.linear(x.detach().float(), w.detach().float())  # dW = 16 rows * 2.5e4 * 1e-4 = 40
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(w.grad.float(), torch.full((4, 8), 40.0), rtol=1e-3, atol=0)
    assert exact.isfinite().all()


@pytest.mark.parametrize("large", ["a", "b"])
@pytest.mark.parametrize("ratio", [0.1, 0.3])
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_matmul_gradients_are_finite_and_match_fp32(dtype, ratio, large):
    big, small = LARGE[dtype], 1e-3 * 2.5e4 / LARGE[dtype]  # a @ b stays about 1e2
    a = _large((2, 3, 20, 8), dtype, seed=0, scale=big if large == "a" else small).requires_grad_()
    b = _large((2, 3, 8, 16), dtype, seed=1, scale=big if large == "b" else small).requires_grad_()
    dc = _large((2, 3, 20, 16), dtype, seed=2, scale=1e-4)
    out = wf.matmul(a, b, ratio=ratio, generator=torch.Generator().manual_seed(3))
    a_rows, a_w, a_idx, b_cols, b_w, b_idx = out.grad_fn.saved_tensors
    out.backward(dc)

    def estimate(rows, weights, idx, grad):  # sum_t w_t rows_t^T grad[idx_t], fp64
        g = torch.gather(grad.double(), -2, idx.long().unsqueeze(-1).expand(*idx.shape, grad.shape[-1]))
        return rows.double().transpose(-1, -2) @ (g * weights.double().unsqueeze(-1))

    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # the gradient estimated from the large operand's rows (the other one is tiny: subnormal in fp16)
    if large == "a":
        got, expected, rows, weights = b.grad, estimate(a_rows, a_w, a_idx, dc), a_rows, a_w  # [..., K, N]
    else:
        got, expected, rows, weights = a.grad, estimate(b_cols, b_w, b_idx, dc.transpose(-1, -2)).transpose(-1, -2), b_cols, b_w
    assert expected.abs().max() < torch.finfo(dtype).max
    _assert_close_in(dtype, got, expected)
    if dtype == torch.float16:
        assert _folding_overflows(rows, weights, dtype)


def test_single_token_and_pad_only_batches():
    x, w, b, dz = _linear_case((1, 12))
    got = _grads(lambda *a: wf.linear(*a, ratio=0.3), x, w, b, dz)
    torch.testing.assert_close(got[1], _grads(F.linear, x, w, b, dz)[1])
    # pad-only: every token has gradient norm 0, and indeed its output gradient is 0
    x, w, b, dz = _linear_case()
    mask = torch.zeros(4, 32)
    got = _grads(lambda *a: wf.linear(*a, ratio=0.3, grad_norm=mask), x, w, b, dz * 0)
    assert torch.equal(got[1], torch.zeros_like(w))


def test_nan_input_propagates_like_the_exact_product():
    x, w, b, dz = _linear_case()
    x[1, 5, 3] = float("nan")
    ref = _grads(F.linear, x, w, b, dz)[1]
    got = _grads(lambda *a: wf.linear(*a, ratio=0.3, generator=torch.Generator().manual_seed(0)), x, w, b, dz)[1]
    assert torch.equal(got.isnan(), ref.isnan())


def test_zero_rows_do_not_crash():
    x, w, b, dz = _linear_case()
    x[:, :20] = 0
    got = _grads(lambda *a: wf.linear(*a, ratio=0.1, generator=torch.Generator().manual_seed(0)), x, w, b, dz)
    assert torch.isfinite(got[1]).all()


def test_same_seed_same_gradient():
    x, w, b, dz = _linear_case()
    run = lambda: _grads(lambda *a: wf.linear(*a, ratio=0.3, generator=torch.Generator().manual_seed(11)), x, w, b, dz)[1]
    assert torch.equal(run(), run())


def _saved_shapes(device_ctx, make):
    with device_ctx:
        x, w, b = make()
        out, saved = saved_tensors(lambda: wf.linear(x, w, b, ratio=0.3))
        out.sum().backward()
        return sorted((tuple(t.shape), str(t.dtype)) for t in saved if t is not w)


@pytest.mark.parametrize("shapes_only", [True, False])
def test_linear_runs_on_meta_and_fake_tensors_with_cpu_shapes(shapes_only, monkeypatch):
    monkeypatch.setattr(wtacrs.estimator, "META_SHAPES_ONLY", shapes_only)

    def make():
        return torch.randn(4, 32, 12), torch.randn(7, 12, requires_grad=True), torch.randn(7, requires_grad=True)

    cpu = _saved_shapes(torch.device("cpu"), make)
    meta = _saved_shapes(torch.device("meta"), make)
    with FakeTensorMode():
        fake = _saved_shapes(torch.device("cpu"), make)
    assert cpu == meta == fake
    k = budget(128, 0.3)
    assert cpu == sorted([((k, 12), "torch.float32"), ((k,), "torch.float32"), ((k,), "torch.int32")])


# -- matmul -------------------------------------------------------------------------------------


def _matmul_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 3, 20, 8, generator=g) * torch.rand(2, 3, 20, 1, generator=g) ** -1
    b = torch.randn(2, 3, 8, 16, generator=g) * torch.rand(2, 3, 1, 16, generator=g) ** -1
    dc = torch.randn(2, 3, 20, 16, generator=g)
    return a, b, dc


def _matmul_grads(fn, a, b, dc):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    fn(a, b).backward(dc)
    return a.grad, b.grad


def test_matmul_forward_exact_and_exact_path():
    a, b, dc = _matmul_case()
    ref = _matmul_grads(torch.matmul, a, b, dc)
    got = _matmul_grads(lambda x, y: wf.matmul(x, y, ratio=1.0), a, b, dc)
    assert torch.equal(wf.matmul(a, b, ratio=0.3), torch.matmul(a, b))
    torch.testing.assert_close(got, ref)
    kept = _matmul_grads(lambda x, y: wf.matmul(x, y, ratio=0.3, sample_a=False, sample_b=False), a, b, dc)
    torch.testing.assert_close(kept, ref)


def test_matmul_gradients_are_unbiased():
    a, b, dc = _matmul_case(1)
    exact = _matmul_grads(torch.matmul, a, b, dc)
    trials = 2000
    g = torch.Generator().manual_seed(0)
    sums = [torch.zeros_like(a), torch.zeros_like(b)]
    sqs = [torch.zeros_like(a), torch.zeros_like(b)]
    for _ in range(trials):
        for i, grad in enumerate(_matmul_grads(lambda x, y: wf.matmul(x, y, ratio=0.3, generator=g), a, b, dc)):
            sums[i] += grad
            sqs[i] += grad**2
    for s, sq, ex in zip(sums, sqs, exact):
        mean = s / trials
        sd = (sq / trials - mean**2).clamp_min(0).sqrt()
        assert ((mean - ex).abs() <= 5 * sd / math.sqrt(trials) + 1e-4 * ex.abs().max()).all()


def test_matmul_saved_bytes_per_batch_and_head():
    a, b, _ = _matmul_case()
    a.requires_grad_(), b.requires_grad_()
    _, saved = saved_tensors(lambda: wf.matmul(a, b, ratio=0.3, generator=torch.Generator().manual_seed(0)))
    km, kn = budget(20, 0.3), budget(16, 0.3)
    assert activation_bytes(saved) == 2 * 3 * (km * 8 * 4 + km * 8 + kn * 8 * 4 + kn * 8)  # rows, weights, indices


def test_matmul_stores_nothing_for_a_frozen_operand():
    a, b, _ = _matmul_case()
    a.requires_grad_()
    _, saved = saved_tensors(lambda: wf.matmul(a, b, ratio=0.3))
    kn = budget(16, 0.3)
    assert activation_bytes(saved) == 2 * 3 * (kn * 8 * 4 + kn * 8)


def test_matmul_on_meta():
    a = torch.randn(2, 3, 20, 8, device="meta", requires_grad=True)
    b = torch.randn(2, 3, 8, 16, device="meta", requires_grad=True)
    wf.matmul(a, b, ratio=0.3).sum().backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape


# -- module and gradient-norm sources -------------------------------------------------------------


def test_module_shares_parameters_and_is_exact_in_eval_and_no_grad():
    lin = nn.Linear(12, 7)
    mod = wtacrs.WTACRSLinear(lin, ratio=0.3)
    assert mod.weight is lin.weight and mod.bias is lin.bias
    assert list(mod.state_dict()) == list(lin.state_dict())
    x = torch.randn(4, 10, 12)
    mod.eval()
    assert torch.equal(mod(x), lin(x))
    mod.train()
    with torch.no_grad():
        assert torch.equal(mod(x), lin(x))
    assert torch.equal(mod(x), lin(x))
    assert mod.to_linear().weight is lin.weight


def test_token_mask_gives_pad_tokens_the_floor_not_zero():
    from wtacrs.gradnorm import GRAD_NORM_FLOOR, resolve_grad_norm

    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, 3:] = False
    with wtacrs.token_mask(mask):
        g, _, _ = resolve_grad_norm("layer", "default", (20,), torch.device("cpu"))
    assert torch.equal(g, torch.where(mask.reshape(-1), 1.0, GRAD_NORM_FLOOR))
    # pads are drawn (rarely, with large weights): their gradient may be read by a pooler
    lin = wtacrs.WTACRSLinear(nn.Linear(12, 7), ratio=0.3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 10, 12, generator=torch.Generator().manual_seed(1))
    real = mask.reshape(-1)
    pad_weights = []
    for _ in range(20):
        with wtacrs.token_mask(mask):
            _, saved = saved_tensors(lambda: lin(x))
        indices = next(t for t in saved if t.dtype == torch.int32).long()
        weights = next(t for t in saved if t.dtype == torch.float32 and t.shape == indices.shape)
        pad_weights += weights[~real[indices]].tolist()
    assert pad_weights and min(pad_weights) > 0


def test_gradient_norm_cache_feeds_the_next_pass_and_stays_unbiased():
    torch.manual_seed(0)
    lin = wtacrs.WTACRSLinear(nn.Linear(6, 4, bias=False), ratio=0.3, key="layer")
    x = torch.randn(3, 8, 6)
    dz = torch.randn(3, 8, 4) * torch.rand(3, 8, 1) ** -1
    cache = wtacrs.GradNormCache()
    with cache.batch([10, 11, 12]):
        out = lin(x)
    out.backward(dz)
    assert len(cache) == 3
    norms = cache.lookup("layer", (10, 11, 12), 24, torch.device("cpu"))
    raw = torch.linalg.vector_norm(dz, dim=-1).reshape(-1)
    torch.testing.assert_close(norms, raw.clamp_min(0.1 * raw.mean()))

    exact = dz.reshape(-1, 4).T @ x.reshape(-1, 6)
    trials = 3000
    lin.generator = torch.Generator().manual_seed(1)
    est = []
    for _ in range(trials):
        lin.weight.grad = None
        with cache.batch([10, 11, 12]):
            out = lin(x)
        out.backward(dz)
        est.append(lin.weight.grad.clone())
    est = torch.stack(est)
    assert ((est.mean(0) - exact).abs() <= 5 * est.std(0) / math.sqrt(trials) + 1e-5).all()


def test_ops_train_under_cpu_autocast():
    x, w, b, _ = _linear_case()
    w.requires_grad_(), b.requires_grad_(), x.requires_grad_()
    a, m, _ = _matmul_case()
    a.requires_grad_(), m.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = wf.linear(x, w, b, ratio=0.3, generator=torch.Generator().manual_seed(0))
        z = wf.matmul(a, m, ratio=0.3, generator=torch.Generator().manual_seed(0))
    assert y.dtype == z.dtype == torch.bfloat16
    (y.float().sum() + z.float().sum()).backward()
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype, a.grad.dtype, m.grad.dtype) == (torch.float32,) * 5
