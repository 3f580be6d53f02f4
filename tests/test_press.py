"""ComposePress behaviour: budgets, shapes, memory, kept sets, allocation, and clear errors for bad input."""

import numpy as np
import pytest
import torch
from kvpress import KnormPress
from transformers import DynamicCache

from kvpress_compose import ComposePress, compute_n_kept
from tests.models import cache_layer_lengths, prefill, random_ids, tiny_model
from tests.reference import question_and_decode
from tests.test_exactness import LayerRankedScorer


@pytest.mark.parametrize("query_source", ["prefill", "bidirectional", "replay"])
def test_ratio_zero_is_identical_to_no_press(query_source):
    model = tiny_model(layers=3)
    ids, question = random_ids(1, 32), random_ids(1, 5, seed=4)
    pressed = prefill(model, ids, ComposePress(compression_ratio=0.0, query_source=query_source))
    plain = prefill(model, ids)
    assert cache_layer_lengths(pressed) == [32, 32, 32]
    with_press, _ = question_and_decode(model, pressed, question, 32, 3)
    without, _ = question_and_decode(model, plain, question, 32, 3)
    for a, b in zip(with_press, without):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_total_kept_is_the_target_and_every_layer_keeps_its_minimum(ratio):
    model = tiny_model(layers=4)
    press = ComposePress(compression_ratio=ratio, query_source="prefill", min_tokens_per_layer=2,
                         layer_allocation="global")
    cache = prefill(model, random_ids(1, 50), press)
    lengths = cache_layer_lengths(cache)
    assert sum(lengths) == compute_n_kept(4 * 50, ratio)
    assert min(lengths) >= 2
    assert lengths == press.last_budgets.tolist()
    for layer, length in zip(cache.layers, lengths):
        assert layer.keys.shape == layer.values.shape == (1, 2, length, 16)


def test_memory_really_shrinks():
    model = tiny_model(layers=4)
    full = prefill(model, random_ids(1, 64))
    compressed = prefill(model, random_ids(1, 64), ComposePress(compression_ratio=0.75, query_source="prefill"))
    def nbytes(cache):
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    assert nbytes(compressed) == nbytes(full) * compute_n_kept(4 * 64, 0.75) // (4 * 64)


def test_each_head_keeps_exactly_its_top_budget_tokens_in_order():
    model = tiny_model(layers=3)
    ids = random_ids(1, 40)
    full = prefill(model, ids)
    press = ComposePress(compression_ratio=0.6, query_source="bidirectional")
    compressed = prefill(model, ids, press)
    for layer_idx, budget in enumerate(press.last_budgets.tolist()):
        top = press.last_scores[layer_idx].topk(budget, dim=-1).indices.sort(dim=-1).values  # (1, heads, budget)
        expected = full.layers[layer_idx].keys.gather(2, top[..., None].expand(-1, -1, -1, 16))
        assert torch.equal(compressed.layers[layer_idx].keys, expected)


def test_allocation_follows_the_scores():
    model = tiny_model(layers=4)
    press = ComposePress(compression_ratio=0.5, scorer=LayerRankedScorer(layer0_shortest=True), layer_allocation="global")
    lengths = cache_layer_lengths(prefill(model, random_ids(1, 40), press))
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0], lengths  # deeper layers score higher


def test_scorer_scores_are_the_token_scores_on_one_scale_per_layer():
    model = tiny_model(layers=3)
    ids = random_ids(1, 40)
    full = prefill(model, ids)
    press = ComposePress(compression_ratio=0.5, scorer=KnormPress(), add_mean_across_heads=False)
    prefill(model, ids, press)
    knorm = torch.stack([-layer.keys.norm(dim=-1) for layer in full.layers])  # (layers, batch, heads, n)
    shifted = knorm - knorm.amin(dim=-1, keepdim=True)
    torch.testing.assert_close(press.last_scores, shifted / shifted.sum(dim=-1, keepdim=True))


def test_a_scorer_scaled_differently_per_layer_gets_the_same_budgets():
    """Global allocation compares layers: a scorer whose scale alone differs by layer (as ExpectedAttention's
    value norms do) must not move the budget between layers."""

    class ScaledByLayer(KnormPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            return super().score(module, hidden_states, keys, values, attentions, kwargs) * 1000.0**module.layer_idx

    model = tiny_model(layers=3)
    ids = random_ids(1, 40)
    plain = ComposePress(compression_ratio=0.5, scorer=KnormPress())
    scaled = ComposePress(compression_ratio=0.5, scorer=ScaledByLayer())
    prefill(model, ids, plain)
    prefill(model, ids, scaled)
    assert scaled.last_budgets.tolist() == plain.last_budgets.tolist()
    torch.testing.assert_close(scaled.last_scores, plain.last_scores)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"compression_ratio": 1.0}, ValueError, "compression_ratio"),
        ({"compression_ratio": -0.1}, ValueError, "compression_ratio"),
        ({"compression_ratio": "0.5"}, TypeError, "compression_ratio"),
        ({"query_source": "future"}, ValueError, "query_source"),
        ({"agg_task": "median"}, ValueError, "agg_task"),
        ({"agg_group": "sum"}, ValueError, "agg_group"),
        ({"agg_head": "min"}, ValueError, "agg_head"),
        ({"scorer": ComposePress()}, TypeError, "scorer"),
        ({"min_tokens_per_layer": 0}, ValueError, "min_tokens_per_layer"),
        ({"min_tokens_per_layer": True}, ValueError, "min_tokens_per_layer"),
        ({"score_block_size": 0}, ValueError, "score_block_size"),
        ({"score_block_size": -4}, ValueError, "score_block_size"),
        ({"score_block_size": 2.5}, ValueError, "score_block_size"),
        ({"score_block_size": "16"}, ValueError, "score_block_size"),
        ({"structured": "False"}, TypeError, "structured"),
        ({"add_v_norm": 1}, TypeError, "add_v_norm"),
        ({"add_mean_across_heads": None}, TypeError, "add_mean_across_heads"),
        ({"n_sink": -1}, ValueError, "n_sink"),
        ({"n_sink": 2.0}, ValueError, "n_sink"),
        ({"layer_floor": 1.5}, ValueError, "layer_floor"),
        ({"layer_floor": "0.5"}, TypeError, "layer_floor"),
        ({"layer_allocation": "normalized"}, ValueError, "layer_allocation"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, words):
    with pytest.raises(error, match=words):
        ComposePress(**kwargs)


def test_numpy_ratios_are_accepted():
    assert ComposePress(compression_ratio=np.float32(0.5)).compression_ratio == 0.5


def test_a_minimum_above_the_ratio_keeps_the_minimum_and_says_so(caplog):
    press = ComposePress(compression_ratio=0.5, query_source="prefill", min_tokens_per_layer=30)
    with caplog.at_level("WARNING", logger="kvpress_compose.compose_press"):
        cache = prefill(tiny_model(layers=3), random_ids(1, 40), press)
    assert cache_layer_lengths(cache) == [30, 30, 30]
    assert "min_tokens_per_layer=30 over 3 layers keeps 90 composite tokens, more than the 60" in caplog.text


def test_context_shorter_than_the_minimum_is_refused():
    press = ComposePress(compression_ratio=0.5, query_source="prefill", min_tokens_per_layer=20)
    with pytest.raises(ValueError, match="min_tokens_per_layer"):
        prefill(tiny_model(), random_ids(1, 10), press)


def test_prefill_without_a_cache_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="past_key_values"), ComposePress(compression_ratio=0.5)(model):
        model.model(input_ids=random_ids(1, 10), use_cache=False)


def test_models_without_attention_layers_or_rotary_are_refused():
    class NoLayers(torch.nn.Module):
        model = torch.nn.Module()

    with pytest.raises(ValueError, match="self_attn"), ComposePress(compression_ratio=0.5)(NoLayers()):
        pass
    with pytest.raises(ValueError, match="whole model"), ComposePress(compression_ratio=0.5)(tiny_model().model):
        pass
    model = tiny_model()
    model.model.rotary_emb = None
    with pytest.raises(ValueError, match="rotary"), ComposePress(compression_ratio=0.5)(model):
        pass


def test_unstructured_on_eager_is_refused():
    with pytest.raises(ValueError, match="eager"), ComposePress(0.5, structured=False)(tiny_model(attn="eager")):
        pass


def test_a_second_prefill_into_a_new_cache_starts_clean():
    model = tiny_model(layers=3)
    press = ComposePress(compression_ratio=0.5, query_source="prefill")
    prefill(model, random_ids(1, 40), press)
    # the next, uncompressed prefill on a fresh cache sees full causal attention again
    cache = DynamicCache()
    with torch.no_grad():
        logits = model(random_ids(1, 20, seed=5), past_key_values=cache).logits
        reference = model(random_ids(1, 20, seed=5)).logits
    assert torch.equal(logits, reference)


@pytest.mark.parametrize("query_source", ["prefill", "bidirectional", "replay"])
def test_a_prefill_with_gradients_enabled_compresses_as_under_no_grad(query_source):
    """Scoring runs without autograd whatever the caller's mode: same budgets and scores as under no_grad."""
    model, ids = tiny_model(), random_ids(1, 40)
    results = []
    for grad in (False, True):
        press, cache = ComposePress(compression_ratio=0.5, query_source=query_source), DynamicCache()
        with torch.set_grad_enabled(grad), press(model):
            model.model(input_ids=ids, past_key_values=cache)
        results.append((cache_layer_lengths(cache), press.last_scores))
    assert results[1][0] == results[0][0] and sum(results[1][0]) == compute_n_kept(3 * 40, 0.5)
    torch.testing.assert_close(results[1][1], results[0][1])


def test_uniform_layer_allocation_keeps_the_same_number_in_every_layer():
    model, ids = tiny_model(layers=4), random_ids(1, 50)
    uniform = ComposePress(0.6, query_source="bidirectional", layer_allocation="uniform")
    cache = prefill(model, ids, uniform)
    assert cache_layer_lengths(cache) == [compute_n_kept(4 * 50, 0.6) // 4] * 4 == [20] * 4
    global_press = ComposePress(0.6, query_source="bidirectional", layer_allocation="global")
    prefill(model, ids, global_press)
    assert len(set(global_press.last_budgets.tolist())) > 1  # the global allocation does differ per layer here


def test_shared_positions_keep_the_same_positions_in_every_head():
    model, ids = tiny_model(layers=3, heads=4, kv_heads=2), random_ids(1, 50)
    shared = prefill(model, ids, ComposePress(0.5, query_source="prefill", composite_tokens=False))
    full_cache = prefill(model, ids)
    per_head = prefill(model, ids, ComposePress(0.5, query_source="prefill"))
    heads_differ = False
    for layer, (kept, composite, full) in enumerate(zip(shared.layers, per_head.layers, full_cache.layers)):
        # which full-cache position each kept key is (RoPE makes every position's key distinct)
        positions = (kept.keys[:, :, :, None] == full.keys[:, :, None]).all(-1).int().argmax(-1)  # (b, h, k)
        assert torch.equal(positions[:, 0], positions[:, 1]), layer
        composite_positions = (composite.keys[:, :, :, None] == full.keys[:, :, None]).all(-1).int().argmax(-1)
        heads_differ |= not torch.equal(composite_positions[:, 0], composite_positions[:, 1])
    assert heads_differ  # composite tokens do pick per-head positions on this model


def test_ablations_apply_to_the_structured_press_only():
    with pytest.raises(ValueError, match="structured press only"):
        ComposePress(0.5, structured=False, layer_allocation="global_normalized")
    with pytest.raises(ValueError, match="structured press only"):
        ComposePress(0.5, structured=False, composite_tokens=False)
    # per-head budgets: "uniform" (the default) gives every layer the same budget, "global" one for the model
    model, ids = tiny_model(layers=4), random_ids(1, 50)
    for allocation in ("uniform", "global"):
        press = ComposePress(0.6, query_source="bidirectional", structured=False, layer_allocation=allocation)
        prefill(model, ids, press)
        per_layer = press.last_budgets.sum(dim=-1)[0].tolist()  # (batch, layers, heads) -> tokens per layer
        assert sum(per_layer) == compute_n_kept(4 * 2 * 50, 0.6) or allocation == "uniform"
        if allocation == "uniform":
            assert per_layer == [compute_n_kept(2 * 50, 0.6)] * 4
    with pytest.raises(ValueError, match="structured press only"):
        ComposePress(0.5, structured=False, layer_floor=0.5)


@pytest.mark.parametrize("layer_allocation", ["global", "global_normalized", "uniform"])
def test_sinks_are_kept_in_every_head_of_every_layer(layer_allocation):
    model, ids = tiny_model(layers=4), random_ids(1, 50)
    press = ComposePress(0.9, query_source="bidirectional", layer_allocation=layer_allocation, n_sink=3)
    cache = prefill(model, ids, press)
    full = prefill(model, ids)
    assert sum(cache_layer_lengths(cache)) == compute_n_kept(4 * 50, 0.9)
    for kept, full_layer in zip(cache.layers, full.layers):
        torch.testing.assert_close(kept.keys[:, :, :3], full_layer.keys[:, :, :3])
    assert torch.isinf(press.last_scores[..., :3]).all() and torch.isfinite(press.last_scores[..., 3:]).all()


def test_layer_floor_gives_every_layer_its_share_of_the_uniform_budget():
    model, ids = tiny_model(layers=4), random_ids(1, 50)
    plain = ComposePress(0.6, query_source="bidirectional", layer_allocation="global")
    prefill(model, ids, plain)
    assert int(plain.last_budgets.min()) < 18  # the global allocation gives a layer 13 on this model
    floored = ComposePress(0.6, query_source="bidirectional", layer_floor=0.9, layer_allocation="global")
    prefill(model, ids, floored)
    assert int(floored.last_budgets.min()) >= 18 == int(0.9 * (compute_n_kept(4 * 50, 0.6) // 4))
    assert int(floored.last_budgets.sum()) == compute_n_kept(4 * 50, 0.6)


def test_score_pooling_ranks_each_head_by_its_pooled_scores():
    from kvpress_compose.compression import pooled_scores

    model, ids = tiny_model(layers=4), random_ids(1, 50)
    plain = ComposePress(0.6, query_source="bidirectional", layer_allocation="uniform")
    prefill(model, ids, plain)
    pooled = ComposePress(0.6, query_source="bidirectional", layer_allocation="uniform", score_pooling=5)
    prefill(model, ids, pooled)
    torch.testing.assert_close(pooled.last_scores, pooled_scores(plain.last_scores, 5))
    assert not torch.equal(pooled.last_scores, plain.last_scores)


def test_shared_allocation_keeps_the_same_positions_in_every_layer_and_head():
    from kvpress_compose.compression import rank_tokens, shared_ranking

    model, ids = tiny_model(layers=4), random_ids(1, 50)
    global_press = ComposePress(0.6, query_source="bidirectional", layer_allocation="global")
    full = prefill(model, ids, global_press)  # its last_scores: every layer's and head's enhanced scores
    shared = ComposePress(0.6, query_source="bidirectional", layer_allocation="shared")
    cache, full = prefill(model, ids, shared), prefill(model, ids)
    budget = compute_n_kept(4 * 50, 0.6) // 4
    assert shared.last_budgets.tolist() == [budget] * 4
    order = rank_tokens(shared_ranking(global_press.last_scores))[1]  # equal percentiles: position order
    expected = order[0, 0, 0, :budget].sort().values
    for kept, full_layer in zip(cache.layers, full.layers):
        for head in range(kept.keys.shape[1]):
            torch.testing.assert_close(kept.keys[0, head], full_layer.keys[0, head, expected])


def test_pooling_and_shared_allocation_are_checked():
    with pytest.raises(ValueError, match="score_pooling must be an odd int"):
        ComposePress(0.5, score_pooling=4)
    with pytest.raises(ValueError, match="score_pooling must be an odd int"):
        ComposePress(0.5, score_pooling=0)
    with pytest.raises(ValueError, match="structured press only"):
        ComposePress(0.5, structured=False, layer_allocation="shared")


def test_normalised_allocation_is_the_global_top_k_of_each_heads_shares():
    from kvpress_compose.compression import composite_scores, layer_budgets, per_head_shares, rank_tokens

    model, ids = tiny_model(layers=4), random_ids(1, 50)
    press = ComposePress(0.6, query_source="bidirectional", layer_allocation="global_normalized")
    prefill(model, ids, press)
    shares = composite_scores(per_head_shares(rank_tokens(press.last_scores)[0]), "mean")
    assert press.last_budgets.tolist() == layer_budgets(shares, compute_n_kept(4 * 50, 0.6), 1).tolist()


def test_a_new_query_source_is_one_class(monkeypatch):
    from kvpress_compose import QUERY_SOURCES, QuerySource

    class KeyNorm(QuerySource):
        def score_layer(self, run, module, keys, values, attentions, kwargs):
            run.scores[module.layer_idx] = keys.float().norm(dim=-1)

        def layer_scores(self, run, layer_idx):
            return run.scores[layer_idx]

    monkeypatch.setitem(QUERY_SOURCES, "key_norm", KeyNorm)
    model, ids = tiny_model(layers=2), random_ids(1, 30)
    press = ComposePress(0.5, query_source="key_norm", add_mean_across_heads=False)
    cache, full = prefill(model, ids, press), prefill(model, ids)
    for layer, (kept, budget) in enumerate(zip(cache.layers, press.last_budgets.tolist())):
        norms = full.layers[layer].keys.norm(dim=-1)  # (1, kv_heads, n): each head keeps its largest norms
        expected = norms.topk(budget, dim=-1).indices.sort(dim=-1).values
        positions = (kept.keys[:, :, :, None] == full.layers[layer].keys[:, :, None]).all(-1).int().argmax(-1)
        assert torch.equal(positions, expected)


def test_replay_and_compression_wait_for_the_prefill_forward_to_end(monkeypatch):
    """The replay pass runs once the prefill's decoder call has returned (its last layer and final norm done, its
    activations freed), and a prefill whose forward fails after every layer was scored is not compressed."""
    from kvpress_compose import replay

    model = tiny_model(layers=3)
    events = []
    model.model.norm.register_forward_hook(lambda *args: events.append("final norm"))
    original = replay.run_replay
    monkeypatch.setattr("kvpress_compose.query_sources.run_replay",
                        lambda *args: events.append("replay") or original(*args))
    press = ComposePress(compression_ratio=0.5, query_source="replay")
    cache = prefill(model, random_ids(1, 40), press)
    assert events == ["final norm", "replay"] and sum(cache_layer_lengths(cache)) == compute_n_kept(3 * 40, 0.5)

    def fail(*args):
        raise RuntimeError("after the last layer")

    model.model.norm.register_forward_hook(fail)
    cache = DynamicCache()
    with pytest.raises(RuntimeError, match="after the last layer"):
        prefill(model, random_ids(1, 40), press, cache=cache)
    assert cache_layer_lengths(cache) == [40, 40, 40] and not press.in_prefill
