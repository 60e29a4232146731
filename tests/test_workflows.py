"""A converted model in real workflows: deepcopy, pickling, shared configs, torch.compile,
save/load and Hugging Face Trainer."""

import copy
import io
import json
import pickle
from dataclasses import fields

import pytest
import torch
import transformers as tf

import wtacrs
from tests.factory import model_class, tiny_batch, tiny_config, tiny_model
from wtacrs.modules import WTACRSConv1D, WTACRSLinear

WTACRS_MODULES = (WTACRSLinear, WTACRSConv1D)


def grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def loss_at(model, b, seed):
    torch.manual_seed(seed)
    return model(**b).loss


def layout(model):
    """Every module's path, class and settings, and every attention module's settings."""
    rows = [(n, type(m).__name__, m.extra_repr()) for n, m in model.named_modules()]
    for n, m in model.named_modules():
        settings = m.__dict__.get("wtacrs_attention")
        if settings is not None:
            values = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name != "generator"}
            rows.append((n, "attention", repr(values), settings.generator.seed))
    return rows


# --------------------------------------------------------------------------------------------
# 1. deepcopy and pickle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_deepcopy_of_a_converted_model_trains_the_copy_only(family):
    model = tiny_model(family).train()
    wtacrs.convert(model, wtacrs.WTACRSConfig(seed=0))
    clone = copy.deepcopy(model)
    b = tiny_batch(family)
    loss = loss_at(clone, b, 3)
    loss.backward()
    assert all(g is None for g in grads(model).values())
    assert all(g is not None for n, g in grads(clone).items()), [n for n, g in grads(clone).items() if g is None]
    assert torch.equal(loss_at(model, b, 3), loss)  # exact forward, same dropout seed
    # the copy owns its conversion state: its layers draw from its own generators
    linear = next(m for m in clone.modules() if isinstance(m, WTACRS_MODULES))
    assert linear.generator is clone._wtacrs_state.generators
    assert linear.generator is not next(m for m in model.modules() if isinstance(m, WTACRS_MODULES)).generator

    wtacrs.revert(clone)
    assert not wtacrs.is_converted(clone) and wtacrs.is_converted(model)
    assert not any(isinstance(m, WTACRS_MODULES) for m in clone.modules())
    assert any(isinstance(m, WTACRS_MODULES) for m in model.modules())
    assert (len(clone._forward_pre_hooks), len(model._forward_pre_hooks)) == (0, 1)  # its own hooks went
    clone.zero_grad()
    loss_at(clone, b, 3).backward()  # the reverted copy trains exactly, still on its own parameters
    assert all(g is None for g in grads(model).values())


def test_torch_save_and_load_of_a_converted_model_gives_a_converted_model_that_trains():
    model = tiny_model("t5").train()
    wtacrs.convert(model, wtacrs.WTACRSConfig(seed=0))
    b = tiny_batch("t5")
    loss_at(model, b, 0).backward()  # generators and the sample share have been used
    model.zero_grad(set_to_none=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert wtacrs.is_converted(loaded) and layout(loaded) == layout(model)
    # same generator states: the same sampled gradient as the original's next step
    loss = loss_at(loaded, b, 1)
    loss.backward()
    ref = loss_at(model, b, 1)
    ref.backward()
    assert torch.equal(loss, ref)
    for (n, g), (_, g_ref) in zip(grads(loaded).items(), grads(model).items()):
        assert g is not None and torch.equal(g, g_ref), n
    wtacrs.revert(loaded)
    assert not any(isinstance(m, WTACRS_MODULES) for m in loaded.modules())


# --------------------------------------------------------------------------------------------
# 2. shared configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_converting_a_model_leaves_the_config_it_shares_alone(family):
    cls, cfg = model_class(family), tiny_config(family)
    first, second = (cls._from_config(cfg, attn_implementation="eager").train() for _ in range(2))
    second.load_state_dict(first.state_dict())
    assert first.config is second.config  # transformers shares it: the case to survive
    wtacrs.convert(first, wtacrs.WTACRSConfig(seed=0))
    assert cfg._attn_implementation == "eager"
    assert {m.config._attn_implementation for m in second.modules() if hasattr(m, "config")} == {"eager"}
    assert {m.config._attn_implementation for m in first.modules() if hasattr(m, "config")} == {"wtacrs"}
    wtacrs.convert(second, wtacrs.WTACRSConfig(seed=0))  # failed: fallback 'wtacrs'
    b = tiny_batch(family)
    assert torch.equal(loss_at(second, b, 0), loss_at(first, b, 0))
    wtacrs.revert(first)
    assert first.config is cfg and all(m.config is cfg for m in first.modules() if hasattr(m, "config"))
    assert cfg._attn_implementation == "eager"


def test_a_model_whose_config_says_wtacrs_is_converted_like_the_eager_model_it_runs():
    """A model built from a converted model's config reads "wtacrs" without being converted: it
    runs eager attention, and converting it keeps eager as the fallback."""
    cls, cfg = model_class("bert"), tiny_config("bert")
    first = wtacrs.convert(cls._from_config(cfg, attn_implementation="eager"), wtacrs.WTACRSConfig(seed=0))
    torch.manual_seed(0)
    other = cls._from_config(first.config).train()
    assert other.config._attn_implementation == "wtacrs" and not wtacrs.is_converted(other)
    b = tiny_batch("bert")
    ref = loss_at(other, b, 1)
    wtacrs.convert(other, wtacrs.WTACRSConfig(seed=0))
    assert {m.wtacrs_attention.fallback for m in other.modules() if "wtacrs_attention" in m.__dict__} == {"eager"}
    assert torch.equal(loss_at(other, b, 1), ref)
    other.eval()
    with torch.no_grad():
        logits = other(**b).logits
    wtacrs.revert(other)
    with torch.no_grad():
        assert torch.equal(other(**b).logits, logits)


# --------------------------------------------------------------------------------------------
# 3. torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_training_with_the_default_config_matches_eager():
    """Inductor on CPU, the default config (lossless dropout on). With inductor drawing random
    numbers as eager does, a copy whose transformer layer is compiled gives the eager losses and the
    same sampled gradients. The layer holds every kind of wtacrs module (sampled linears, the
    attention, lossless dropout and GeLU, the lean LayerNorm); compiling the embeddings and head too would only
    add kernels of stock ops to build (90 s instead of 54 s with a cold inductor cache here)."""
    model = wtacrs.convert(tiny_model("bert", n_layers=1), wtacrs.WTACRSConfig(seed=0))
    compiled = copy.deepcopy(model)  # same weights, same generator states
    compiled.bert.encoder.layer[0].compile()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, compiled)]
    b = tiny_batch("bert")
    with torch._inductor.config.patch(fallback_random=True):
        for step in range(2):
            for opt in opts:
                opt.zero_grad()
            ref = loss_at(model, b, step)
            ref.backward()
            loss = loss_at(compiled, b, step)
            loss.backward()
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
            for (n, g), (_, g_ref) in zip(grads(compiled).items(), grads(model).items()):
                torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6, msg=n)
            for opt in opts:
                opt.step()


# --------------------------------------------------------------------------------------------
# 4. saving and loading
# --------------------------------------------------------------------------------------------


def test_config_round_trips_through_a_dict_and_a_directory(tmp_path):
    config = wtacrs.WTACRSConfig(ratio=0.2, tm2_v="store", d=False, seed=7)
    assert wtacrs.WTACRSConfig.from_dict(config.to_dict()) == config
    assert wtacrs.WTACRSConfig.from_dict({"ratio": 0.5}) == wtacrs.WTACRSConfig(ratio=0.5)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "wtacrs_config.json").read_text()) == config.to_dict()
    assert wtacrs.WTACRSConfig.from_pretrained(tmp_path) == config
    with pytest.raises(ValueError, match="unknown key.*'rato'"):
        wtacrs.WTACRSConfig.from_dict({"rato": 0.3})
    with pytest.raises(ValueError, match="ratio"):
        wtacrs.WTACRSConfig.from_dict({"ratio": 2})
    with pytest.raises(FileNotFoundError, match="no wtacrs_config.json"):
        wtacrs.WTACRSConfig.from_pretrained(tmp_path / "absent")


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_saved_converted_model_loads_into_a_stock_model_and_reconverts_identically(family, tmp_path):
    model = tiny_model(family).train()
    wtacrs.convert(model, wtacrs.WTACRSConfig(ratio=0.4, tm2_v="store"))  # seed derived by convert
    wtacrs.save_pretrained(model, tmp_path)
    assert {"config.json", "model.safetensors", "wtacrs_config.json"} <= {p.name for p in tmp_path.iterdir()}
    assert "wtacrs" not in (tmp_path / "config.json").read_text()  # a stock config

    stock = type(model).from_pretrained(tmp_path, attn_implementation="eager")
    assert not wtacrs.is_converted(stock) and stock.config._attn_implementation == "eager"
    config = wtacrs.WTACRSConfig.from_pretrained(tmp_path)
    assert config.ratio == 0.4 and config.tm2_v == "store" and config.seed is not None
    wtacrs.convert(stock, config)
    stock.train()
    assert layout(stock) == layout(model)
    state = model.state_dict()
    assert list(stock.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in stock.state_dict().items())
    b = tiny_batch(family)
    # same seed: the same dropout masks and the same sampled gradient
    loss, ref = loss_at(stock, b, 2), loss_at(model, b, 2)
    loss.backward()
    ref.backward()
    assert torch.equal(loss, ref)
    for (n, g), (_, g_ref) in zip(grads(stock).items(), grads(model).items()):
        assert (g is None and g_ref is None) or torch.equal(g, g_ref), n
    stock.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(stock(**b).logits, model(**b).logits)


def test_save_pretrained_of_an_unconverted_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not converted"):
        wtacrs.save_pretrained(tiny_model("bert"), tmp_path)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# 5. Hugging Face Trainer
# --------------------------------------------------------------------------------------------


def _examples(n, seq=6, with_ids=False):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        row = dict(input_ids=torch.randint(1, 64, (seq,), generator=g), attention_mask=torch.ones(seq, dtype=torch.long),
                   labels=torch.tensor(i % 3))
        if with_ids:
            row["idx"] = 100 + i
        rows.append(row)
    return rows


def _trainer(model, tmp_path, train_dataset, **kwargs):
    collator = kwargs.pop("data_collator", tf.default_data_collator)
    settings = dict(max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, disable_tqdm=True)
    args = tf.TrainingArguments(output_dir=str(tmp_path), report_to="none", save_strategy="no", use_cpu=True, **{**settings, **kwargs})
    return tf.Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator)


def test_trainer_trains_a_model_converted_before_it(tmp_path):
    model = wtacrs.convert(tiny_model("bert"), wtacrs.WTACRSConfig(seed=0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(model, tmp_path, _examples(6))
    result = trainer.train()
    assert trainer.state.global_step == 3
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "bert.encoder.layer.0.attention.self.query.weight" in changed
    # all, or all but one: BERT classifies the [CLS] token, so in the last layer only B of the n rows
    # of dZ are nonzero, and a step whose k sampled rows miss them gives that weight a zero gradient
    assert len(changed) >= len(before) - 1
    assert wtacrs.is_converted(model)


def test_grad_norm_cache_gets_sample_ids_through_a_trainer_collator(tmp_path):
    model = wtacrs.convert(tiny_model("bert", dropout=0.0), wtacrs.WTACRSConfig(seed=0))
    cache = wtacrs.GradNormCache()
    lookups = []
    lookup = cache.lookup

    def spy(key, sample_ids, n, device):
        found = lookup(key, sample_ids, n, device)
        lookups.append((sample_ids, found is not None))
        return found

    cache.lookup = spy
    n_examples, layers = 8, sum(isinstance(m, WTACRSLinear) for m in model.modules())
    collator = cache.collator(tf.default_data_collator, id_key="idx")
    trainer = _trainer(model, tmp_path, _examples(n_examples, with_ids=True), data_collator=collator,
                       max_steps=4, per_device_train_batch_size=4, remove_unused_columns=False)
    trainer.train()
    ids = set(range(100, 100 + n_examples))
    assert len(cache) == layers * n_examples and {sid for _, sid in cache._norms} == ids
    assert len(lookups) == 4 * layers
    # steps 1-2 see each sample for the first time, steps 3-4 (the second epoch) use its norms
    assert [hit for _, hit in lookups] == [False] * (2 * layers) + [True] * (2 * layers)
    assert {sid for sids, _ in lookups[: 2 * layers] for sid in sids} == ids

    # the id field must reach the collator: Trainer drops it unless told to keep unused columns
    dropping = _trainer(model, tmp_path, _examples(4, with_ids=True), data_collator=collator)
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        next(iter(dropping.get_train_dataloader()))


def test_sample_id_collator_names_its_cache_across_pickling():
    """A DataLoader worker gets a pickled collator; the batches it returns still feed the cache."""
    cache = wtacrs.GradNormCache()
    collator = pickle.loads(pickle.dumps(cache.collator(tf.default_data_collator)))
    out = pickle.loads(pickle.dumps(collator(_examples(2, with_ids=True))))
    assert "idx" not in out and out["input_ids"].shape == (2, 6)
    sample_ids = out[wtacrs.gradnorm.SAMPLE_IDS_KEY]
    with sample_ids.batch():
        assert wtacrs.gradnorm.active_cache() == (cache, (100, 101))
    assert copy.deepcopy(cache)._token != cache._token  # a copy is another cache
