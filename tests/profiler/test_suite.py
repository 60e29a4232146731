"""Suite schema, validation and cell expansion; the model factory and the methods table."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import masking_utils

from profiler import methods as methods_table
from profiler.models import (
    PRESETS,
    DimsError,
    MetaMaskChecks,
    build_model,
    make_batch,
    preset_dims,
    resolve_dims,
)
from profiler.report import memory_budgets
from profiler.suite import SuiteError, load_suite

ORIGINAL_CHECKS = (masking_utils._ignore_causal_mask_sdpa, masking_utils._ignore_bidirectional_mask_sdpa)

RECORD_PARAMS = {"model", "family", "method", "batch_size", "seq_len", "target_len", "d_model", "n_head", "d_ff",
                 "d_head", "n_layers", "dtype", "optimizer", "attn_implementation"}


def errors_of(write_suite, text: str) -> list[str]:
    path = write_suite(text)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    return info.value.lines


# --- expansion --------------------------------------------------------------------------------


def test_tiny_suite_expands_to_models_x_methods_x_grid(write_suite):
    suite = load_suite(write_suite())
    cells = suite.cells()
    assert len(cells) == 2 * 2 * 2 * 1
    assert cells[0].cell_id == "t5-tiny/full/B2-S8-T8-D64-H4"
    assert cells[-1].cell_id == "bert-tiny/lora/B3-S8-D64-H4"
    assert len({c.cell_id for c in cells}) == len(cells)
    for cell in cells:
        assert set(cell.params) == RECORD_PARAMS
        assert cell.params["target_len"] == (8 if cell.family == "t5" else None)
    assert cells[0].params["n_layers"] == 2 and cells[0].params["d_head"] == 16


def test_paper_t5_suite_has_108_cells_with_unique_ids():
    suite = load_suite("suites/t5.yaml")
    cells = suite.cells()
    assert len(cells) == 2 * 3 * 2 * 9  # models x batch sizes x lengths x methods
    assert len({c.cell_id for c in cells}) == len(cells)
    assert "t5-base/wtacrs@0.3/B64-S128-T128-D768-H12" in {c.cell_id for c in cells}
    assert {(c.d_model, c.n_head, c.d_ff, c.d_head) for c in cells} == {(768, 12, 3072, 64), (1024, 16, 4096, 64)}


@pytest.mark.parametrize("name", ["smoke", "bert", "t5-paper", "t5-fsdp"])
def test_shipped_suites_validate(name):
    suite = load_suite(f"suites/{name}.yaml")
    assert suite.cells()


def test_cells_of_one_model_and_method_are_consecutive(write_suite):
    # the runner reuses a meta model across consecutive cells; the order must group them
    cells = load_suite(write_suite()).cells()
    keys = [(c.model, c.method) for c in cells]
    assert all(keys.count(k) == 2 and keys.index(k) + 1 == len(keys) - keys[::-1].index(k) - 1 for k in set(keys))


def test_swept_dimensions_follow_the_preset_ratios(write_suite):
    suite = load_suite(write_suite("""
        model: t5-base
        grid: {batch_size: [1], seq_len: [16], target_len: [4], d_model: [512, 1024], n_head: [8]}
        methods: [full]
    """))
    dims = {(c.d_model, c.n_head, c.d_ff, c.d_head, c.target_len) for c in suite.cells()}
    assert dims == {(512, 8, 2048, 64, 4), (1024, 8, 4096, 128, 4)}


def test_sweeping_d_ff_and_d_head_puts_them_in_the_id(write_suite):
    suite = load_suite(write_suite("""
        model: {preset: t5-tiny}
        grid: {batch_size: [1], seq_len: [4], d_ff: [96], d_head: [8]}
        methods: [full]
    """))
    (cell,) = suite.cells()
    assert cell.cell_id == "t5-tiny/full/B1-S4-T4-D64-H4-F96-K8"
    assert build_model(cell, "meta").encoder.block[0].layer[0].SelfAttention.q.weight.shape == (4 * 8, 64)


def test_method_names_are_canonical_and_checks_use_them(write_suite):
    suite = load_suite(write_suite("""
        model: t5-tiny
        grid: {batch_size: [1], seq_len: [4]}
        methods: [full, wtacrs@.30, lora+wtacrs@0.10]
        checks: [{metric: peak_bytes, denominator: wtacrs@0.3, min: 1}]
    """))
    assert [m.name for m in suite.methods] == ["full", "wtacrs@0.3", "lora+wtacrs@0.1"]
    assert suite.checks[0].numerator == "full"


def test_suite_json_holds_what_report_and_check_read():
    data = load_suite("suites/t5.yaml").to_json()
    assert {"name", "model", "grid", "methods", "training", "device", "budgets", "checks"} <= set(data)
    assert data["checks"][2] == {"metric": "peak_bytes", "numerator": "full", "denominator": "wtacrs@0.3",
                                 "min": 1.87, "max": None, "where": {"model": "t5-base", "batch_size": 64,
                                                                    "seq_len": 128}}
    assert data["cells"] == [c.cell_id for c in load_suite("suites/t5.yaml").cells()]  # every cell, in order
    # the report's memory budgets come from the suite
    assert memory_budgets(json.loads(json.dumps(data))) == [int(b * 2**30) for b in data["budgets"]["memory_gib"]]


# --- validation: one line per problem, naming file, line, key and reason ----------------------

BASE = "model: t5-tiny\ngrid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n"

BAD_SUITES = {
    "unknown top key": (BASE + "devise: cpu\n", ["suite.yaml:4: devise: unknown key; did you mean 'device'?"]),
    "unknown grid key": ("model: t5-tiny\ngrid: {batch_size: [2], seq_len: [8], batchsize: [4]}\nmethods: [full]\n",
                         ["suite.yaml:2: grid.batchsize: unknown key; did you mean 'batch_size'?"]),
    "wrong type": ("model: t5-tiny\ngrid: {batch_size: [two], seq_len: [8]}\nmethods: [full]\n",
                   ["suite.yaml:2: grid.batch_size[0]: expected an integer, got str 'two'"]),
    "bool is not an int": (BASE + "training: {timed_steps: true}\n",
                           ["suite.yaml:4: training.timed_steps: expected an integer, got bool True"]),
    "n_head does not divide d_model": (
        "model: t5-tiny\ngrid: {batch_size: [2], seq_len: [8], n_head: [5]}\nmethods: [full]\n",
        ["suite.yaml:2: grid.n_head: t5-tiny: n_head 5 does not divide d_model 64"]),
    "empty grid list": ("model: t5-tiny\ngrid: {batch_size: [], seq_len: [8]}\nmethods: [full]\n",
                        ["suite.yaml:2: grid.batch_size: empty list; give at least one value"]),
    "missing grid axis": ("model: t5-tiny\ngrid: {batch_size: [2]}\nmethods: [full]\n",
                          ["suite.yaml:2: grid.seq_len: missing; give a list of positive integers"]),
    "unknown method": ("model: t5-tiny\ngrid: {batch_size: [2], seq_len: [8]}\nmethods: [full, wtacr@0.3]\n",
                       ["suite.yaml:3: methods[1]: unknown method 'wtacr@0.3'"]),
    "ratio out of range": ("model: t5-tiny\ngrid: {batch_size: [2], seq_len: [8]}\nmethods: [wtacrs@0]\n",
                           ["suite.yaml:3: methods[0]: ratio 0 is not in (0, 1]"]),
    "unknown preset": ("model: {family: t5, preset: t5-bas}\ngrid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                       ["suite.yaml:1: model.preset: unknown preset 't5-bas'; did you mean 't5-base'?"]),
    "unknown family": ("model: {family: t6}\ngrid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                       ["suite.yaml:1: model.family: unknown family 't6'; expected one of t5, bert, gpt2, llama"]),
    "family/preset mismatch": ("model: {family: bert, preset: t5-tiny}\ngrid: {batch_size: [2], seq_len: [8]}\n"
                               "methods: [full]\n",
                               ["suite.yaml:1: model.family: preset 't5-tiny' is a t5 model, not bert"]),
    "unknown config key": ("model: {preset: t5-tiny, config: {dropout: 0.0}}\ngrid: {batch_size: [2], seq_len: [8]}\n"
                           "methods: [full]\n", ["suite.yaml:1: model.config.dropout: not a t5 config key"]),
    "bad dtype": (BASE + "training: {dtype: float64}\n", ["suite.yaml:4: training.dtype: 'float64' is not allowed"]),
    "zero threads": (BASE + "training: {threads: 0}\n", ["suite.yaml:4: training.threads: 0 must be >= 1"]),
    "misspelt target GPU": (BASE + "training: {target: a100-80g}\n",
                            ["suite.yaml:4: training.target: unknown target GPU 'a100-80g'; did you mean 'a100-80gb'?"]),
    "target GPU not in the table": (BASE + "training: {target: tpu-v5}\n",
                                    ["suite.yaml:4: training.target: unknown target GPU 'tpu-v5'; expected one of "
                                     "a100-40gb, a100-80gb, a10g-24gb, h100-80gb, h200, l4-24gb, l40s-48gb, "
                                     "rtx4090-24gb, t4-16gb, v100-32gb"]),
    "memory budget not a size": (BASE + "budgets: {memory_gib: [80, 0]}\n",
                                 ["suite.yaml:4: budgets.memory_gib[1]: 0 must be > 0"]),
    "bad device": (BASE + "device: gpu\n", ["suite.yaml:4: device: 'gpu' is not allowed"]),
    "check names a method not run": (BASE + "checks: [{metric: peak_bytes, denominator: lora, min: 1}]\n",
                                     ["suite.yaml:4: checks[0].denominator: method 'lora' is not in `methods`"]),
    "bad ratio bounds": ("model: t5-tiny\ngrid: {batch_size: [2], seq_len: [8]}\nmethods: [full, lora]\n"
                         "checks: [{metric: peak_bytes, denominator: lora, min: 3, max: 2}]\n",
                         ["suite.yaml:4: checks[0]: bad ratio bounds: min 3 > max 2"]),
    "check without bound": ("model: t5-tiny\ngrid: {batch_size: [2], seq_len: [8]}\nmethods: [full, lora]\n"
                            "checks: [{metric: peak_bytes, denominator: lora}]\n",
                            ["suite.yaml:4: checks[0]: give a ratio bound: min, max or both"]),
    "check matching no cell": ("model: t5-tiny\ngrid: {batch_size: [2], seq_len: [8]}\nmethods: [full, lora]\n"
                               "checks: [{metric: peak_bytes, denominator: lora, min: 1, where: {batch_size: 64}}]\n",
                               ["suite.yaml:4: checks[0].where: no grid point matches {batch_size=64}"]),
    "seq_len beyond positions": ("model: bert-tiny\ngrid: {batch_size: [2], seq_len: [1024]}\nmethods: [full]\n",
                                 ["suite.yaml:2: grid.seq_len: 1024 exceeds bert-tiny's 512 positions"]),
    "target_len without encoder-decoder": (
        "model: bert-tiny\ngrid: {batch_size: [2], seq_len: [8], target_len: [4]}\nmethods: [full]\n",
        ["suite.yaml:2: grid.target_len: applies to encoder-decoder models (t5) only"]),
    "missing required": ("model: t5-tiny\ngrid: {batch_size: [2], seq_len: [8]}\n",
                         ["suite.yaml: methods: missing (required)"]),
    "bad YAML": ("model: t5-tiny\ngrid: {batch_size: [2, seq_len: [8]}\nmethods: [full\n",
                 ["suite.yaml:2: YAML syntax error: expected ',' or ']', but got '}'"]),
    "not a mapping": ("- just\n- a list\n", ["suite.yaml: expected a mapping, got list"]),
    # numbers that would crash or silently disable something later
    "NaN pad fraction": (BASE + "training: {pad_fraction: .nan}\n",
                         ["suite.yaml:4: training.pad_fraction: expected a finite number, got nan"]),
    "NaN memory fraction": (BASE + "budgets: {memory_fraction: .nan}\n",
                            ["suite.yaml:4: budgets.memory_fraction: expected a finite number, got nan"]),
    "NaN time budget": (BASE + "budgets: {cell_seconds: .nan}\n",
                        ["suite.yaml:4: budgets.cell_seconds: expected a finite number, got nan"]),
    "infinite suite budget": (BASE + "budgets: {suite_seconds: .inf}\n",
                              ["suite.yaml:4: budgets.suite_seconds: expected a finite number, got inf"]),
    "infinite memory size": (BASE + "budgets: {memory_gib: [.inf]}\n",
                             ["suite.yaml:4: budgets.memory_gib[0]: expected a finite number, got inf"]),
    "NaN check bound": ("model: t5-tiny\ngrid: {batch_size: [2], seq_len: [8]}\nmethods: [full, lora]\n"
                        "checks: [{metric: peak_bytes, denominator: lora, min: .nan}]\n",
                        ["suite.yaml:4: checks[0].min: expected a finite number, got nan"]),
    "seed beyond a generator's": (BASE + "training: {seed: 18446744073709551616}\n",
                                  ["suite.yaml:4: training.seed: 18446744073709551616 must be >= 0 and <= "
                                   "18446744073709551615"]),
    "batch size beyond a tensor's": ("model: t5-tiny\ngrid: {batch_size: [1000000000000000000000000000000], "
                                     "seq_len: [8]}\nmethods: [full]\n",
                                     ["suite.yaml:2: grid.batch_size[0]: 1000000000000000000000000000000 must be "
                                      ">= 1 and <= 2147483647"]),
    "name with a NUL byte": (BASE + 'name: "a\\0b"\n',
                             ["suite.yaml:4: name: expected a non-empty name of printable characters without '/', got 'a\\x00b'"]),
    "name of 300 characters": (BASE + f"name: {'n' * 300}\n",
                               ["suite.yaml:4: name: expected at most 100 characters, got 300"]),
    "unknown key with a newline": (BASE + '"trai\\nning": {}\n', ["suite.yaml:4: 'trai\\nning': unknown key"]),
    "model name with a control character": ("model: {preset: t5-tiny, name: \"a\\x1b[31mb\"}\n"
                                            "grid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                                            ["suite.yaml:1: model.name: expected a non-empty name of printable characters"]),
    # config overrides that the model cannot be built from
    "zero heads": ("model: {preset: bert-tiny, config: {num_attention_heads: 0}}\n"
                   "grid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                   ["suite.yaml:1: model.config.num_attention_heads: 0 must be a positive integer"]),
    "zero t5 heads": ("model: {preset: t5-tiny, config: {num_heads: 0}}\n"
                      "grid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                      ["suite.yaml:1: model.config.num_heads: 0 must be a positive integer"]),
    "negative size": ("model: {preset: bert-tiny, config: {intermediate_size: -4}}\n"
                      "grid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                      ["suite.yaml:1: model.config.intermediate_size: -4 must be a positive integer"]),
    "hidden size not divisible by heads": ("model: {preset: bert-tiny, config: {hidden_size: 65}}\n"
                                           "grid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                                           ["suite.yaml:1: model.config: bert-tiny: n_head 4 does not divide "
                                            "d_model 65"]),
    "swept heads not divisible by kv heads": ("model: {preset: llama-tiny, config: {num_key_value_heads: 3}}\n"
                                              "grid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                                              ["suite.yaml:1: model.config.num_key_value_heads: 3 does not divide "
                                               "num_attention_heads 4"]),
    "vocabulary too small": ("model: {preset: bert-tiny, config: {vocab_size: 2}}\n"
                             "grid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                             ["suite.yaml:1: model.config.vocab_size: 2 is too small; the synthetic batch draws "
                              "token ids from 3"]),
    "unknown activation": ("model: {preset: bert-tiny, config: {hidden_act: gelu_fast_x}}\n"
                           "grid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                           ["suite.yaml:1: model.config.hidden_act: unknown activation 'gelu_fast_x'; did you mean "
                            "'gelu_fast'?"]),
    "unknown t5 feed-forward activation": ("model: {preset: t5-tiny, config: {feed_forward_proj: gated-foo}}\n"
                                           "grid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                                           ["suite.yaml:1: model.config: t5-tiny: unknown activation 'foo' (dense_act_fn)"]),
    "config type error on one line": ("model: {preset: t5-tiny, config: {dropout_rate: x}}\n"
                                      "grid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                                      ["suite.yaml:1: model.config: t5 config rejected it: Validation error for "
                                       "field 'dropout_rate': TypeError: Field 'dropout_rate' with value 'x'"]),
    "size of the wrong type": ("model: {preset: t5-tiny, config: {d_model: x}}\n"
                               "grid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                               ["suite.yaml:1: model.config.d_model: 'x' must be a positive integer"]),
    "build error": ("model: {preset: bert-tiny, config: {hidden_dropout_prob: 2.0}}\n"
                    "grid: {batch_size: [2], seq_len: [8]}\nmethods: [full]\n",
                    ["suite.yaml:1: model.config: bert-tiny: cannot build: ValueError: dropout probability has to "
                     "be between 0 and 1, but got 2.0"]),
    # YAML the loader refuses
    "repeated key": (BASE + "methods: [lora]\n", ["suite.yaml:4: methods: repeated key (first on line 3)"]),
    "repeated nested key": ("model: t5-tiny\ngrid:\n  batch_size: [2]\n  seq_len: [8]\n  batch_size: [4]\n"
                            "methods: [full]\n",
                            ["suite.yaml:5: grid.batch_size: repeated key (first on line 3)"]),
    "recursive alias": (BASE + "description: &d [*d]\n", ["suite.yaml:4: YAML alias *d refers to itself"]),
    "deep nesting": (BASE + "description: " + "[" * 5000 + "]" * 5000 + "\n",
                     ["suite.yaml:4: YAML nested deeper than 32 levels"]),
}


@pytest.mark.parametrize("case", list(BAD_SUITES))
def test_each_bad_input_gives_one_line_naming_file_key_and_reason(write_suite, case):
    text, expected = BAD_SUITES[case]
    lines = errors_of(write_suite, text)
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected):
        assert line.startswith(str(write_suite.path)), line  # the file comes first
        assert "\n" not in line, line  # one problem, one line
        assert start in line, (case, line)


def test_every_problem_of_a_file_is_reported(write_suite):
    lines = errors_of(write_suite, """\
        name: many
        modle: x
        model: {preset: t5-tiny}
        grid: {batch_size: [], seq_len: [8], n_head: [3]}
        methods: [full, wtacrs@2]
        training: {dtype: float64, warmup_steps: 0}
    """)
    # n_head 3 not dividing 64 is checked once the grid parses, so the empty list hides it
    assert [line.split(": ")[1] for line in lines] == [
        "modle", "grid.batch_size", "methods[1]", "training.dtype", "training.warmup_steps"]


def test_merge_keys_may_override_what_they_merge(write_suite):
    # `<<: {...}` followed by one of the merged keys is an override, not a repeated key
    suite = load_suite(write_suite(BASE + "budgets: {<<: {cell_seconds: 5, suite_seconds: 50}, cell_seconds: 9}\n"))
    assert (suite.budgets.cell_seconds, suite.budgets.suite_seconds) == (9, 50)


def test_each_distinct_model_config_is_built_once_at_validation(write_suite, monkeypatch):
    import profiler.suite as suite_module

    built = []
    real = suite_module.model_point
    monkeypatch.setattr(suite_module, "model_point", lambda preset, overrides, dims, attn: built.append(
        (preset, dims)) or real(preset, overrides, dims, attn))
    suite = load_suite(write_suite("""
        model: [t5-tiny, bert-tiny]
        grid: {batch_size: [1, 2], seq_len: [8, 16], d_model: [64, 128], n_head: [4]}
        methods: [full, lora]
    """))
    assert len(suite.cells()) == 2 * 2 * 2 * 2 * 2
    assert sorted((name, dims.d_model) for name, dims in built) == [
        ("bert-tiny", 64), ("bert-tiny", 128), ("t5-tiny", 64), ("t5-tiny", 128)]


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(SuiteError) as info:
        load_suite(tmp_path / "absent.yaml")
    assert info.value.lines == [f"{tmp_path / 'absent.yaml'}: suite file not found"]


# --- model factory -----------------------------------------------------------------------------


def t5_parameter_count(d_model, d_kv, n_heads, d_ff, layers, vocab, buckets=32):
    """T5ForConditionalGeneration with tied embeddings, relu FFN, counted by hand."""
    inner = d_kv * n_heads
    attention = 4 * d_model * inner
    ffn = 2 * d_model * d_ff
    encoder = layers * (attention + ffn + 2 * d_model) + buckets * n_heads + d_model
    decoder = layers * (2 * attention + ffn + 3 * d_model) + buckets * n_heads + d_model
    return vocab * d_model + encoder + decoder


@pytest.mark.parametrize("preset", ["t5-small", "t5-base", "t5-large", "t5-3b"])
def test_t5_presets_build_on_meta_with_the_published_sizes(preset):
    dims = preset_dims(preset, {})
    model = build_model(_cell_for(preset), "meta")
    count = sum(p.numel() for p in model.parameters())
    assert count == t5_parameter_count(dims.d_model, dims.d_head, dims.n_head, dims.d_ff, dims.n_layers, 32128)
    assert next(model.parameters()).device.type == "meta"


@pytest.mark.parametrize("preset", ["t5-base", "t5-3b"])
def test_gated_t5_presets_add_one_gate_projection_per_block(preset):
    """``<preset>-gated`` has the dimensions of ``<preset>`` and a gated-GeLU FFN: one more
    ``d_model x d_ff`` projection (``wi_1``) in every encoder and decoder block."""
    dims = preset_dims(preset, {})
    assert preset_dims(f"{preset}-gated", {}) == dims
    plain, gated = (build_model(_cell_for(p), "meta") for p in (preset, f"{preset}-gated"))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(gated) - count(plain) == 2 * dims.n_layers * dims.d_model * dims.d_ff
    assert type(gated.encoder.block[0].layer[1].DenseReluDense).__name__ == "T5DenseGatedActDense"


def test_resolve_dims_rejects_heads_that_do_not_divide():
    with pytest.raises(DimsError, match="n_head 5 does not divide d_model 768"):
        resolve_dims("t5-base", {}, n_head=5)
    assert resolve_dims("t5-base", {}, n_head=16).d_head == 48


def _cell_for(preset, method="full", dtype="float32", attn="eager", batch=2, seq=8, pad=0.0):
    from profiler.suite import parse_suite

    family = PRESETS[preset].family
    grid = {"batch_size": [batch], "seq_len": [seq]}
    if family == "t5":
        grid["target_len"] = [seq // 2]
    suite = parse_suite({"model": preset, "grid": grid, "methods": [method],
                         "training": {"dtype": dtype, "attn_implementation": attn, "pad_fraction": pad}})
    return suite.cells()[0]


@pytest.mark.parametrize(
    "preset, parameters",
    [("gpt2", 124_439_808), ("tiny-llama", 1_100_048_384), ("qwen3-0.6b", 596_049_920), ("gemma-2b", 2_506_172_416),
     ("gemma2-2b", 2_614_341_888), ("gemma3-1b", 999_885_952)],
)
def test_decoder_presets_build_on_meta_with_the_published_parameter_counts(preset, parameters):
    model = build_model(_cell_for(preset), "meta")
    assert sum(p.numel() for p in model.parameters()) == parameters  # the checkpoints' model cards
    assert next(model.parameters()).device.type == "meta"


TINY_PRESETS = ["t5-tiny", "t5-tiny-gated", "bert-tiny", "gpt2-tiny", "llama-tiny", "qwen3-tiny", "gemma-tiny",
                "gemma2-tiny", "gemma3-tiny"]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_presets_train_on_cpu_with_their_synthetic_batch(preset):
    cell = _cell_for(preset, pad=0.25)
    model = build_model(cell, "cpu")
    batch = make_batch(cell, "cpu", torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == (2, 8)
    assert int((batch["attention_mask"] == 0).sum()) == 2 * 2  # round(0.25 * 8) pad tokens per row
    if cell.family == "t5":
        assert batch["labels"].shape == (2, 4) and int((batch["labels"] == -100).sum()) == 2 * 1
    elif cell.family == "bert":
        assert batch["labels"].shape == (2,)
    else:
        assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


@pytest.mark.parametrize("preset", ["bert-tiny", "llama-tiny"])
def test_meta_batch_keeps_the_mask_and_dtype_and_attention_apply(preset):
    cell = _cell_for(preset, dtype="bfloat16", attn="sdpa", pad=0.25)
    model = build_model(cell, "meta")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"
    batch = make_batch(cell, "meta")
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.device.type == "meta" for t in batch.values())
    with pytest.raises(RuntimeError, match="meta tensors"):  # transformers reads the mask's values...
        model(**batch)
    with MetaMaskChecks(cell):  # ...which the cell answers
        model(**batch).loss.backward()  # a full step runs on meta
    assert masking_utils._ignore_causal_mask_sdpa is ORIGINAL_CHECKS[0]  # restored on exit
    assert masking_utils._ignore_bidirectional_mask_sdpa is ORIGINAL_CHECKS[1]


def _mask_inputs(cell, config, device):
    batch = make_batch(cell, device)
    embeds = torch.empty(cell.batch_size, cell.seq_len, 8, device=device)
    positions = torch.arange(cell.seq_len, device=device)[None]
    return dict(config=config, inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=positions)


@pytest.mark.parametrize("pad", [0.0, 0.25])
@pytest.mark.parametrize("impl", ["eager", "sdpa", "wtacrs"])
@pytest.mark.parametrize("kind", ["causal", "sliding", "bidirectional"])
def test_meta_masks_are_the_cpu_masks(kind, impl, pad):
    """With MetaMaskChecks, every mask builder makes on meta the mask it makes from the real batch
    (None, or the same shape, dtype and strides)."""
    import wtacrs.attention  # noqa: F401 -- registers the "wtacrs" mask builder

    cell = _cell_for("gemma3-tiny", attn="eager", seq=24, pad=pad)  # a 16-token window < 24 tokens
    config = build_model(cell, "meta").config
    config._attn_implementation = impl
    build = {
        "causal": lambda **kw: masking_utils.create_causal_mask(cache=None, **kw),
        "sliding": lambda **kw: masking_utils.create_sliding_window_causal_mask(cache=None, **kw),
        "bidirectional": lambda position_ids, **kw: masking_utils.create_bidirectional_mask(**kw),
    }[kind]
    cpu = build(**_mask_inputs(cell, config, "cpu"))
    with MetaMaskChecks(cell):
        meta = build(**_mask_inputs(cell, config, "meta"))
    if cpu is None:
        assert meta is None
    else:
        assert (meta.shape, meta.dtype, meta.stride()) == (cpu.shape, cpu.dtype, cpu.stride())
    # no padding lets SDPA-style builders skip a causal or bidirectional mask; padding never does
    skipped = impl != "eager" and not pad and kind != "sliding"
    assert (cpu is None) == (skipped or (kind == "bidirectional" and not pad))


def test_build_is_seeded():
    a = build_model(_cell_for("t5-tiny"), "cpu")
    b = build_model(_cell_for("t5-tiny"), "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


# --- methods table -----------------------------------------------------------------------------


def test_lora_trains_only_adapters_on_peft_default_targets():
    cell = _cell_for("t5-tiny", "lora")
    model = methods_table.prepare("lora", build_model(cell, "meta"), "t5")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    # q and v of 6 attention modules (2 encoder self, 2 decoder self, 2 cross), r=8, 64 -> 64
    assert sum(trainable.values()) == 6 * 2 * methods_table.LORA_RANK * (64 + 64)


def test_checkpointing_saves_fewer_bytes_for_backward():
    cell = _cell_for("bert-tiny", batch=4, seq=32)
    saved = {}
    for method in ("full", "checkpointing"):
        torch.manual_seed(0)
        model = methods_table.prepare(method, build_model(cell, "cpu"), "bert")
        batch = make_batch(cell, "cpu")
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
        saved[method] = sum(storages.values())
    assert saved["checkpointing"] < 0.5 * saved["full"], saved


@pytest.mark.parametrize("name", ["wtacrs@0.3", "wtacrs-linear@0.3", "lora+wtacrs@0.1"])
def test_method_parsing(name):
    method = methods_table.parse(name)
    assert method.entry.pattern.split("@")[0].replace("\\", "") == name.split("@")[0]  # the entry of its name
    assert math.isclose(method.ratio, float(name.split("@")[1]))


@pytest.mark.parametrize("name", ["wtacrs@0.3", "wtacrs-linear@0.3", "lora+wtacrs@0.3"])
def test_wtacrs_methods_train_and_keep_the_forward_exact(name):
    cell = _cell_for("t5-tiny", name)
    reference = build_model(cell, "cpu").eval()
    model = methods_table.prepare(name, build_model(cell, "cpu"), "t5").eval()
    batch = make_batch(cell, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
    model.train()
    model(**batch).loss.backward()
    assert any(p.grad is not None for p in model.parameters())


# --- resource bombs: refused from the file's size and structure, before anything expands -----


def test_alias_bomb_is_refused_before_expanding(write_suite):
    # "billion laughs": 500 bytes whose aliases expand to 9**9 strings
    lines = ['l0: &l0 "lol"'] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    (line,) = errors_of(write_suite, "\n".join(lines) + "\n")
    # l4 (line 5) is the first level past 5,000 values: 9**4 strings
    assert line.startswith(f"{write_suite.path}:5: ") and "more than 5000 YAML values once aliases are expanded" in line


def test_moderate_aliases_are_fine(write_suite):
    suite = load_suite(write_suite("model: t5-tiny\ngrid: {batch_size: &sizes [2, 4], seq_len: *sizes}\n"
                                   "methods: [full]\n"))
    assert suite.grid.seq_len == (2, 4) and len(suite.cells()) == 4


def test_oversized_file_is_refused_unread(write_suite):
    text = BASE.replace("[2]", "[" + ", ".join(map(str, range(1, 700_000))) + "]")
    assert len(text) > 5 * 10**6
    assert errors_of(write_suite, text) == [f"{write_suite.path}: {len(text)} bytes; a suite file may have at most "
                                            "64 KiB (65536 bytes)"]


def test_too_many_values_are_refused(write_suite):
    # 40 KiB of one-digit values: under the size cap, over the value cap
    text = BASE.replace("[2]", "[" + ", ".join(["1"] * 20_000) + "]")
    (line,) = errors_of(write_suite, text)
    assert line.startswith(f"{write_suite.path}:2: ") and "more than 5000 YAML values" in line


def _grid_of(batch_sizes: int, seq_lens: int, methods: str = "[full]") -> str:
    return (f"model: t5-tiny\ngrid: {{batch_size: {list(range(1, batch_sizes + 1))}, "
            f"seq_len: {list(range(1, seq_lens + 1))}}}\nmethods: {methods}\n")


@pytest.mark.parametrize("batch_sizes, seq_lens, methods, cells", [
    (1000, 100, "[full]", 100_000),
    (1000, 700, "[full, lora, checkpointing, wtacrs@0.1, wtacrs@0.2, wtacrs@0.3, wtacrs@0.4, wtacrs@0.5, "
                "wtacrs@0.6, wtacrs@0.7]", 7_000_000),
])
def test_large_grids_need_max_cells(write_suite, batch_sizes, seq_lens, methods, cells):
    path = write_suite(_grid_of(batch_sizes, seq_lens, methods))
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert info.value.lines == [f"{path}:2: grid: {cells} cells, more than the limit of 1000 (raise it with --max-cells)"]


def test_cell_count_is_the_product_of_the_axes(write_suite):
    path = write_suite("""
        model: [t5-tiny, bert-tiny]
        grid: {batch_size: [1, 2, 3], seq_len: [8, 16], target_len: [4, 8], d_model: [64, 128]}
        methods: [full, lora]
    """)
    suite = load_suite(path)
    # t5: 2 d_model x 2 methods x 2 S x 2 T x 3 B; bert has no target axis
    assert suite.n_cells == len(suite.cells()) == 48 + 24
    with pytest.raises(SuiteError, match=r"72 cells, more than the limit of 71 \(raise it"):
        load_suite(path, max_cells=71)
    # a raised limit is counted, not expanded
    assert load_suite(write_suite(_grid_of(1000, 100)), max_cells=100_000).n_cells == 100_000
