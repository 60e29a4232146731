"""The one generator pool a conversion owns, the fallback rule outside one, and row sources held
by their tensors' storages (no module-level state)."""

import copy
import io

import pytest
import torch

import wtacrs
from tests.test_attention import Attention, qkv, settings
from tests.factory import tiny_batch, tiny_model
from wtacrs import rowsource
from wtacrs.attention import wtacrs_attention_forward
from wtacrs.modules import WTACRSConv1D, WTACRSLinear
from wtacrs.rng import ATTENTION_SEED_OFFSET, GeneratorPool, generator_for
from wtacrs.rowsource import RowSource


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_every_sampled_op_of_a_conversion_draws_from_its_one_pool(family):
    model = tiny_model(family).train()
    wtacrs.convert(model, wtacrs.WTACRSConfig(seed=7, tm1=True))
    pool = model._wtacrs_state.generators
    linears = [m for m in model.modules() if isinstance(m, (WTACRSLinear, WTACRSConv1D))]
    attention = [m.wtacrs_attention for m in model.modules() if "wtacrs_attention" in m.__dict__]
    assert isinstance(pool, GeneratorPool) and pool.seed == 7
    assert linears and all(m.generator is pool for m in linears)
    assert attention and all(s.generator is pool for s in attention)
    stock, b = tiny_model(family).train(), tiny_batch(family)
    torch.manual_seed(0)
    stock(**b).loss.backward()
    expected = torch.rand(3)
    before = pool.for_device(torch.device("cpu")).get_state()
    torch.manual_seed(0)
    model(**b).loss.backward()
    assert not torch.equal(pool.for_device(torch.device("cpu")).get_state(), before)  # the pool drew
    assert torch.equal(torch.rand(3), expected)  # and the default generator's stream is the stock model's


def test_a_pool_holds_one_generator_per_device_seeded_with_its_seed():
    pool = GeneratorPool(11)
    cpu = pool.for_device(torch.device("cpu"))
    assert pool.for_device(torch.device("cpu")) is cpu
    assert torch.equal(cpu.get_state(), torch.Generator().manual_seed(11).get_state())
    assert pool.for_device(torch.device("meta")) is None


def test_generator_for_resolves_a_pool_a_generator_or_the_default():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    pool, g = GeneratorPool(0), torch.Generator()
    assert generator_for(pool, cpu) is pool.for_device(cpu)
    assert generator_for(g, cpu) is g
    assert generator_for(g, meta) is None and generator_for(pool, meta) is None
    assert generator_for(None, cpu) is None  # torch's default generator


def test_attention_settings_without_a_generator_own_a_pool_seeded_off_the_initial_seed():
    torch.manual_seed(123)
    draws = []
    for _ in range(2):
        s = settings(ratio=0.3)
        module = Attention(s).train()
        q, k, v = (t.requires_grad_() for t in qkv())
        out, _ = wtacrs_attention_forward(module, q, k, v, None, scaling=1.0, dropout=0.0)
        out.sum().backward()
        assert isinstance(s.generator, GeneratorPool) and s.generator.seed == 123 + ATTENTION_SEED_OFFSET
        draws.append(q.grad)
    assert torch.equal(*draws)  # each settings object owns its pool: the same draws from the same seed


def _row_source(x):
    return RowSource((x,), lambda ts, idx: ts[0].reshape(-1, ts[0].shape[-1]).index_select(0, idx))


def test_a_row_source_is_found_on_its_own_unmodified_data_only():
    x = torch.randn(4, 3)
    out = x * 2
    source = _row_source(x)
    rowsource.register(out, source)
    assert rowsource.lookup(out) is source
    assert rowsource.lookup(out.detach()) is source  # another tensor object, the same data
    assert rowsource.lookup(out.view(2, 6)) is None  # other rows
    assert rowsource.lookup(out[1:]) is None
    assert rowsource.lookup(x) is None
    out.add_(1)
    assert rowsource.lookup(out) is None  # modified since it was registered
    assert rowsource.lookup(out.detach()) is None  # an alias shares the version counter


def test_a_row_source_is_found_on_the_alias_a_saved_tensors_hook_unpacks():
    """What a non-reentrant checkpoint recomputes a region from: the saved input, unpacked
    through the outer hook as a new tensor object (the profiler's breakdown installs one)."""
    x = torch.randn(4, 3, requires_grad=True)
    out = x * 2
    source = _row_source(x)
    rowsource.register(out, source)
    unpacked = []

    class Keep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            unpacked.append(ctx.saved_tensors[0])
            return grad

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t):
        y = Keep.apply(out)
    y.sum().backward()
    assert unpacked[0] is not out and rowsource.lookup(unpacked[0]) is source


def test_a_registered_tensor_copies_and_pickles_without_its_row_source():
    out = torch.randn(4, 3)
    rowsource.register(out, _row_source(torch.randn(4, 3)))
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded, out) and rowsource.lookup(loaded) is None
    assert rowsource.lookup(copy.deepcopy(out)) is None
