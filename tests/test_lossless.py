import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from wtacrs import lossless as L

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def saved_storages(fn):
    """Run ``fn`` and return ``(out, [(shape, dtype, nbytes)] of the distinct saved storages)``."""
    seen = {}

    def pack(t):
        key = t.untyped_storage()._cdata  # the StorageImpl: stable, and fine on meta / fake
        seen.setdefault(key, (tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(seen.values())


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# pack_bits / unpack_bits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 5, 7), (64,), (2, 1001)])
def test_pack_roundtrip(shape):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) > 0.5
    packed = L.pack_bits(mask)
    n = mask.numel()
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(n / 8),)
    assert torch.equal(L.unpack_bits(packed, shape), mask)
    assert torch.equal(L.unpack_bits(L.pack_bits(mask, invert=True), shape), ~mask)
    if n % 8:
        assert int(packed[-1]) >> (n % 8) == 0  # padding bits are 0
        assert int(L.pack_bits(mask, invert=True)[-1]) >> (n % 8) == 0


def test_pack_bit_order_and_non_contiguous():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert L.pack_bits(mask).tolist() == [0b10000001, 1]
    m = torch.rand(6, 10, generator=torch.Generator().manual_seed(1)) > 0.3
    assert torch.equal(L.unpack_bits(L.pack_bits(m.t()), (10, 6)), m.t())


def test_unpack_rejects_wrong_size():
    with pytest.raises(ValueError):
        L.unpack_bits(torch.zeros(3, dtype=torch.uint8), (25,))
    with pytest.raises(TypeError):
        L.pack_bits(torch.zeros(3))


def test_pack_on_meta_and_fake():
    m = torch.empty(3, 5, 7, dtype=torch.bool, device="meta")
    p = L.pack_bits(m)
    assert p.device.type == "meta" and p.shape == (14,)
    assert L.unpack_bits(p, m.shape).shape == m.shape
    with FakeTensorMode():
        f = torch.empty(3, 5, 7, dtype=torch.bool)
        assert L.pack_bits(f).shape == (14,)
        assert L.unpack_bits(L.pack_bits(f), f.shape).shape == f.shape


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 17), (4, 3, 33, 9), (1,)])
def test_dropout_bitwise_equals_torch(dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    p = 0.3
    torch.manual_seed(7)
    ref = F.dropout(x, p, True)
    after_ref = torch.rand(4)
    (gref,) = torch.autograd.grad(ref, x, grad)
    torch.manual_seed(7)
    out = L.dropout(x, p, True)
    after = torch.rand(4)
    (got,) = torch.autograd.grad(out, x, grad)
    assert bits_equal(out, ref)
    assert bits_equal(got, gref)
    assert torch.equal(after, after_ref)  # the same RNG consumption
    assert out.grad_fn.name() == "PackedDropoutBackward"


def test_dropout_non_contiguous_input():
    base = torch.randn(9, 6, 5, generator=torch.Generator().manual_seed(0))
    x = base.permute(2, 0, 1).requires_grad_()
    torch.manual_seed(3)
    ref = F.dropout(x, 0.4, True)
    (gref,) = torch.autograd.grad(ref, x, torch.ones_like(ref))
    torch.manual_seed(3)
    out = L.dropout(x, 0.4)
    (got,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(out, ref) and torch.equal(got, gref)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1001])
def test_dropout_saves_packed_mask_only(numel):
    x = torch.randn(numel, requires_grad=True)
    out, saved = saved_storages(lambda: L.dropout(x, 0.5))
    assert saved == [((math.ceil(numel / 8),), torch.uint8, math.ceil(numel / 8))]
    out.sum().backward()


def test_torch_dropout_saves_full_mask_on_cpu():
    x = torch.randn(1000, requires_grad=True)
    _, saved = saved_storages(lambda: F.dropout(x, 0.5, True))
    assert sum(s[2] for s in saved) == 4000  # the fp32 noise: 4 bytes per element


def test_dropout_identity_cases_save_nothing():
    x = torch.randn(10, requires_grad=True)
    for p, training in [(0.0, True), (0.5, False)]:
        out, saved = saved_storages(lambda p=p, training=training: L.dropout(x, p, training))
        assert out is x and saved == []
    empty = torch.randn(0, requires_grad=True)
    assert L.dropout(empty, 0.5) is empty


def test_dropout_p_one_and_invalid_p():
    x = torch.tensor([1.0, float("nan"), -2.0], requires_grad=True)
    ref, ref_saved = saved_storages(lambda: F.dropout(x, 1.0, True))
    out, saved = saved_storages(lambda: L.dropout(x, 1.0))
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    assert saved == ref_saved == [((), torch.float32, 4)]  # torch's x * zeros({}) keeps the 0-dim zero
    with pytest.raises(ValueError):
        L.dropout(x, 1.5)


def test_dropout_with_generator_is_reproducible_and_leaves_global_rng():
    x = torch.randn(100, requires_grad=True)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = L.dropout(x, 0.5, generator=torch.Generator().manual_seed(3))
    b = L.dropout(x, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)
    (ga,) = torch.autograd.grad(a, x, torch.ones_like(a))
    assert torch.equal(ga, (a != 0).float() * 2.0)


def test_dropout_without_grad_is_torch_dropout():
    x = torch.randn(50)
    torch.manual_seed(1)
    ref = F.dropout(x, 0.2, True)
    torch.manual_seed(1)
    with torch.no_grad():
        out = L.dropout(x.requires_grad_(), 0.2)
    assert torch.equal(out, ref)


def test_dropout_mask_rebuilds_output_and_rows():
    x = torch.randn(6, 16, requires_grad=True)
    torch.manual_seed(0)
    out, mask, saved = L.dropout_with_mask(x, 0.25)
    assert not mask.fused
    assert bits_equal(mask.apply(x.detach(), saved), out.detach())
    keep = mask.keep(saved)
    assert torch.equal(keep, out.detach() != 0)
    rows = torch.tensor([4, 1])
    got = L.dropout_rows(x.detach()[rows], keep[rows], 0.25, fused=False)
    assert bits_equal(got, out.detach()[rows])
    # the mask object holds no tensor: what is saved is what the node saved
    assert not hasattr(mask, "__dict__")


def test_dropout_double_backward_is_the_squared_noise():
    """d^2/dx^2 of sum(dropout(x)^2) / 2 is noise^2 = keep / (1 - p)^2, elementwise."""
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    out = L.dropout(x, 0.3)
    (g,) = torch.autograd.grad(out.square().sum() / 2, x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    keep = (out != 0).double()
    assert 0 < keep.sum() < 20
    torch.testing.assert_close(gg, keep / 0.7**2, rtol=1e-12, atol=0)


def test_dropout_on_meta_and_fake_saves_the_same_shapes():
    shape = (3, 4, 11)
    x = torch.randn(shape, requires_grad=True)
    _, cpu_saved = saved_storages(lambda: L.dropout(x, 0.1))
    xm = torch.empty(shape, device="meta", requires_grad=True)
    out, meta_saved = saved_storages(lambda: L.dropout(xm, 0.1))
    out.sum().backward()
    assert xm.grad.shape == shape
    assert [s[:2] for s in meta_saved] == [s[:2] for s in cpu_saved]
    with FakeTensorMode():
        xf = torch.empty(shape, requires_grad=True)
        out, fake_saved = saved_storages(lambda: L.dropout(xf, 0.1))
        out.sum().backward()
    assert [s[:2] for s in fake_saved] == [s[:2] for s in cpu_saved]


# ---------------------------------------------------------------------------------------------
# ReLU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_exact(dtype):
    x = torch.randn(5, 13, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, :4] = torch.tensor([0.0, -0.0, float("nan"), float("inf")])
    x.requires_grad_()
    grad = torch.randn(5, 13, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad[1, :2] = torch.tensor([float("inf"), float("nan")])
    ref = torch.relu(x)
    (gref,) = torch.autograd.grad(ref, x, grad)
    out, saved = saved_storages(lambda: L.relu(x))
    (got,) = torch.autograd.grad(out, x, grad)
    assert bits_equal(out, ref) and bits_equal(got, gref)
    assert saved == [((9,), torch.uint8, 9)]  # ceil(65 / 8)
    assert out.grad_fn.name() == "PackedReLUBackward"


def test_relu_gradcheck_and_meta():
    x = torch.randn(3, 7, dtype=torch.float64) + 0.05
    x = x.where(x.abs() > 1e-3, torch.full_like(x, 0.5)).requires_grad_()
    assert torch.autograd.gradcheck(L.relu, (x,))
    xm = torch.empty(3, 7, device="meta", requires_grad=True)
    out, saved = saved_storages(lambda: L.relu(xm))
    out.sum().backward()
    assert [s[:2] for s in saved] == [((3,), torch.uint8)]
    with FakeTensorMode():
        xf = torch.empty(3, 7, requires_grad=True)
        out, saved = saved_storages(lambda: L.relu(xf))
        out.sum().backward()
    assert [s[:2] for s in saved] == [((3,), torch.uint8)]


def test_ops_without_grad_are_plain_torch():
    x = torch.randn(10)
    assert L.relu(x).grad_fn is None and torch.equal(L.relu(x), torch.relu(x))
