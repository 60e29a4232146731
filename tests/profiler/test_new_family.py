"""Adding a family is one entry: OPT, which no table of the project names, registered here.

One ``profiler.models.register`` call carries the wtacrs module table (``Family``) and how to
build and train the models (``Architecture`` and a preset). After it, ``wtacrs.convert`` converts
an OPT model, and a suite naming the preset is validated, profiled on the CPU and estimated on
meta, with every activation attributed to the operator the entry says.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import wtacrs
from profiler import models, runner
from profiler.measure import measure_training_step
from profiler.suite import SuiteError, parse_suite
from wtacrs.modules import LeanNorm, LosslessActivation, WTACRSLinear
from wtacrs.taxonomy import Family, Operator

OPT = Family(
    name="opt",
    model_types=("opt",),
    linears={
        r"self_attn\.q_proj": Operator.LINEAR_Q,
        r"self_attn\.k_proj": Operator.LINEAR_K,
        r"self_attn\.v_proj": Operator.LINEAR_V,
        r"self_attn\.out_proj": Operator.LINEAR_O,
        r"fc1": Operator.LINEAR_U,
        r"fc2": Operator.LINEAR_D,
    },
    attention=r"self_attn",
    layernorm=r"self_attn_layer_norm|final_layer_norm",
    softmax="fp32",  # OPT's eager attention: softmax in fp32, cast to the query dtype
    loss_layouts={"OPTForCausalLM": "causal"},  # logits = lm_head(h), then ForCausalLMLoss
)
ARCHITECTURE = models.Architecture(
    OPT, tf.OPTConfig, tf.OPTForCausalLM, "causal", "opt-tiny", d_ff="ffn_dim", activation="activation_function",
)
PRESETS = {
    "opt-tiny": models.Preset("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                          word_embed_proj_dim=64, vocab_size=512, max_position_embeddings=64,
                                          dropout=0.1, attention_dropout=0.1), "tiny OPT"),
}
LAYERS = 2


@pytest.fixture
def opt_registered():
    models.register("opt", ARCHITECTURE, PRESETS)
    yield
    models.unregister("opt")


def tiny_opt(**overrides) -> tf.OPTForCausalLM:
    torch.manual_seed(0)
    config = tf.OPTConfig(**{**PRESETS["opt-tiny"].config, **overrides})
    return tf.OPTForCausalLM._from_config(config, attn_implementation="eager")


def opt_suite(method: str, device: str = "meta"):
    return parse_suite({
        "model": "opt-tiny", "grid": {"batch_size": [2], "seq_len": [16]}, "methods": [method], "device": device,
        "models_device": "cpu", "training": {"warmup_steps": 1, "timed_steps": 1, "pad_fraction": 0.25},
    })


def test_without_the_entry_nothing_knows_opt():
    with pytest.raises(wtacrs.UnsupportedModelError, match="'opt'"):
        wtacrs.convert(tiny_opt())
    with pytest.raises(SuiteError, match="preset"):
        opt_suite("full")


def test_the_entry_converts_an_opt_model(opt_registered):
    model = wtacrs.convert(tiny_opt(), wtacrs.WTACRSConfig(ratio=0.5, seed=0))
    sampled = [name for name, m in model.named_modules() if isinstance(m, WTACRSLinear)]
    assert sorted(sampled) == sorted(f"model.decoder.layers.{i}.{linear}" for i in range(LAYERS) for linear in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"))
    assert sum(isinstance(m, LosslessActivation) for m in model.modules()) == LAYERS  # OPT's ReLU
    assert sum(isinstance(m, LeanNorm) for m in model.modules()) == 2 * LAYERS + 1  # two per layer, the final one
    assert model.config._attn_implementation == "wtacrs"

    reference = tiny_opt().eval()
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the forward is exact
        assert torch.equal(model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits)
    model.train()(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_the_entry_gives_opt_a_chunked_loss(opt_registered):
    no_dropout = dict(dropout=0.0, attention_dropout=0.0)  # training mode, deterministic
    model, chunked = tiny_opt(**no_dropout), wtacrs.chunked_loss(tiny_opt(**no_dropout), chunk_tokens=5)
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    stock, out = model(input_ids=ids, labels=ids), chunked(input_ids=ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, stock.loss)  # fp32: summation order only


@pytest.mark.parametrize("method", ["full", "wtacrs@0.3", "lora+wtacrs@0.3"])
def test_the_entry_profiles_an_opt_model_and_its_estimate_is_the_measurement(opt_registered, method):
    suite = opt_suite(method)
    (cell,) = suite.cells()
    meta = runner.CellRunner(suite, "meta", measure_training_step).run(cell)
    cpu = runner.CellRunner(suite, "cpu", measure_training_step).run(cell)
    assert (meta["status"], cpu["status"]) == ("estimated", "ok"), (meta["message"], cpu["message"])
    assert meta["memory"]["peak_bytes"] == cpu["memory"]["peak_bytes"]
    assert meta["memory"]["categories"] == cpu["memory"]["categories"]
    assert meta["activations"] == cpu["activations"]
    found = {(a["operator"], a["category"]) for a in cpu["activations"] if a["bytes"] > 0}
    linears = {op: {c for o, c in found if o == op} for op in ("Linear-Q", "Linear-K", "Linear-V", "Linear-O",
                                                                "Linear-U", "Linear-D")}
    # Q, K and V read one input (the norm's output), saved once and attributed to Linear-Q; in
    # full fine-tuning Linear-D's input is the activation's output, saved by the activation.
    if method == "full":
        assert linears == {"Linear-Q": {"uncompressed"}, "Linear-K": set(), "Linear-V": set(),
                           "Linear-O": {"uncompressed"}, "Linear-U": {"uncompressed"}, "Linear-D": set()}
        assert ("Activation", "uncompressed") in found
    elif method == "wtacrs@0.3":
        assert linears == {"Linear-Q": {"sampled"}, "Linear-K": set(), "Linear-V": set(), "Linear-O": {"sampled"},
                           "Linear-U": {"sampled"}, "Linear-D": {"sampled"}}
        assert {("Activation", "lossless"), ("Dropout", "lossless")} <= found
    else:  # LoRA on peft's default OPT targets (q_proj, v_proj): the lora_A inputs are sampled, and
        # the frozen layers store no input
        assert linears["Linear-Q"] >= {"sampled"} and not (linears["Linear-O"] | linears["Linear-U"]
                                                            | linears["Linear-D"])


def test_an_entry_cannot_take_a_registered_name_or_model_type(opt_registered):
    with pytest.raises(ValueError, match="registered already"):
        models.register("opt", ARCHITECTURE, {})
    t5_again = Family(name="t5-again", model_types=("mt5",), linears={}, attention="x", layernorm="x")
    with pytest.raises(ValueError, match="mt5 belong to the t5 family"):
        wtacrs.taxonomy.register_family(t5_again)
    assert "t5-again" not in wtacrs.FAMILIES
