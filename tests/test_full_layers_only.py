"""FullLayersOnly: a kvpress press on a hybrid model compresses the full-attention layers only."""

from __future__ import annotations

import pytest
import torch
from kvpress import SnapKVPress
from transformers import DynamicCache

from evaluation.runner.full_layers import FullLayersOnly
from evaluation.runner.presses import make_press
from tests.models import random_ids
from tests.test_exactness import assert_same_logits
from tests.windowed_reference import tiny_gemma3, windowed_compressed_vs_reference

N_CONTEXT = 40  # longer than the window (8) and than SnapKV's observation window (10 here)


def prefill_lengths(model, press) -> list[int]:
    ids = torch.randint(3, model.config.vocab_size, (1, N_CONTEXT), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()  # what kvpress's pipeline builds: a windowed layer holds every entry
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    return [layer.keys.shape[2] for layer in cache.layers]


def test_only_the_full_attention_layers_of_a_hybrid_model_are_compressed():
    model = tiny_gemma3()  # layers: sliding, full, sliding, full
    assert prefill_lengths(model, SnapKVPress(compression_ratio=0.5, window_size=10)) == [20, 20, 20, 20]
    wrapped = FullLayersOnly(SnapKVPress(compression_ratio=0.5, window_size=10))
    assert prefill_lengths(model, wrapped) == [40, 20, 40, 20]


def test_a_model_without_windowed_layers_is_compressed_everywhere_and_the_ratio_is_the_inner_press_s():
    model = tiny_gemma3(layer_types=("full_attention",) * 2)  # a window size, but no layer uses it
    wrapped = FullLayersOnly(SnapKVPress(window_size=10))
    wrapped.compression_ratio = 0.75
    assert wrapped.press.compression_ratio == 0.75
    assert prefill_lengths(model, wrapped) == [10, 10]


@pytest.mark.parametrize("name", ["snapkv_full_layers", "knorm_full_layers", "tova_full_layers",
                                  "compactor_full_layers", "keydiff_full_layers"])
def test_the_registry_names_the_wrapped_presses(name):
    press = make_press(name, 0.5)
    inner = make_press(name.removesuffix("_full_layers"), 0.5)
    assert isinstance(press, FullLayersOnly) and type(press.press) is type(inner)
    assert press.compression_ratio == 0.5 == press.press.compression_ratio


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cache", ["plain", "sliding"])
def test_a_question_and_decoding_after_the_prefill_match_the_masked_reference(attn, cache):
    """The pipeline's flow: prefill under the press, then the question and decoding with the cache; the compressed
    full layers hold fewer entries than the windowed ones (one mask for all layers fails on that)."""
    model = tiny_gemma3(attn=attn)  # window 8; layers: sliding, full, sliding, full
    ids = torch.randint(3, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    compressed_cache = DynamicCache() if cache == "plain" else DynamicCache(config=model.config)
    press = FullLayersOnly(SnapKVPress(compression_ratio=0.5, window_size=4))
    compressed, reference, kept = windowed_compressed_vs_reference(
        model, ids, mask, press, random_ids(1, 4, seed=7), decode_steps=4, cache=compressed_cache)
    assert [int(k[0, 0].sum()) for k in kept[1::2]] == [12, 12]  # the full layers keep half of 24
    held = [int(layer.keys.shape[2]) for layer in compressed_cache.layers]  # after 8 more tokens
    assert held == ([32, 20, 32, 20] if cache == "plain" else [7, 20, 7, 20])
    assert_same_logits(compressed, reference)
