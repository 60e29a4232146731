"""Activation checkpointing of a converted model: a recomputed region draws the rows its forward
drew, so checkpointing changes no gradient bit, also under an outer ``saved_tensors_hooks``."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import wtacrs
from tests.factory import tiny_batch, tiny_model
from wtacrs.rng import GeneratorPool


def _detaching_hooks():
    """An outer pack hook as the profiler's breakdown installs: saved tensors come back as new
    tensor objects (which once lost their row sources: CheckpointError, 69 saved vs 65)."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t)


def _enable(model, **kwargs):
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False, **kwargs})


def _gradients(family: str, checkpointing: bool, outer_hook: bool, steps: int = 3, deep_copy: bool = False,
               **switches) -> list[list[torch.Tensor]]:
    model = wtacrs.convert(tiny_model(family).train(), wtacrs.WTACRSConfig(ratio=0.3, seed=5, **switches))
    if checkpointing:
        _enable(model, context_fn=wtacrs.checkpoint_context_fn(model))
    if deep_copy:  # the copy's checkpoint partials must replay the copy's generators, not the original's
        model = copy.deepcopy(model)
    data = tiny_batch(family, 2, 8)  # padded: the token masks decide the probabilities
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)  # dropout masks: checkpoint replays the default generator
    grads = []
    for _ in range(steps):  # later steps read the PositionGradNorms of earlier backward passes
        optimizer.zero_grad()
        with _detaching_hooks() if outer_hook else contextlib.nullcontext():
            loss = model(**data).loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        optimizer.step()
    return grads


@pytest.mark.parametrize("family", ["t5", "llama"])
@pytest.mark.parametrize("outer_hook", [False, True], ids=["plain", "outer-hook"])
def test_checkpointed_gradients_equal_the_uncheckpointed_ones_bit_for_bit(family, outer_hook):
    expected = _gradients(family, checkpointing=False, outer_hook=False)
    got = _gradients(family, checkpointing=True, outer_hook=outer_hook)
    assert [len(g) for g in got] == [len(g) for g in expected] and len(expected[0]) > 10
    for step_expected, step_got in zip(expected, got):
        assert all(torch.equal(a, b) for a, b in zip(step_expected, step_got))


@pytest.mark.parametrize("case", ["sampled-attention", "deep-copy"])
def test_the_replay_also_holds_for_the_sampled_attention_and_a_deep_copy(case):
    """tm1 and tm2_v='sample' draw from the pool inside the attention too; a deep copy of a
    checkpointed model (its layers hold checkpoint partials with the context) replays its own pool."""
    switches = {"tm1": True, "tm2_v": "sample"} if case == "sampled-attention" else {}
    expected = _gradients("t5", checkpointing=False, outer_hook=False, **switches)
    got = _gradients("t5", checkpointing=True, outer_hook=False, deep_copy=case == "deep-copy", **switches)
    for step_expected, step_got in zip(expected, got):
        assert all(torch.equal(a, b) for a, b in zip(step_expected, step_got))


def test_without_the_context_fn_the_recomputation_draws_other_rows():
    """The test above can fail: checkpoint alone replays no private generator."""
    model = wtacrs.convert(tiny_model("t5").train(), wtacrs.WTACRSConfig(ratio=0.3, seed=5))
    _enable(model)
    data = tiny_batch("t5", 2, 8)
    torch.manual_seed(0)
    model(**data).loss.backward()
    got = [p.grad for p in model.parameters() if p.grad is not None]
    expected = _gradients("t5", checkpointing=False, outer_hook=False, steps=1)[0]
    assert not all(torch.equal(a, b) for a, b in zip(expected, got))


def test_a_pool_state_puts_back_the_draws_and_resets_generators_made_since():
    pool = GeneratorPool(3)
    cpu = torch.device("cpu")
    first = torch.rand(4, generator=pool.for_device(cpu))
    state = pool.get_state()
    second = torch.rand(4, generator=pool.for_device(cpu))
    pool.set_state(state)
    assert torch.equal(torch.rand(4, generator=pool.for_device(cpu)), second)
    pool.set_state({})  # as before the generator was made: seeded 3
    assert torch.equal(torch.rand(4, generator=pool.for_device(cpu)), first)


def test_on_a_rank_a_pool_goes_back_to_its_rank_seed(monkeypatch):
    """On rank 1 a generator is seeded rank_seed(seed), not seed: so is one put back as new."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 1)
    pool = GeneratorPool(3)
    cpu = torch.device("cpu")
    first = torch.rand(4, generator=pool.for_device(cpu))
    pool.set_state({})
    assert torch.equal(torch.rand(4, generator=pool.for_device(cpu)), first)


def test_the_context_fn_needs_a_converted_model():
    with pytest.raises(ValueError, match="not converted"):
        wtacrs.checkpoint_context_fn(tiny_model("t5"))
