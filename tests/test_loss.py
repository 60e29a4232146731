"""wtacrs.chunked_loss: the stock loss and gradients, without the [tokens, vocab] tensors."""

import copy
import inspect
import io

import pytest
import torch

import wtacrs
from profiler.measure import measure_training_step
from tests.factory import tiny_model
from wtacrs.loss import ChunkedLossForward

VOCAB = 300
B, S, T = 2, 8, 6  # batch, source length, T5 target length
CHUNK = 5  # tokens per chunk: 2 * 8 = 16 decoder-only tokens are 4 chunks, the last one short


MODELS = {  # name -> (tests.factory model, config values over it)
    "t5": ("t5", {}),
    "t5-untied": ("t5", dict(tie_word_embeddings=False)),  # no d_model ** -0.5 scaling before the head
    "mt5": ("mt5", {}),
    "umt5": ("umt5", {}),
    "gpt2": ("gpt2", {}),
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}
SEQ2SEQ = ("t5", "t5-untied", "mt5", "umt5")


def build(name, device="cpu", seed=0):
    """One block per stack, ``d_model`` 32, the vocabulary :data:`VOCAB`, dropout 0.1."""
    model, config = MODELS[name]
    d_head = 16 if name in SEQ2SEQ else 8
    return tiny_model(model, d_model=32, d_head=d_head, n_layers=1, vocab=VOCAB, device=device, seed=seed, **config)


def batch(name, device="cpu"):
    """A batch with ignored tokens: padded labels and, for T5, a row that starts with -100 too."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (B, S), generator=g)
    if name in SEQ2SEQ:
        labels = torch.randint(2, VOCAB, (B, T), generator=g)
        labels[1, T - 2 :] = -100
        labels[0, 0] = -100
    else:
        labels = ids.clone()
        labels[1, S - 3 :] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def step(model, b, seed=3):
    """Loss and parameter gradients of one forward/backward with dropout seeded."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**b)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(stock, chunked):
    (out, grads), (chunked_out, chunked_grads) = stock, chunked
    assert chunked_out.logits is None
    assert chunked_out.loss.dtype == out.loss.dtype
    torch.testing.assert_close(chunked_out.loss, out.loss, rtol=1e-6, atol=1e-6)
    assert chunked_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(chunked_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_gradients_equal_the_stock_ones(name):
    model = build(name)
    b = batch(name)
    stock = step(model, b)
    wtacrs.chunked_loss(model, chunk_tokens=CHUNK)
    assert_same_step(stock, step(model, b))


def test_num_items_in_batch_and_shift_labels_reduce_as_the_stock_causal_loss():
    model = build("gpt2")
    b = batch("gpt2")
    shift = torch.nn.functional.pad(b["labels"], (0, 1), value=-100)[..., 1:].roll(1, dims=0)
    cases = [dict(num_items_in_batch=torch.tensor(7)), dict(shift_labels=shift)]
    stock = [step(model, {**b, **extra}) for extra in cases]
    wtacrs.chunked_loss(model, chunk_tokens=CHUNK)
    for expected, extra in zip(stock, cases):
        assert_same_step(expected, step(model, {**b, **extra}))


def test_t5_decoder_inputs_passed_by_the_user_are_used_as_given():
    model = build("t5")
    b = {**batch("t5"), "decoder_input_ids": torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(5))}
    stock = step(model, b)
    wtacrs.chunked_loss(model, chunk_tokens=CHUNK)
    assert_same_step(stock, step(model, b))


def test_eval_no_grad_and_calls_without_labels_are_stock():
    model = build("t5")
    reference = copy.deepcopy(model)
    wtacrs.chunked_loss(model)
    b = batch("t5")
    no_labels = {"input_ids": b["input_ids"], "decoder_input_ids": reference._shift_right(b["labels"])}
    for mode, grad, kwargs in [("eval", True, b), ("train", False, b), ("train", True, no_labels)]:
        for m in (model, reference):
            getattr(m, mode)()
        with torch.set_grad_enabled(grad):
            torch.manual_seed(0)
            expected = reference(**kwargs)
            torch.manual_seed(0)
            got = model(**kwargs)
        assert torch.equal(got.logits, expected.logits)
        assert (got.loss is None) == (expected.loss is None)
        if expected.loss is not None:
            assert torch.equal(got.loss, expected.loss)


def test_return_dict_false_gives_a_tuple_that_starts_with_the_loss():
    model = wtacrs.chunked_loss(build("gpt2"), chunk_tokens=CHUNK)
    torch.manual_seed(0)
    out = model(**batch("gpt2"), return_dict=False)
    torch.manual_seed(0)
    expected = model(**batch("gpt2")).loss
    assert isinstance(out, tuple) and torch.equal(out[0], expected)


def _saved_storages(model, b):
    """Bytes of each distinct non-parameter storage the forward saves for backward."""
    parameters = {id(p.untyped_storage()) for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if id(storage) not in parameters:
            saved[id(storage)] = (storage.nbytes(), storage)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**b).loss
    loss.backward()
    return sorted(nbytes for nbytes, _ in saved.values())


@pytest.mark.parametrize("name", ["t5", "llama"])
def test_no_vocab_sized_tensor_is_saved_for_backward(name):
    model = build(name)
    b = batch(name)
    tokens = b["labels"].numel()
    vocab_bytes = tokens * VOCAB * 4  # one [tokens, vocab] fp32 tensor
    stock = _saved_storages(model, b)
    wtacrs.chunked_loss(model, chunk_tokens=CHUNK)
    chunked = _saved_storages(model, b)
    assert stock[-1] == vocab_bytes  # the log-softmax output
    # all else is the same storages (checkpoint keeps the head's input, which the stock head
    # saves too), up to the one scalar: nll_loss's fp32 total weight, the int64 token count here
    assert [n for n in chunked if n > 8] == [n for n in stock[:-1] if n > 8]
    assert [n for n in stock if n <= 8] == [4] and [n for n in chunked if n <= 8] == [8]


def test_peak_of_a_training_step_loses_the_vocab_sized_tensors():
    # the profiler's tracker on cpu, with enough tokens that the peak is the start of backward:
    # stock holds the saved log-softmax output and two [tokens, vocab] gradients there
    g = torch.Generator().manual_seed(1)
    b = {"input_ids": torch.randint(2, VOCAB, (16, S), generator=g), "labels": torch.randint(2, VOCAB, (16, 32), generator=g)}
    chunk = 64
    vocab_bytes, chunk_bytes = b["labels"].numel() * VOCAB * 4, chunk * VOCAB * 4
    figures = {}
    for chunked in (False, True):
        model = build("t5")
        if chunked:
            wtacrs.chunked_loss(model, chunk_tokens=chunk)
        optimizer = torch.optim.AdamW(model.parameters())
        figures[chunked] = measure_training_step(model, b, optimizer, device="cpu", family=wtacrs.family_of(model),
                                                 timed_steps=0, models_device="cpu")
    stock, chunked = figures[False], figures[True]
    assert stock.categories["temporaries"] >= 2 * vocab_bytes
    assert chunked.categories["activations"] == stock.categories["activations"] - vocab_bytes
    assert chunked.categories["temporaries"] < 5 * chunk_bytes
    assert stock.peak_bytes - chunked.peak_bytes >= 2 * vocab_bytes - 5 * chunk_bytes


@pytest.mark.parametrize("order", ["convert-first", "chunked-loss-first"])
def test_converted_model_with_chunked_loss_matches_the_converted_model(order):
    def converted(chunked):
        model = build("t5")
        if chunked and order == "chunked-loss-first":
            wtacrs.chunked_loss(model, chunk_tokens=CHUNK)
        wtacrs.convert(model, wtacrs.WTACRSConfig(ratio=0.5, seed=7))
        if chunked and order == "convert-first":
            wtacrs.chunked_loss(model, chunk_tokens=CHUNK)
        return model

    b = batch("t5")
    assert_same_step(step(converted(False), b), step(converted(True), b))


def test_peft_lora_model_with_and_without_conversion():
    from peft import LoraConfig, get_peft_model

    def lora(chunked, convert):
        model = get_peft_model(build("t5"), LoraConfig(r=4, lora_alpha=8, task_type="SEQ_2_SEQ_LM"))
        if convert:
            wtacrs.convert(model, wtacrs.WTACRSConfig(ratio=0.5, seed=7))
        return wtacrs.chunked_loss(model, chunk_tokens=CHUNK) if chunked else model

    b = batch("t5")
    for convert in (False, True):
        assert_same_step(step(lora(False, convert), b), step(lora(True, convert), b))


@pytest.mark.parametrize("name", ["t5", "llama"])
def test_training_step_runs_on_meta(name):
    model = build(name, device="meta")
    wtacrs.chunked_loss(model, chunk_tokens=CHUNK)
    out = model(**batch(name, device="meta"))  # no attention mask: transformers' mask checks read values
    assert out.logits is None and out.loss.device.type == "meta" and out.loss.shape == ()
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_revert_restores_the_stock_forward():
    model = build("gpt2")
    b = batch("gpt2")
    stock = step(model, b)
    wtacrs.revert_chunked_loss(wtacrs.chunked_loss(model))
    assert "forward" not in vars(model) and not wtacrs.has_chunked_loss(model)
    out, grads = step(model, b)
    assert torch.equal(out.logits, stock[0].logits) and torch.equal(out.loss, stock[0].loss)
    assert all(torch.equal(grads[n], stock[1][n]) for n in grads)
    with pytest.raises(ValueError, match="no chunked loss"):
        wtacrs.revert_chunked_loss(model)


def test_deepcopy_and_pickle_give_independent_chunked_models():
    model = wtacrs.chunked_loss(build("t5"), chunk_tokens=CHUNK)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    b = batch("t5")
    expected = step(model, b)
    wtacrs.revert_chunked_loss(model)
    for other in copies:
        assert isinstance(vars(other)["forward"], ChunkedLossForward) and other.forward.model is other
        assert_same_step(expected, step(other, b))


def test_signature_is_the_stock_forwards():
    model = build("llama")
    stock = inspect.signature(model.forward)
    wtacrs.chunked_loss(model)
    assert inspect.signature(model.forward) == stock


def test_unsupported_models_and_bad_arguments_raise_value_error():
    gemma2 = tiny_model("gemma2")  # final_logit_softcapping 3
    with pytest.raises(ValueError, match="softcaps the logits"):
        wtacrs.chunked_loss(gemma2)
    bert = tiny_model("bert", head="MASKED_LM")
    with pytest.raises(ValueError, match="does not support BertForMaskedLM; supported: T5ForConditionalGeneration"):
        wtacrs.chunked_loss(bert)
    model = build("gpt2")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="chunk_tokens"):
            wtacrs.chunked_loss(model, chunk_tokens=bad)
    wtacrs.chunked_loss(model)
    with pytest.raises(ValueError, match="already has a chunked loss"):
        wtacrs.chunked_loss(model)
