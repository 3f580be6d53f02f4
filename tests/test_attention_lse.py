"""The log-sum-exp path: the wrapped sdpa gives sdpa's output and the true log-sum-exp, and scores computed
from it equal the softmax path's (eager attention, which never captures)."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvpress_compose import ComposePress, attention_scores, query_sources
from tests.models import prefill, quantized_cache, random_ids, tiny_model


class Attention(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def test_wrapped_sdpa_matches_sdpa_and_returns_the_log_sum_exp():
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    visible = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    visible[1, :, :, :3] = False  # row 1: three padding keys (its first three queries see nothing)
    module = Attention()
    wrapped = attention_scores.wrap_sdpa(sdpa_attention_forward)
    for mask in (None, visible):
        expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
        capture = attention_scores.LseCapture([module]).__enter__()
        output, _ = wrapped(module, query, key, value, mask, scaling=0.3)
        torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-5)
        logits = 0.3 * query @ key.repeat_interleave(2, dim=1).transpose(-1, -2)
        hidden = ~visible if mask is not None else ~visible[:1]
        expected_lse = logits.masked_fill(hidden, float("-inf")).logsumexp(dim=-1)
        lse, attended_queries, attended_keys, scale = capture.take(module, 2, 9)
        seeing = visible.any(dim=-1) if mask is not None else torch.ones(1, 1, 9, dtype=torch.bool)
        seeing = seeing.expand(2, 4, 9)
        torch.testing.assert_close(lse[seeing], expected_lse.expand(2, 4, 9)[seeing], atol=1e-5, rtol=1e-5)
        assert attended_keys is key and attended_queries is query and scale == 0.3
        assert capture.take(module, 2, 9) is None  # taken once
        capture.__exit__(None, None, None)
        assert module not in attention_scores.ACTIVE_CAPTURES


KERNEL_CASES = [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)]  # dtype, kernel has GQA
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize(("dtype", "kernel_has_gqa"), KERNEL_CASES)
def test_prefix_and_causal_attention_equals_masked_attention(dtype, kernel_has_gqa, monkeypatch):
    """The replay pass's attention as two unmasked calls: every query sees 7 prefix keys, then 5 keys causally
    (torch < 2.9 has no GQA in the kernel: the keys are repeated)."""
    monkeypatch.setattr(attention_scores, "KERNEL_HAS_GQA", kernel_has_gqa)
    torch.manual_seed(0)
    query, key, value = (torch.randn(shape).to(dtype) for shape in [(2, 4, 5, 8), (2, 2, 12, 8), (2, 2, 12, 8)])
    visible = torch.ones(5, 12, dtype=torch.bool)
    visible[:, 7:] = torch.ones(5, 5, dtype=torch.bool).tril()
    output, lse = attention_scores.prefix_and_causal_attention(query, key, value, 7, scale=0.3)
    expected, _ = sdpa_attention_forward(Attention(), query, key, value, visible[None, None].expand(2, 1, 5, 12),
                                         scaling=0.3)
    assert output.dtype == dtype
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(output.transpose(1, 2), expected, atol=tolerance, rtol=tolerance)
    logits = 0.3 * query.float() @ key.float().repeat_interleave(2, dim=1).transpose(-1, -2)
    expected_lse = logits.masked_fill(~visible, float("-inf")).logsumexp(dim=-1)
    torch.testing.assert_close(lse, expected_lse, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("own_key_dominates", [False, True])
@pytest.mark.parametrize(("dtype", "kernel_has_gqa"), KERNEL_CASES)
def test_bidirectional_lse_is_the_log_sum_exp_over_every_valid_key(own_key_dominates, dtype, kernel_has_gqa,
                                                                  monkeypatch):
    monkeypatch.setattr(attention_scores, "KERNEL_HAS_GQA", kernel_has_gqa)
    torch.manual_seed(0)
    queries, keys = torch.randn(2, 4, 30, 8).to(dtype), torch.randn(2, 2, 30, 8).to(dtype)
    if own_key_dominates:  # later keys add almost nothing next to a query's own key: the subtraction's worst case
        keys = 6 * queries[:, ::2]
    key_valid = torch.ones(2, 30, dtype=torch.bool)
    key_valid[1, :4] = key_valid[1, -3:] = False  # left and right padding on row 1
    logits = 0.3 * queries.float() @ keys.float().repeat_interleave(2, dim=1).transpose(-1, -2)
    causal = logits.masked_fill(torch.ones(30, 30, dtype=torch.bool).triu(1) | ~key_valid[:, None, None], float("-inf"))
    captured = attention_scores.Captured(causal.logsumexp(dim=-1), queries, keys, 0.3)
    lse = attention_scores.bidirectional_lse(captured, key_valid)
    expected = logits.masked_fill(~key_valid[:, None, None], float("-inf")).logsumexp(dim=-1)
    queries_valid = key_valid[:, None].expand(2, 4, 30)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(lse[queries_valid], expected[queries_valid], atol=tolerance, rtol=tolerance)


def test_wrapped_sdpa_passes_through_when_not_capturing_or_when_the_causal_mask_is_implicit_and_not_square():
    module = Attention()
    wrapped = attention_scores.wrap_sdpa(lambda *args, **kwargs: ("original", args[5], kwargs))
    query, key = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 5, 8)
    assert wrapped(module, query, key, key, None, 0.0, scaling=2.0) == ("original", 0.0, {"scaling": 2.0})
    with attention_scores.LseCapture([module]) as capture:
        assert wrapped(module, query, key, key, None, 0.0)[0] == "original"  # top-left causal would be wrong
        assert module not in capture.captured


def scores_and_lse_calls(attn, ids, monkeypatch, attention_mask=None, **press_kwargs):
    calls, split_calls = [], []
    original = query_sources.statistics_from_lse
    monkeypatch.setattr(query_sources, "statistics_from_lse",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    original_split = attention_scores.prefix_and_causal_attention
    monkeypatch.setattr(attention_scores, "prefix_and_causal_attention",
                        lambda *args, **kwargs: split_calls.append(1) or original_split(*args, **kwargs))
    model = tiny_model(attn=attn)
    press = ComposePress(compression_ratio=0.5, add_mean_across_heads=False, **press_kwargs)
    prefill(model, ids, press, attention_mask=attention_mask)
    assert not any(layer.self_attn in attention_scores.ACTIVE_CAPTURES for layer in model.model.layers)
    assert not press.in_prefill
    return press.last_scores, len(calls), len(split_calls)


@pytest.mark.parametrize("query_source", ["prefill", "bidirectional", "replay"])
@pytest.mark.parametrize("agg_task", ["max", "mean"])
@pytest.mark.parametrize("padding", [None, slice(0, 5), slice(690, 700)])
def test_log_sum_exp_scores_equal_softmax_scores(query_source, agg_task, padding, monkeypatch):
    ids = random_ids(2, 700)  # more than one tile of keys and of queries
    mask = torch.ones(2, 700, dtype=torch.long)
    if padding is not None:  # left or right padding on row 1
        mask[1, padding] = 0
    kwargs = {"query_source": query_source, "agg_task": agg_task}
    expected, softmax_calls, _ = scores_and_lse_calls("eager", ids, monkeypatch, mask, **kwargs)
    actual, lse_calls, split_calls = scores_and_lse_calls("sdpa", ids, monkeypatch, mask, **kwargs)
    layers, replay_chunks = 3, 3  # 700 re-fed tokens in chunks of 256
    assert softmax_calls == 0 and lse_calls == layers * (replay_chunks if query_source == "replay" else 1)
    # unpadded replay attends in two unmasked calls (prefix, causal rest); padded replay reads the mask
    assert split_calls == (layers * replay_chunks if query_source == "replay" and padding is None else 0)
    assert torch.isneginf(actual[:, 1, :, ~mask[1].bool()]).all()
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)


def test_replay_on_a_sliding_window_model_falls_back_to_the_softmax_path(monkeypatch):
    """With n <= window < 2n the window hides early context keys from late re-fed queries: the captured
    log-sum-exp would not cover keys that scoring assumes visible, so replay computes its own softmax."""
    ids = random_ids(1, 40)
    scores = {}
    for attn in ("eager", "sdpa"):
        model = tiny_model(family="mistral", attn=attn)
        model.config.sliding_window = 48
        press = ComposePress(compression_ratio=0.5, query_source="replay", add_mean_across_heads=False)
        prefill(model, ids, press)
        scores[attn] = press.last_scores
    torch.testing.assert_close(scores["sdpa"], scores["eager"], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("query_source", ["prefill", "bidirectional"])
def test_scores_use_the_keys_attention_saw_even_when_the_cache_stores_others(query_source):
    """A 4-bit QuantizedCache stores other keys than the prefill attended to: the scores are still the
    attention probabilities of the prefill (max <= 1), identical to those over a DynamicCache."""
    pytest.importorskip("optimum.quanto")
    from transformers import DynamicCache

    model, ids = tiny_model(), random_ids(1, 64)
    scores = {}
    for name in ("dynamic", "quantized"):
        cache = DynamicCache() if name == "dynamic" else quantized_cache(model)
        press = ComposePress(compression_ratio=0.5, query_source=query_source, add_mean_across_heads=False)
        prefill(model, ids, press, cache=cache)
        scores[name] = press.last_scores
    assert scores["quantized"].max() <= 1.0
    torch.testing.assert_close(scores["quantized"], scores["dynamic"])


def test_an_error_inside_composed_press_leaves_no_capture_behind():
    from kvpress import ComposedPress

    model = tiny_model()
    press = ComposePress(compression_ratio=0.5, query_source="prefill", min_tokens_per_layer=100)
    with pytest.raises(ValueError, match="min_tokens_per_layer"):
        prefill(model, random_ids(1, 50), ComposedPress([press]))
    assert not any(layer.self_attn in attention_scores.ACTIVE_CAPTURES for layer in model.model.layers)
    assert press._attachment is None and not press.in_prefill
    with torch.no_grad():
        model(random_ids(1, 20))
    assert not any(layer.self_attn in attention_scores.ACTIVE_CAPTURES for layer in model.model.layers)


def test_attention_that_would_read_a_placeholder_mask_raises():
    """In a single-pass replay the mask is a placeholder: a call that does not take the split must fail."""
    wrapped = attention_scores.wrap_sdpa(lambda *args, **kwargs: "original")
    query, key = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 6, 8)
    placeholder = torch.ones((), dtype=torch.bool).expand(1, 1, 3, 6)
    module = Attention()
    with attention_scores.LseCapture([module]) as capture:
        capture.declare_visible_prefix(2, mask_ignored=True)  # 6 - 2 != 3 queries: no split
        with pytest.raises(RuntimeError, match="placeholder mask"):
            wrapped(module, query, key, key, placeholder, 0.0)
        module.masked_key_indices = (torch.zeros(1, dtype=torch.long),) * 3  # no capture: the original sdpa
        with pytest.raises(RuntimeError, match="placeholder mask"):
            wrapped(module, query, key, key, placeholder, 0.0)
        module.masked_key_indices = None
        capture.declare_visible_prefix(3, mask_ignored=True)
        output, _ = wrapped(module, query, key, key, placeholder, 0.0)
    assert output.shape == (1, 3, 4, 8)


KV_HEAVY = {"layers": 6, "heads": 4, "kv_heads": 4}  # 768 KV values per token against 3 x 96 + 4 x 64 = 544


@pytest.mark.parametrize(("attn", "padded", "shape", "single_pass"), [
    ("sdpa", False, KV_HEAVY, True), ("sdpa", False, {}, False), ("sdpa", True, KV_HEAVY, False),
    ("eager", False, KV_HEAVY, False),
])
def test_replay_keeps_re_fed_tokens_only_when_it_runs_in_chunks(attn, padded, shape, single_pass, monkeypatch):
    """One unmasked pass where every layer takes the split (sdpa on CPU, no padding) and the KV cache outweighs
    a layer's activations: no re-fed keys or values are kept between layers; chunks keep them for later chunks."""
    from kvpress_compose import replay

    kept = []  # re-fed tokens' layers held after each layer's update
    original_update = replay.ReplayCache.update

    def update(self, *args, **kwargs):
        result = original_update(self, *args, **kwargs)
        kept.append(len(self._refed))
        return result

    monkeypatch.setattr(replay.ReplayCache, "update", update)
    model = tiny_model(attn=attn, **({"layers": 3} | shape))
    layers = model.config.num_hidden_layers
    mask = torch.ones(1, 600, dtype=torch.long)
    mask[0, :3] = 0 if padded else 1
    prefill(model, random_ids(1, 600), ComposePress(0.5, query_source="replay"), attention_mask=mask)
    assert len(kept) == layers * (1 if single_pass else 3)  # one pass, or chunks of 256 re-fed tokens
    assert max(kept) == (0 if single_pass else layers)


def test_replay_chunks_are_bounded_by_activations_where_no_mask_is_built():
    """A built mask is (chunk x 2 context): at 32k tokens a quarter of a 64 MiB cache allows the smallest chunk.
    Without one, a chunk is bounded by one layer's activations (8 KiB a token: 2048 tokens per 16 MiB)."""
    from kvpress_compose.replay import MAX_REPLAY_CHUNK, MIN_REPLAY_CHUNK, replay_chunk_size

    assert replay_chunk_size(64 * 2**20, 32768) == MIN_REPLAY_CHUNK
    assert replay_chunk_size(64 * 2**20, 32768, 8192) == 2048
    assert replay_chunk_size(64 * 2**20, 32768, 1024) == MAX_REPLAY_CHUNK
    assert replay_chunk_size(2**20, 32768, 8192) == MIN_REPLAY_CHUNK


@pytest.mark.parametrize(("attn", "padded"), [("sdpa", False), ("sdpa", True), ("eager", False)])
def test_chunked_replay_builds_a_mask_only_where_attention_reads_it(attn, padded):
    """Chunks whose attention takes the unmasked split (sdpa on CPU, no padding) get a one-element placeholder
    mask; padding, or attention that reads masks, gets the context's mask extended over the chunk."""
    model = tiny_model(attn=attn, layers=3)
    masks = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")),
                                          with_kwargs=True)
    attention_mask = torch.ones(1, 600, dtype=torch.long)
    attention_mask[0, :3] = 0 if padded else 1
    prefill(model, random_ids(1, 600), ComposePress(0.5, query_source="replay"), attention_mask=attention_mask)
    replay_masks = masks[1:]
    assert len(replay_masks) == 3  # chunks of 256 re-fed tokens
    for start, mask in zip(range(0, 600, 256), replay_masks):
        end = min(start + 256, 600)
        if attn == "sdpa" and not padded:
            assert mask.shape == (1, 1, end - start, 600 + end) and mask.untyped_storage().nbytes() == 1
        else:
            assert torch.equal(mask, torch.cat([attention_mask, attention_mask[:, :end]], dim=-1))


@pytest.mark.parametrize("agg_task", ["max", "mean"])
def test_single_pass_replay_scores_equal_softmax_scores(agg_task, monkeypatch):
    ids = random_ids(2, 600)
    scores = {}
    for attn in ("eager", "sdpa"):
        model = tiny_model(attn=attn, **KV_HEAVY)
        press = ComposePress(compression_ratio=0.5, query_source="replay", agg_task=agg_task,
                             add_mean_across_heads=False)
        prefill(model, ids, press)
        scores[attn] = press.last_scores
    torch.testing.assert_close(scores["sdpa"], scores["eager"], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("padding", [None, slice(0, 5)])
def test_local_replay_scores_equal_on_both_paths_and_differ_from_replay(padding, monkeypatch):
    """Each re-fed chunk attends to the context and its own tokens only: the log-sum-exp path (the split with the
    context as prefix, or the mask) and eager's softmax agree, and the scores are not exact replay's."""
    ids = random_ids(2, 700)  # 3 chunks of 256 re-fed tokens
    mask = torch.ones(2, 700, dtype=torch.long)
    if padding is not None:
        mask[1, padding] = 0
    expected, softmax_calls, _ = scores_and_lse_calls("eager", ids, monkeypatch, mask, query_source="replay_local")
    actual, lse_calls, split_calls = scores_and_lse_calls("sdpa", ids, monkeypatch, mask, query_source="replay_local")
    assert softmax_calls == 0 and lse_calls == 3 * 3
    assert split_calls == (3 * 3 if padding is None else 0)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)
    exact, _, _ = scores_and_lse_calls("sdpa", ids, monkeypatch, mask, query_source="replay")
    assert not torch.allclose(actual, exact)
