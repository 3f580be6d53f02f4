"""After compression, question and decode logits equal the uncompressed model with evicted entries masked."""

from dataclasses import dataclass

import pytest
import torch
from kvpress import ScorerPress

from kvpress_compose import ComposePress
from tests.models import random_ids, tiny_model
from tests.reference import compressed_vs_reference

ATTENTION = ["eager", "sdpa"]


def assert_same_logits(compressed, reference, atol=2e-5):
    for step, (c, r) in enumerate(zip(compressed, reference)):
        torch.testing.assert_close(c, r, atol=atol, rtol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("query_source", ["prefill", "bidirectional", "replay"])
def test_question_and_greedy_decode_match_masked_reference(attn, query_source):
    model = tiny_model("llama", attn=attn, layers=4)
    press = ComposePress(compression_ratio=0.6, query_source=query_source, layer_allocation="global")
    compressed, reference, kept = compressed_vs_reference(model, random_ids(1, 48), press, random_ids(1, 6, seed=7))
    lengths = [int(k[0, 0].sum()) for k in kept]
    assert len(set(lengths)) > 1, f"layers should keep different lengths to exercise the mask fix: {lengths}"
    assert_same_logits(compressed, reference)


@dataclass
class LayerRankedScorer(ScorerPress):
    """Deterministic scores more peaked in some layers, to force layer 0's budget: ComposePress puts a scorer's
    scores on one scale per layer (shares of each head's total), so a more peaked layer keeps fewer tokens."""

    layer0_shortest: bool = True

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        generator = torch.Generator().manual_seed(0)  # same base scores in every layer: only the peak differs
        layers = module.config.num_hidden_layers
        rank = layers - 1 - module.layer_idx if self.layer0_shortest else module.layer_idx
        return torch.rand(keys.shape[:3], generator=generator) ** (2.0**rank)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("layer0_shortest", [True, False])
def test_layer0_shorter_or_longer_than_the_others(attn, layer0_shortest):
    """4.57 leaks future tokens when layer 0 is longest-but-not-all; crashes when another layer is longer."""
    model = tiny_model("llama", attn=attn, layers=4)
    press = ComposePress(compression_ratio=0.5, scorer=LayerRankedScorer(layer0_shortest=layer0_shortest),
                         layer_allocation="global")
    compressed, reference, kept = compressed_vs_reference(model, random_ids(1, 40), press, random_ids(1, 6, seed=7))
    lengths = [int(k[0, 0].sum()) for k in kept]
    assert (lengths[0] == min(lengths)) if layer0_shortest else (lengths[0] == max(lengths)), lengths
    assert len(set(lengths)) == len(lengths), lengths
    assert_same_logits(compressed, reference)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_every_family_matches_reference(family):
    model = tiny_model(family, layers=3, seed=3)
    press = ComposePress(compression_ratio=0.5, query_source="bidirectional", layer_allocation="global")
    compressed, reference, _ = compressed_vs_reference(model, random_ids(1, 40), press, random_ids(1, 5, seed=9))
    assert_same_logits(compressed, reference)


def test_multi_head_attention_without_gqa():
    model = tiny_model("llama", heads=4, kv_heads=4)
    press = ComposePress(compression_ratio=0.5, query_source="prefill", layer_allocation="global")
    compressed, reference, kept = compressed_vs_reference(model, random_ids(1, 40), press, random_ids(1, 5, seed=9))
    assert kept[0].shape[1] == 4
    assert_same_logits(compressed, reference)


def test_unstructured_variant_matches_reference_and_keeps_the_whole_context():
    model = tiny_model("llama", attn="sdpa", layers=3)
    press = ComposePress(compression_ratio=0.5, query_source="replay", layer_allocation="global", structured=False)
    ids = random_ids(1, 40)
    compressed, reference, _ = _unstructured_run(model, ids, press)
    assert_same_logits(compressed, reference, atol=1e-4)


def _unstructured_run(model, ids, press):
    from tests.models import cache_layer_lengths, prefill
    from tests.reference import install_reference_masks, question_and_decode

    cache = prefill(model, ids, press)
    assert cache_layer_lengths(cache) == [ids.shape[1]] * len(model.model.layers)  # no replayed tokens kept
    kept = []
    for layer in model.model.layers:
        batch_index, head_index, position = layer.self_attn.masked_key_indices
        mask = torch.ones(1, model.config.num_key_value_heads, ids.shape[1], dtype=torch.bool)
        mask[batch_index, head_index, position] = False
        kept.append(mask)
    n_total = sum(int(k.numel()) for k in kept)
    assert sum(int(k.sum()) for k in kept) == int(n_total * 0.5)
    question = random_ids(1, 5, seed=9)
    compressed, tokens = question_and_decode(model, cache, question, ids.shape[1], 3)
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None
    from tests.models import prefill as plain_prefill

    full = plain_prefill(model, ids)
    handles = install_reference_masks(model, kept, ids.shape[1])
    try:
        reference, _ = question_and_decode(model, full, question, ids.shape[1], 3, tokens)
    finally:
        for handle in handles:
            handle.remove()
    return compressed, reference, kept


def test_chunked_replay_with_padding_matches_reference(monkeypatch):
    monkeypatch.setattr("kvpress_compose.replay.MIN_REPLAY_CHUNK", 9)
    monkeypatch.setattr("kvpress_compose.replay.MAX_REPLAY_CHUNK", 9)
    model = tiny_model("qwen3", layers=3)
    press = ComposePress(compression_ratio=0.6, query_source="replay", layer_allocation="global", agg_task="mean")
    compressed, reference, _ = compressed_vs_reference(model, random_ids(1, 40), press, random_ids(1, 5, seed=9))
    assert_same_logits(compressed, reference)
