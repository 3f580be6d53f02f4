"""Models with sliding-window layers: a hybrid model (Gemma 3) has its full-attention layers compressed and its
windowed layers left as its cache keeps them; a model whose every layer is windowed (Mistral's sliding_window)
is compressed while the context fits the window, then decodes past it exactly; what cannot work is refused."""

import pytest
import torch
from transformers import DynamicCache

from kvpress_compose import ComposeDecodingPress, ComposePress
from kvpress_compose.compression import compute_n_kept
from kvpress_compose.layer_masks import CHUNKED, SLIDING, LayerWindow, layer_windows, layers_to_compress
from tests.models import random_ids, tiny_model
from tests.test_exactness import assert_same_logits
from tests.windowed_reference import FULL, tiny_gemma3, windowed_compressed_vs_reference

ATTENTION = ["eager", "sdpa"]
SOURCES = ["prefill", "bidirectional", "replay", "replay_local"]
CACHES = {"sliding": lambda model: DynamicCache(config=model.config), "plain": lambda model: DynamicCache()}


def left_padded(batch, length, padding, seed=1):
    """``(ids, mask)``: row 1 left-padded by ``padding`` tokens."""
    ids = random_ids(batch, length, seed=seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :padding] = 0
    ids[1, :padding] = 0
    return ids, mask


def mistral_all_sliding(attn="sdpa", window=16, layers=3):
    model = tiny_model("mistral", attn=attn, layers=layers)
    model.config.sliding_window = window
    return model


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("query_source", SOURCES)
@pytest.mark.parametrize("cache", CACHES)
def test_gemma3_full_layers_compressed_windowed_left_and_logits_match_the_reference(attn, query_source, cache):
    """Context 24 > window 8: layers 1 and 3 (full) compressed, 0 and 2 (sliding) as the cache keeps them; batch 2
    with left padding; question then decode, logits equal the masked uncompressed model's."""
    model = tiny_gemma3(attn=attn)
    ids, mask = left_padded(2, 24, padding=5)
    press = ComposePress(compression_ratio=0.5, query_source=query_source)
    compressed_cache = CACHES[cache](model)
    compressed, reference, kept = windowed_compressed_vs_reference(
        model, ids, mask, press, random_ids(2, 4, seed=7), decode_steps=4, cache=compressed_cache)
    assert press.last_layers == [1, 3]
    held = [int(layer.keys.shape[2]) for layer in compressed_cache.layers]  # after 8 more tokens
    assert held[0] == held[2] == (7 if cache == "sliding" else 24 + 8)  # a sliding cache layer keeps window - 1
    assert [held[1] - 8, held[3] - 8] == press.last_budgets.tolist() == [int(k[0, 0].sum()) for k in kept[1::2]]
    assert sum(press.last_budgets.tolist()) == compute_n_kept(2 * 24, 0.5)  # row 1's 19 tokens bound no layer
    assert_same_logits(compressed, reference)


@pytest.mark.parametrize("attn", ATTENTION)
def test_gemma3_shared_allocation_keeps_one_token_set_in_every_full_layer_and_matches_the_reference(attn):
    """``layer_allocation="shared"`` with ``score_pooling``: each row keeps the same positions in both full layers
    (the same number each, none of them padding), and the logits equal the masked uncompressed model's."""
    model = tiny_gemma3(attn=attn)
    ids, mask = left_padded(2, 24, padding=5)
    press = ComposePress(compression_ratio=0.5, layer_allocation="shared", score_pooling=3)
    compressed, reference, kept = windowed_compressed_vs_reference(
        model, ids, mask, press, random_ids(2, 4, seed=7), decode_steps=4, cache=DynamicCache(config=model.config))
    assert press.last_layers == [1, 3] and press.last_budgets.tolist() == [12, 12]
    assert torch.equal(kept[1], kept[3]) and not kept[1][1, :, :5].any()
    assert [int(k.sum()) for k in kept[1][:, 0]] == [12, 12]
    assert_same_logits(compressed, reference)


@pytest.mark.parametrize("attn", ATTENTION)
def test_gemma3_with_a_full_first_layer_and_heavy_padding_matches_the_reference(attn):
    """Layer 0 compressed, layer 1 windowed: the 2D padding mask stays as given (the windowed layers read it at the
    original indices) and the later tokens' padding comes from its right end, even where a row's padding (14)
    exceeds a full layer's kept length."""
    model = tiny_gemma3(attn=attn, layer_types=(FULL, SLIDING, FULL, SLIDING))
    ids, mask = left_padded(2, 24, padding=14)
    press = ComposePress(compression_ratio=0.6, query_source="bidirectional")
    compressed, reference, _ = windowed_compressed_vs_reference(
        model, ids, mask, press, random_ids(2, 4, seed=7), decode_steps=4, cache=DynamicCache(config=model.config))
    assert press.last_layers == [0, 2] and min(press.last_budgets.tolist()) < 14
    assert_same_logits(compressed, reference)


def test_gemma3_budget_is_a_fraction_of_the_full_layers_entries():
    model = tiny_gemma3(layer_types=(SLIDING, SLIDING, FULL, SLIDING, FULL, SLIDING))
    press = ComposePress(compression_ratio=0.75, query_source="bidirectional")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model.model(input_ids=random_ids(1, 40), past_key_values=cache)
    assert press.last_layers == [2, 4]
    assert int(press.last_budgets.sum()) == compute_n_kept(2 * 40, 0.75) == 20
    assert [int(cache.layers[i].keys.shape[2]) for i in (0, 1, 3, 5)] == [7] * 4


def test_gemma3_prefill_through_the_base_model_then_question_and_generate_past_the_window():
    """The brief's check: ``with ComposePress(0.5)(model): model.model(ids, past_key_values=DynamicCache(config))``,
    question tokens, and generate past the window (a cache made by generate itself, too)."""
    model = tiny_gemma3(layer_types=(FULL, SLIDING, SLIDING, FULL))
    ids, question = random_ids(1, 24), random_ids(1, 5, seed=2)
    logits = []
    for positions in (None, torch.arange(24, 29)[None]):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), ComposePress(0.5)(model):
            model.model(ids, past_key_values=cache)  # ids given positionally
        with torch.no_grad():
            logits.append(model.model(question, past_key_values=cache, position_ids=positions).last_hidden_state)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-6, rtol=1e-5)  # positions from the original context
    model.generation_config.eos_token_id = None
    with torch.no_grad(), ComposePress(0.5)(model):
        generated = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert generated.shape == (1, 36)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("query_source", SOURCES)
@pytest.mark.parametrize("cache", CACHES)
def test_mistral_every_layer_windowed_decodes_past_the_window_like_the_reference(attn, query_source, cache):
    """Window 16, context 12 (fits: every layer compressed as a full one); question and decode reach index 27, so
    kept entries leave the window per head: logits equal the masked, windowed uncompressed model's (before, the
    sliding cache crashed and a plain cache showed every kept entry to later queries)."""
    model = mistral_all_sliding(attn=attn)
    ids, mask = left_padded(2, 12, padding=3)
    press = ComposePress(compression_ratio=0.5, query_source=query_source)
    compressed, reference, _ = windowed_compressed_vs_reference(
        model, ids, mask, press, random_ids(2, 5, seed=7), decode_steps=10, cache=CACHES[cache](model))
    assert_same_logits(compressed, reference)
    assert press.last_layers == [0, 1, 2]


@pytest.mark.parametrize("attn", ATTENTION)
def test_mistral_generate_past_the_window_runs_and_decodes_like_the_reference(attn):
    """The issue's crash: generate 12 new tokens after a 12-token context on window 16 (tensor a (16) vs b (17))."""
    model = mistral_all_sliding(attn=attn)
    model.generation_config.eos_token_id = None
    ids = random_ids(1, 12)
    press = ComposePress(compression_ratio=0.5, query_source="bidirectional")
    with torch.no_grad(), press(model):
        generated = model.generate(ids, max_new_tokens=12, do_sample=False)
    cache = DynamicCache(config=model.config)
    _, reference, _ = windowed_compressed_vs_reference(
        model, ids, torch.ones(1, 12, dtype=torch.long), press, generated[:, 12:13], decode_steps=11, cache=cache)
    assert generated[0, 13:].tolist() == [int(step[0, -1].argmax()) for step in reference][:11]


def test_replay_on_gemma3_sees_windowed_layers_as_the_model_does():
    """Replay's re-fed tokens pass the sliding layers as the model would (within the window, the dropped context
    entries out of reach): the full layers' scores equal the attention the second copy of the context pays the
    first when the model reads the context twice (eager attentions), with a sliding cache holding 7 of 24."""
    model = tiny_gemma3(attn="eager")
    ids = random_ids(2, 24)
    press = ComposePress(compression_ratio=0.5, query_source="replay", add_mean_across_heads=False,
                         layer_allocation="global")
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=DynamicCache(config=model.config))
    with torch.no_grad():
        attentions = model.model(input_ids=torch.cat([ids, ids], dim=1), output_attentions=True).attentions
    for row, layer_idx in enumerate(press.last_layers):
        probabilities = attentions[layer_idx][:, :, 24:, :24]  # (batch, heads, re-fed, context)
        expected = probabilities.amax(dim=2).view(2, 2, 2, 24).mean(dim=2)  # max over queries, mean over group
        torch.testing.assert_close(press.last_scores[row], expected, atol=1e-5, rtol=1e-4)


def test_every_layer_windowed_and_a_longer_context_is_refused_by_name():
    model = mistral_all_sliding(window=16)
    with pytest.raises(ValueError, match=r"sliding window \(16 tokens, of which a cache keeps 15\).*every layer"), \
            torch.no_grad(), ComposePress(0.5)(model):
        model.model(input_ids=random_ids(1, 16), past_key_values=DynamicCache())


def test_unstructured_on_a_model_whose_every_layer_is_windowed_is_refused():
    model = mistral_all_sliding()
    with pytest.raises(ValueError, match="structured=False"), torch.no_grad(), \
            ComposePress(0.5, structured=False)(model):
        model.model(input_ids=random_ids(1, 12), past_key_values=DynamicCache())


def test_unstructured_on_gemma3_masks_the_full_layers_only():
    model = tiny_gemma3()
    press = ComposePress(0.5, structured=False, query_source="bidirectional")
    with torch.no_grad(), press(model):
        model.model(input_ids=random_ids(1, 24), past_key_values=DynamicCache(config=model.config))
    assert press.last_budgets.shape == (1, 2, 2) and int(press.last_budgets.sum()) == compute_n_kept(2 * 2 * 24, 0.5)
    assert getattr(model.model.layers[0].self_attn, "masked_key_indices", None) is None
    assert model.model.layers[1].self_attn.masked_key_indices is not None


def test_decoding_press_compresses_the_full_layers_only():
    model = tiny_gemma3()
    press = ComposeDecodingPress(base_press=ComposePress(0.0), compression_interval=4, target_size=8)
    model.generation_config.eos_token_id = None
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model.generate(random_ids(1, 20), past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert press.base_press.last_layers == [1, 3]
    held = [int(layer.keys.shape[2]) for layer in cache.layers]
    # 8 new tokens: the first from the prefill, then 7 decode steps: 16 kept after the 4th, then 3 more each
    assert held[0] == held[2] == 7 and held[1] + held[3] == 2 * 8 + 2 * 3


def test_decoding_press_on_a_model_whose_every_layer_is_windowed_is_refused():
    with pytest.raises(ValueError, match="full-attention layers"), \
            ComposeDecodingPress(base_press=ComposePress(0.0))(mistral_all_sliding()):
        pass


@pytest.mark.parametrize(
    ("settings", "windows"),
    [({}, [None] * 3),
     ({"sliding_window": 8}, [LayerWindow(SLIDING, 8)] * 3),
     ({"attention_chunk_size": 8}, [LayerWindow(CHUNKED, 8)] * 3),
     ({"sliding_window": 8, "layer_types": [SLIDING, FULL, SLIDING]},
      [LayerWindow(SLIDING, 8), None, LayerWindow(SLIDING, 8)]),
     ({"attention_chunk_size": 6, "layer_types": [CHUNKED, CHUNKED, FULL]},
      [LayerWindow(CHUNKED, 6), LayerWindow(CHUNKED, 6), None])],
)
def test_layer_windows_follow_layer_types_or_the_window_set(settings, windows):
    from transformers import PretrainedConfig

    assert layer_windows(PretrainedConfig(**settings), 3) == windows


def test_layers_to_compress():
    sliding = LayerWindow(SLIDING, 8)
    assert layers_to_compress([sliding, None, sliding, None], 100) == [1, 3]
    assert layers_to_compress([sliding] * 3, 7) == [0, 1, 2]
    with pytest.raises(ValueError, match="every layer of this model is windowed"):
        layers_to_compress([sliding] * 3, 8)


@pytest.mark.parametrize("model_of", [lambda: tiny_gemma3(layer_types=(FULL, SLIDING, FULL, SLIDING)),
                                      lambda: mistral_all_sliding()], ids=["gemma3-full-first", "mistral"])
def test_later_tokens_without_positions_are_counted_from_the_original_context(model_of):
    """Layer 0 compressed: transformers would count the question's indices (and positions) from its compressed
    length; they are counted from the original context, as position_ids continuing from it say."""
    model, ids, question = model_of(), random_ids(1, 12), random_ids(1, 5, seed=2)
    logits = []
    for positions in (None, torch.arange(12, 17)[None]):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), ComposePress(0.5)(model):
            model.model(input_ids=ids, past_key_values=cache)
        with torch.no_grad():
            logits.append(model(input_ids=question, past_key_values=cache, position_ids=positions).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-6, rtol=1e-5)


# -- the default allocation, chosen from the model's config ----------------------------------------------------


def kept_sets(press, model, ids, cache):
    """Each compressed layer's kept positions after a prefill of ``ids`` under ``press``: ``{layer: (b, h, k)}``."""
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    return {layer: cache.layers[layer].keys for layer in press.last_layers}, press.last_budgets


def test_the_default_allocation_is_shared_with_pooling_on_a_hybrid_model_and_global_elsewhere():
    """``layer_allocation="auto"``: on Gemma 3 (full layers beside windowed ones) the default keeps exactly what
    ``layer_allocation="shared", score_pooling=9`` keeps; on Llama (no window) exactly what ``"global"`` keeps."""
    gemma, ids = tiny_gemma3(), random_ids(2, 24)
    default = ComposePress(0.5)
    assert default.layer_allocation == "auto" and default.effective_allocation == ("global", 1)  # not attached yet
    kept, budgets = kept_sets(default, gemma, ids, DynamicCache(config=gemma.config))
    assert default.effective_allocation == ("shared", 9)
    shared, shared_budgets = kept_sets(ComposePress(0.5, layer_allocation="shared", score_pooling=9), gemma, ids,
                                       DynamicCache(config=gemma.config))
    assert torch.equal(budgets, shared_budgets) and len(set(budgets.tolist())) == 1  # every full layer alike
    assert all(torch.equal(kept[layer], shared[layer]) for layer in kept)
    pooled = ComposePress(0.5, score_pooling=5)
    kept_sets(pooled, gemma, ids, DynamicCache(config=gemma.config))
    assert pooled.effective_allocation == ("shared", 5)

    llama = tiny_model(layers=4)
    ids = random_ids(1, 40)
    default = ComposePress(0.5)
    kept, budgets = kept_sets(default, llama, ids, DynamicCache())
    assert default.effective_allocation == ("global", 1)
    global_kept, global_budgets = kept_sets(ComposePress(0.5, layer_allocation="global"), llama, ids, DynamicCache())
    assert torch.equal(budgets, global_budgets) and len(set(budgets.tolist())) > 1  # layers keep different counts
    assert all(torch.equal(kept[layer], global_kept[layer]) for layer in kept)


def test_the_default_allocation_on_an_all_windowed_model_or_unstructured_is_global():
    """Every layer windowed (Mistral's sliding window) is no hybrid: global; structured=False cannot share one
    token set (per-head budgets), so "auto" is global there too."""
    mistral = mistral_all_sliding(window=32)
    press = ComposePress(0.5)
    kept_sets(press, mistral, random_ids(1, 20), DynamicCache())
    assert press.effective_allocation == ("global", 1)
    unstructured = ComposePress(0.5, structured=False)
    kept_sets(unstructured, tiny_gemma3(), random_ids(1, 24), DynamicCache(config=tiny_gemma3().config))
    assert unstructured.effective_allocation == ("global", 1)
