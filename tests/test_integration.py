"""ComposePress wherever a kvpress press works: pipeline, generate, ComposedPress, scorers, batches, caches."""

import random

import pytest
import torch
from kvpress import (
    ComposedPress,
    DecodingPress,
    ExpectedAttentionPress,
    KeyRerotationPress,
    KnormPress,
    SnapKVPress,
    TOVAPress,
)
from transformers import DynamicCache, pipeline

from evaluation.tasks.word_tasks import build_tokenizer, make_sample, vocabulary
from kvpress_compose import ComposePress, compute_n_kept
from tests.models import cache_layer_lengths, prefill, quantized_cache, random_ids, tiny_model
from tests.reference import compressed_vs_reference, install_reference_masks, kept_from_cache, question_and_decode
from tests.test_exactness import LayerRankedScorer, assert_same_logits


def test_pipeline_answers_several_questions_from_one_compression():
    tokenizer = build_tokenizer()
    model = tiny_model(layers=3, vocab=len(vocabulary()))
    sample = make_sample("niah_multiquery", 120, random.Random(0))
    questions = sample.questions[:2]
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    press = ComposePress(compression_ratio=0.5, query_source="replay", layer_allocation="global")
    answers = pipe(sample.context, questions=questions, press=press, max_new_tokens=4)["answers"]
    # the same computation by hand: compress once, then each question from the same compressed cache
    context_ids = tokenizer.encode("<s>" + sample.context, add_special_tokens=False, return_tensors="pt")
    cache = prefill(model, context_ids, ComposePress(compression_ratio=0.5, query_source="replay", layer_allocation="global"))
    assert sum(cache_layer_lengths(cache)) == compute_n_kept(3 * context_ids.shape[1], 0.5)
    lengths = cache_layer_lengths(cache)
    for question, answer in zip(questions, answers):
        question_ids = tokenizer.encode(question + "\n", add_special_tokens=False, return_tensors="pt")
        logits, tokens = question_and_decode(model, cache, question_ids, context_ids.shape[1], 3)
        expected = [t[0, 0] for t in tokens] + [logits[-1][0, -1].argmax()]
        assert answer == tokenizer.decode(torch.stack(expected), skip_special_tokens=True)
        for layer, length in zip(cache.layers, lengths):  # crop back, as the pipeline does
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]


def test_pipeline_with_ratio_zero_matches_no_press():
    tokenizer = build_tokenizer()
    model = tiny_model(layers=2, vocab=len(vocabulary()))
    sample = make_sample("niah_single", 80, random.Random(1))
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    plain = pipe(sample.context, question=sample.questions[0], max_new_tokens=5)["answer"]
    pressed = pipe(sample.context, question=sample.questions[0], press=ComposePress(0.0), max_new_tokens=5)
    assert pressed["answer"] == plain


def test_generate_compresses_after_prefill_and_decodes_from_the_compressed_cache():
    model = tiny_model(layers=3)
    model.generation_config.eos_token_id = None
    ids = random_ids(1, 40)
    cache = DynamicCache()
    press = ComposePress(compression_ratio=0.5, query_source="replay", layer_allocation="global")
    with torch.no_grad(), press(model):
        generated = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    budgets = press.last_budgets.tolist()
    assert cache_layer_lengths(cache) == [b + 4 for b in budgets]  # the 5th token is not cached yet
    # by hand: the first token comes from the (uncompressed) prefill logits, the rest from the compressed cache
    manual_cache = DynamicCache()
    with torch.no_grad(), ComposePress(compression_ratio=0.5, query_source="replay", layer_allocation="global")(model):
        first = model(ids, past_key_values=manual_cache).logits[:, -1:].argmax(-1)
    logits, tokens = question_and_decode(model, manual_cache, first, 40, 3)
    manual = [first] + tokens + [logits[-1][:, -1:].argmax(-1)]
    assert generated[0, 40:].tolist() == torch.cat(manual, dim=1)[0].tolist()


def left_padding_mask(padding: int, length: int = 40) -> torch.Tensor:
    """(2, length) mask: row 0 full, row 1 left-padded by ``padding``."""
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :padding] = 0
    return mask


def padded_batch_caches(model, press, padding: int):
    """Compressed and full caches of a 2-row batch whose second row is left-padded, and the kept masks."""
    ids, mask = random_ids(2, 40), left_padding_mask(padding)
    compressed = prefill(model, ids, press, attention_mask=mask)
    full = prefill(model, ids, attention_mask=mask)
    return compressed, full, kept_from_cache(full, compressed)


@pytest.mark.parametrize("chunk", [None, 11])
def test_left_padded_batch_never_keeps_padding_and_matches_the_reference(chunk, monkeypatch):
    if chunk:  # the replay pass in several chunks
        monkeypatch.setattr("kvpress_compose.replay.MIN_REPLAY_CHUNK", chunk)
        monkeypatch.setattr("kvpress_compose.replay.MAX_REPLAY_CHUNK", chunk)
    model = tiny_model(layers=3)
    press = ComposePress(compression_ratio=0.5, query_source="replay", layer_allocation="global")
    compressed, full, kept = padded_batch_caches(model, press, padding=8)
    for layer_idx, (layer_kept, budget) in enumerate(zip(kept, press.last_budgets.tolist())):
        assert not layer_kept[1, :, :8].any(), "padding must never be kept"
        assert (layer_kept.sum(dim=-1) == budget).all(), "every row and head keeps the layer's budget"
        top = press.last_scores[layer_idx].topk(budget, dim=-1).indices
        assert torch.equal(torch.zeros_like(layer_kept).scatter_(-1, top, True), layer_kept)
    question = random_ids(2, 4, seed=3)
    compressed_logits, tokens = question_and_decode(model, compressed, question, 40, 3)
    handles = install_reference_masks(model, kept, 40)
    try:
        reference, _ = question_and_decode(model, full, question, 40, 3, tokens)
    finally:
        for handle in handles:
            handle.remove()
    assert_same_logits(compressed_logits, reference)


def test_composed_press_with_compose_press_last():
    model = tiny_model(layers=3)
    press = ComposedPress([KnormPress(compression_ratio=0.25), ComposePress(0.5, query_source="bidirectional", layer_allocation="global")])
    cache = prefill(model, random_ids(1, 40), press)
    assert sum(cache_layer_lengths(cache)) == compute_n_kept(3 * 30, 0.5)
    assert press.compression_ratio == pytest.approx(1 - 0.75 * 0.5)


@pytest.mark.parametrize(
    "presses, words",
    [
        (lambda: [ComposePress(0.5, query_source="bidirectional", layer_allocation="global"), KnormPress(0.25)], "last"),
        (lambda: [KnormPress(0.25), ComposePress(0.5, query_source="prefill", layer_allocation="global")], "bidirectional"),
    ],
)
def test_composed_press_in_an_unsupported_order_names_the_supported_one(presses, words):
    with pytest.raises(ValueError, match=words):
        prefill(tiny_model(layers=3), random_ids(1, 40), ComposedPress(presses()))


def test_wrapper_presses_refuse_compose_press_at_construction():
    with pytest.raises(AssertionError):
        KeyRerotationPress(press=ComposePress(0.5))
    with pytest.raises(AssertionError, match="ScorerPress"):
        DecodingPress(base_press=ComposePress(0.5))


@pytest.mark.parametrize("scorer", [SnapKVPress(window_size=8), ExpectedAttentionPress(), TOVAPress(), KnormPress()])
def test_any_scorer_gains_composite_tokens_and_global_allocation(scorer):
    model = tiny_model(layers=3)
    press = ComposePress(compression_ratio=0.5, scorer=scorer)
    compressed, reference, kept = compressed_vs_reference(model, random_ids(1, 40), press, random_ids(1, 5, seed=2))
    assert sum(int(k[0, 0].sum()) for k in kept) == compute_n_kept(3 * 40, 0.5)
    assert_same_logits(compressed, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_score_in_float32(dtype):
    model = tiny_model(layers=3, dtype=dtype)
    press = ComposePress(compression_ratio=0.5, query_source="replay", layer_allocation="global")
    compressed, reference, _ = compressed_vs_reference(model, random_ids(1, 40), press, random_ids(1, 5, seed=2))
    assert press.last_scores.dtype == torch.float32
    assert compressed[0].dtype == dtype
    for c, r in zip(compressed, reference):
        torch.testing.assert_close(c.float(), r.float(), atol=3e-2, rtol=3e-2)


def test_quantized_cache_is_compressed_with_different_layer_lengths():
    pytest.importorskip("optimum.quanto")
    model = tiny_model(layers=4)
    ids, question = random_ids(1, 40), random_ids(1, 5, seed=2)
    press = ComposePress(compression_ratio=0.5, scorer=LayerRankedScorer(), layer_allocation="global")
    cache = quantized_cache(model)
    prefill(model, ids, press, cache=cache)
    lengths = press.last_budgets.tolist()
    assert cache_layer_lengths(cache) == lengths and len(set(lengths)) == 4
    assert all(layer.keys.numel() == 0 for layer in cache.layers)  # everything kept is quantized
    dense = prefill(model, ids, ComposePress(compression_ratio=0.5, scorer=LayerRankedScorer(), layer_allocation="global"))
    quantized_logits, _ = question_and_decode(model, cache, question, 40, 0)
    dense_logits, _ = question_and_decode(model, dense, question, 40, 0)
    assert quantized_logits[0].shape == dense_logits[0].shape
    assert (quantized_logits[0] - dense_logits[0]).abs().max() < 0.25 * dense_logits[0].abs().max()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_heavily_padded_row_with_a_full_length_mask_matches_the_reference(attn):
    """generate() and batched question passes give a 2D mask spanning the original context; a row whose padding
    exceeds layer 0's kept length must still see its own later tokens."""
    model = tiny_model(attn=attn, layers=3)
    press = ComposePress(compression_ratio=0.5, query_source="bidirectional", layer_allocation="global")
    compressed, full, kept = padded_batch_caches(model, press, padding=30)
    context_mask = left_padding_mask(padding=30)
    assert min(press.last_budgets.tolist()) < 30
    question = random_ids(2, 4, seed=3)
    with torch.no_grad():
        mask = torch.cat([context_mask, torch.ones(2, 4, dtype=torch.long)], dim=1)
        positions = torch.arange(40, 44)[None].expand(2, -1)
        compressed_logits = model(question, past_key_values=compressed, attention_mask=mask, position_ids=positions)
        handles = install_reference_masks(model, kept, 40)
        try:
            reference = model(question, past_key_values=full, position_ids=positions)
        finally:
            for handle in handles:
                handle.remove()
    assert_same_logits([compressed_logits.logits], [reference.logits])


def test_generate_on_a_padded_batch_decodes_like_the_reference():
    model = tiny_model(layers=3)
    model.generation_config.eos_token_id = None
    ids = random_ids(2, 40)
    context_mask = left_padding_mask(padding=30)
    press = ComposePress(compression_ratio=0.5, query_source="bidirectional", layer_allocation="global")
    with torch.no_grad(), press(model):
        generated = model.generate(ids, attention_mask=context_mask, max_new_tokens=4, do_sample=False)
    # the padded row keeps all 10 of its tokens here, so it must decode like the row alone, uncompressed
    assert min(press.last_budgets.tolist()) >= 10
    with torch.no_grad():
        alone = model.generate(ids[1:, 30:], max_new_tokens=4, do_sample=False)
    assert generated[1, 40:].tolist() == alone[0, 10:].tolist()


def test_compose_press_first_with_replay_names_the_supported_order():
    press = ComposedPress([ComposePress(0.5, query_source="replay", layer_allocation="global"), KnormPress(0.25)])
    with pytest.raises(ValueError, match="last"):
        prefill(tiny_model(layers=3), random_ids(1, 40), press)


def test_sliding_window_caches_are_compressed_and_longer_contexts_refused():
    model = tiny_model("mistral", layers=3)
    model.config.sliding_window = 64
    cache = DynamicCache(config=model.config)
    press = ComposePress(compression_ratio=0.5, query_source="bidirectional", layer_allocation="global")
    prefill(model, random_ids(1, 40), press, cache=cache)
    assert cache_layer_lengths(cache) == press.last_budgets.tolist()
    logits, _ = question_and_decode(model, cache, random_ids(1, 5, seed=2), 40, 2)
    assert logits[0].shape == (1, 5, model.config.vocab_size)
    with pytest.raises(ValueError, match="sliding window"):  # the window's own length: its cache keeps one less
        prefill(model, random_ids(1, 64), press, cache=DynamicCache(config=model.config))


def test_composed_press_leaves_no_capture_hook_behind():
    model = tiny_model(layers=3)
    press = ComposedPress([KnormPress(0.25), ComposePress(0.5, query_source="bidirectional", layer_allocation="global")])
    prefill(model, random_ids(1, 40), press)
    assert len(model.model._forward_pre_hooks) == 1  # the permanent decoder mask hook only


def test_contexts_longer_than_an_attention_chunk_are_refused():
    """Chunked attention (Llama 4's attention_chunk_size) is local like a sliding window: past one chunk,
    scores over keys the queries never saw would be silently wrong. Its cache layers keep chunk - 1 tokens."""
    model = tiny_model(layers=2)
    model.config.attention_chunk_size = 64
    press = ComposePress(compression_ratio=0.5, query_source="prefill", layer_allocation="global")
    cache = DynamicCache(config=model.config)
    prefill(model, random_ids(1, 63), press, cache=cache)
    assert cache_layer_lengths(cache) == press.last_budgets.tolist()
    with pytest.raises(ValueError, match=r"attention chunk \(64 tokens, of which a cache keeps 63\)"):
        prefill(model, random_ids(1, 64), press, cache=DynamicCache(config=model.config))


@pytest.mark.parametrize(
    ("settings", "span"),
    [({}, None), ({"sliding_window": 128}, 128), ({"attention_chunk_size": 96}, 96),
     ({"sliding_window": 128, "attention_chunk_size": 96}, 96)],
)
def test_local_attention_span_is_the_smallest_window_set(settings, span):
    from transformers import PretrainedConfig

    from kvpress_compose.model_attachment import local_attention_span

    assert local_attention_span(PretrainedConfig(**settings)) == span
