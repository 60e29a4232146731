"""The activation breakdown attributes every saved storage to the right operator, with bytes
computed by hand for a tiny T5 block."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.t5.modeling_t5 import T5Block

from profiler.breakdown import SAVER_RULES, SavedActivationBreakdown, register_saver
from profiler.measure import CudaKernelBehaviour
from tests.factory import tiny_config
from wtacrs.taxonomy import FAMILIES, Category, Operator

T5 = FAMILIES["t5"]
B, S, D, H, DKV, DFF = 2, 5, 16, 2, 8, 32  # inner attention width H * DKV == D here
F32 = 4


def t5_block() -> T5Block:
    torch.manual_seed(0)
    config = tiny_config("t5", d_model=D, d_ff=DFF, n_head=H, d_head=DKV, vocab=32)
    config._attn_implementation = "eager"
    block = T5Block(config, has_relative_attention_bias=True, layer_idx=0)
    return block.train()


def saved_by_operator(block: nn.Module, hidden: torch.Tensor) -> tuple[dict, SavedActivationBreakdown]:
    with SavedActivationBreakdown(block, T5) as breakdown:
        out = block(hidden)[0]
    breakdown.attribute(out)
    totals: dict = {}
    for item in breakdown.by_operator():
        totals[(item["operator"], item["category"])] = item["bytes"]
    return totals, breakdown


def expected_t5_block(mask_bytes: int) -> dict:
    """What an eager T5 encoder block saves, counted from modeling_t5 by hand."""
    bsd = B * S * D * F32
    bhss = B * H * S * S
    u = Category.UNCOMPRESSED.value
    return {
        # layer[0].layer_norm and layer[1].layer_norm: input, normalized copy, rsqrt [B, S, 1]
        (Operator.LAYERNORM.value, u): 2 * (2 * bsd + B * S * F32),
        (Operator.LINEAR_Q.value, u): bsd,  # the LayerNorm output shared by q, k and v
        (Operator.TENSORMUL_1.value, u): 2 * bsd,  # contiguous copies of Q and K^T
        (Operator.EMBEDDING.value, u): S * S * 8,  # int64 relative position buckets
        (Operator.SOFTMAX.value, u): bhss * F32,  # P
        (Operator.DROPOUT.value, u): (bhss + 2 * B * S * D + B * S * DFF) * mask_bytes,
        (Operator.TENSORMUL_2.value, u): bhss * F32 + bsd,  # dropped P, contiguous copy of V
        (Operator.LINEAR_O.value, u): bsd,
        (Operator.LINEAR_U.value, u): bsd,
        (Operator.ACTIVATION.value, u): B * S * DFF * F32,  # ReLU output
        (Operator.LINEAR_D.value, u): B * S * DFF * F32,  # dropped ReLU output
    }


def test_t5_block_saved_bytes_match_hand_count_with_cpu_dropout():
    block = t5_block()
    hidden = torch.randn(B, S, D, requires_grad=True)
    totals, _ = saved_by_operator(block, hidden)
    # The composite cpu dropout saves fp32 masks.
    assert totals == expected_t5_block(mask_bytes=F32)


def test_t5_block_saved_bytes_match_hand_count_with_cuda_dropout():
    block = t5_block()
    hidden = torch.randn(B, S, D, requires_grad=True)
    with CudaKernelBehaviour():
        totals, _ = saved_by_operator(block, hidden)
    # native_dropout saves a bool mask, one byte per element.
    assert totals == expected_t5_block(mask_bytes=1)


def test_t5_block_on_meta_matches_cpu():
    cpu_totals, _ = saved_by_operator(t5_block(), torch.randn(B, S, D, requires_grad=True))
    meta_block = t5_block().to("meta")
    meta_totals, _ = saved_by_operator(meta_block, torch.randn(B, S, D, device="meta", requires_grad=True))
    assert meta_totals == cpu_totals


def test_total_equals_plain_pack_hook_count_without_parameters():
    block = t5_block()
    hidden = torch.randn(B, S, D, requires_grad=True)
    parameter_ids = {id(p.untyped_storage()) for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if id(storage) not in parameter_ids:
            seen[id(storage)] = storage.nbytes()
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain_out = block(hidden)[0]
    plain_total = sum(seen.values())
    del plain_out

    torch.manual_seed(1)
    _, breakdown = saved_by_operator(block, hidden)
    assert breakdown.total_bytes() == plain_total
    assert len(breakdown.saved) == len(seen)


class SampledLinear(torch.autograd.Function):
    """Stands in for wtacrs' op: saves k rows of the input and their int32 indices."""

    operator = None  # the module names it
    category = Category.SAMPLED

    @staticmethod
    def forward(ctx, x, weight, k):
        rows = x.reshape(-1, x.shape[-1])[:k].clone()
        indices = torch.arange(k, dtype=torch.int32, device=x.device)
        ctx.save_for_backward(weight, rows, indices)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.saved_tensors[0]
        return grad @ weight, None, None


class PackedDropout(torch.autograd.Function):
    """Stands in for wtacrs.lossless: saves a 1-bit packed mask (uint8, numel / 8 bytes)."""

    operator = Operator.DROPOUT
    category = Category.LOSSLESS

    @staticmethod
    def forward(ctx, x):
        packed = torch.zeros(x.numel() // 8, dtype=torch.uint8, device=x.device)
        ctx.save_for_backward(packed)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        return grad


class SampledQ(nn.Linear):
    def forward(self, x):
        return SampledLinear.apply(x, self.weight, 3)


class PackedDropoutModule(nn.Dropout):
    def forward(self, x):
        return PackedDropout.apply(x)


def test_custom_function_nodes_are_attributed_to_sampled_and_lossless():
    block = t5_block()
    attention = block.layer[0].SelfAttention
    q = SampledQ(D, H * DKV, bias=False)
    q.weight = attention.q.weight
    attention.q = q
    block.layer[1].DenseReluDense.dropout = PackedDropoutModule(0.1)
    hidden = torch.randn(B, S, D, requires_grad=True)
    totals, breakdown = saved_by_operator(block, hidden)

    sampled = Category.SAMPLED.value
    assert totals[(Operator.LINEAR_Q.value, sampled)] == 3 * D * F32 + 3 * 4  # rows + int32 indices
    assert totals[(Operator.DROPOUT.value, Category.LOSSLESS.value)] == B * S * DFF // 8
    # k and v still save the LayerNorm output, now under Linear-K (q no longer saves it).
    assert totals[(Operator.LINEAR_K.value, Category.UNCOMPRESSED.value)] == B * S * D * F32
    nodes = {s.node for s in breakdown.saved}
    assert {"SampledLinearBackward", "PackedDropoutBackward"} <= nodes


def test_register_saver_adds_a_rule():
    class Doubler(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    class Model(nn.Module):
        def forward(self, x):
            return Doubler.apply(x * 1.0)

    x = torch.randn(4, 4, requires_grad=True)
    register_saver("DoublerBackward")(lambda site: (Operator.SOFTMAX, Category.LOSSLESS))
    try:
        with SavedActivationBreakdown(Model(), None) as breakdown:
            out = Model()(x)
        breakdown.attribute(out)
    finally:
        del SAVER_RULES["DoublerBackward"]
    assert breakdown.by_operator() == [{"operator": "Softmax", "category": "lossless", "bytes": 64}]


def test_breakdown_leaves_no_hooks_behind():
    block = t5_block()
    forward_pre_hooks = dict(torch.nn.modules.module._global_forward_pre_hooks)
    forward_hooks = dict(torch.nn.modules.module._global_forward_hooks)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    with pytest.raises(RuntimeError, match="boom"), SavedActivationBreakdown(block, T5):
        block(torch.randn(B, S, D, requires_grad=True))
        raise RuntimeError("boom")
    assert dict(torch.nn.modules.module._global_forward_pre_hooks) == forward_pre_hooks
    assert dict(torch.nn.modules.module._global_forward_hooks) == forward_hooks
    assert torch._C._len_torch_dispatch_stack() == 0
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_an_op_declares_its_operator_category_and_slots():
    class Scaled(torch.autograd.Function):
        operator = Operator.SOFTMAX
        category = Category.LOSSLESS
        saved_operators = {1: (Operator.DROPOUT, Category.UNCOMPRESSED)}

        @staticmethod
        def forward(ctx, x, sampled):
            if sampled:  # a category that depends on the call is set on ctx
                ctx.category = Category.SAMPLED
            ctx.save_for_backward(x, x * 3.0)
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad, None

    x = torch.randn(4, 4, requires_grad=True)  # 64 bytes
    for sampled, category in ((False, "lossless"), (True, "sampled")):
        with SavedActivationBreakdown(nn.Module(), None) as breakdown:
            out = Scaled.apply(x * 1.0, sampled)
        breakdown.attribute(out)
        assert breakdown.by_operator() == [
            {"operator": "Softmax", "category": category, "bytes": 64},
            {"operator": "Dropout", "category": "uncompressed", "bytes": 64},
        ]
