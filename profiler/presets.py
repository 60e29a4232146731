"""The model presets: a family plus the config values of a published checkpoint (or a tiny one for
tests). Plain data, so ``python -m profiler estimate --help`` lists them without importing torch;
``profiler.models`` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    family: str
    config: dict[str, Any]
    description: str


_T5 = {"vocab_size": 32128, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
_T5_TINY = {**_T5, "vocab_size": 512, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4}
_T5_SIZES = {
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
    "t5-3b": dict(d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32),
}


def _t5_presets() -> dict[str, Preset]:
    presets = {}
    for name, size in _T5_SIZES.items():
        presets[name] = Preset("t5", {**_T5, **size, "feed_forward_proj": "relu"}, f"{name} (relu FFN)")
        presets[f"{name}-gated"] = Preset(
            "t5", {**_T5, **size, "feed_forward_proj": "gated-gelu"}, f"{name} dimensions, gated-GeLU FFN (T5 v1.1 style)"
        )
    presets["t5-tiny"] = Preset("t5", {**_T5_TINY, "feed_forward_proj": "relu"}, "tiny T5 for tests")
    presets["t5-tiny-gated"] = Preset("t5", {**_T5_TINY, "feed_forward_proj": "gated-gelu"}, "tiny gated T5 for tests")
    return presets


# LLaMA-style tiny decoders: grouped-query attention (4 query heads, 2 key/value heads)
_DECODER_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512)

PRESETS: dict[str, Preset] = {
    **_t5_presets(),
    "bert-base": Preset("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, vocab_size=30522), "bert-base-uncased"),
    "bert-large": Preset("bert", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                      intermediate_size=4096, vocab_size=30522), "bert-large-uncased"),
    "bert-tiny": Preset("bert", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=512), "tiny BERT for tests"),
    "gpt2": Preset("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257), "gpt2 (124M)"),
    "gpt2-tiny": Preset("gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=512),
                        "tiny GPT-2 for tests"),
    "tiny-llama": Preset("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                       num_attention_heads=32, num_key_value_heads=4, head_dim=64,
                                       vocab_size=32000, max_position_embeddings=2048), "TinyLlama-1.1B"),
    "llama-tiny": Preset("llama", {**_DECODER_TINY, "intermediate_size": 160}, "tiny LLaMA for tests"),
    "qwen3-0.6b": Preset("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                       vocab_size=151936, max_position_embeddings=40960,
                                       tie_word_embeddings=True), "Qwen3-0.6B"),
    "qwen3-tiny": Preset("qwen3", _DECODER_TINY, "tiny Qwen3 (q_norm / k_norm) for tests"),
    "gemma-2b": Preset("gemma", dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                                     num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                                     vocab_size=256000, max_position_embeddings=8192), "Gemma-2B"),
    "gemma-tiny": Preset("gemma", _DECODER_TINY, "tiny Gemma for tests"),
    "gemma2-2b": Preset("gemma2", dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                       num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                       vocab_size=256000, max_position_embeddings=8192, sliding_window=4096,
                                       query_pre_attn_scalar=256), "Gemma-2-2B (logit softcapping 50)"),
    "gemma2-tiny": Preset("gemma2", {**_DECODER_TINY, "sliding_window": 16, "query_pre_attn_scalar": 16},
                          "tiny Gemma 2 for tests (softcapping, a 16-token window on alternate layers)"),
    "gemma3-1b": Preset("gemma3", dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                       vocab_size=262144, max_position_embeddings=32768, sliding_window=512,
                                       query_pre_attn_scalar=256), "Gemma-3-1B (text)"),
    "gemma3-tiny": Preset("gemma3", {**_DECODER_TINY, "sliding_window": 16, "query_pre_attn_scalar": 16},
                          "tiny Gemma 3 for tests (q_norm / k_norm, a 16-token sliding window)"),
}
