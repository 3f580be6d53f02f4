"""Faults found by a probe of how presses are used (issue 23, items 1-10): each test failed before the fix."""

import copy
import logging
import threading
from dataclasses import dataclass

import pytest
import torch
from kvpress import ComposedPress, KnormPress, PrefillDecodingPress, ScorerPress
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StaticCache

from kvpress_compose import ComposeDecodingPress, ComposePress, compute_n_kept
from tests.models import cache_layer_lengths, prefill, random_ids, tiny_model

N_KEPT = compute_n_kept(3 * 40, 0.5)  # a 40-token context over the tiny model's 3 layers at ratio 0.5


# 1 -------------------------------------------------------------------------------------------------------------


def test_a_prefill_into_a_cache_that_already_holds_tokens_is_refused_by_name():
    model, ids, cache = tiny_model(), random_ids(1, 40), DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids[:, :20], past_key_values=cache)
        with ComposePress(0.5, query_source="prefill")(model), \
                pytest.raises(ValueError, match="a cache that already holds 20 tokens"):
            model.model(input_ids=ids[:, 20:], past_key_values=cache, position_ids=torch.arange(20, 40)[None])
    assert cache_layer_lengths(cache) == [20, 20, 20]


def test_a_prefill_into_a_cache_compressed_in_an_earlier_block_is_refused_by_name():
    model = tiny_model()
    cache = prefill(model, random_ids(1, 40), ComposePress(0.5, query_source="prefill"))
    held = cache.get_seq_length()
    with torch.no_grad(), ComposePress(0.5)(model), \
            pytest.raises(ValueError, match=f"a cache that already holds {held} tokens"):
        model.model(input_ids=random_ids(1, 8, seed=2), past_key_values=cache, position_ids=torch.arange(40, 48)[None])


def test_a_question_in_prefill_decoding_press_decoding_block_is_still_the_decoding_phase():
    """kvpress's pipeline runs the question inside the PrefillDecodingPress's second block: kvpress hands forwards
    into a non-empty cache to the decoding press, so ComposePress must not refuse them there."""
    model = tiny_model()
    press = PrefillDecodingPress(prefilling_press=ComposePress(0.5, query_source="prefill"),
                                 decoding_press=ComposeDecodingPress(compression_interval=64, target_size=8))
    cache = prefill(model, random_ids(1, 40), press)
    assert sum(cache_layer_lengths(cache)) == N_KEPT
    with torch.no_grad(), press(model):
        model(input_ids=random_ids(1, 6, seed=2), past_key_values=cache, position_ids=torch.arange(40, 46)[None])
    assert sum(cache_layer_lengths(cache)) == N_KEPT + 3 * 6


# 2 -------------------------------------------------------------------------------------------------------------


def compressed_prefill(model, seed=1):
    cache = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=random_ids(1, 40, seed=seed), past_key_values=cache)
    return sum(cache_layer_lengths(cache))


def test_a_press_in_use_on_one_model_is_refused_on_another_and_keeps_compressing_the_first():
    first, second, press = tiny_model(), tiny_model(seed=1), ComposePress(0.5, query_source="prefill")
    with press(first):
        with pytest.raises(RuntimeError, match="already in use on a LlamaForCausalLM"), press(second):
            pass
        assert compressed_prefill(first) == N_KEPT
    assert compressed_prefill(second) == 3 * 40  # never attached


def test_a_press_re_entered_on_its_model_is_refused_and_the_outer_block_keeps_compressing():
    model, press = tiny_model(), ComposePress(0.5, query_source="prefill")
    with press(model):
        with pytest.raises(RuntimeError, match="already in use"), press(model):
            pass
        assert compressed_prefill(model) == N_KEPT
    assert compressed_prefill(model) == 3 * 40  # detached at the outer block's exit


def test_one_press_reused_sequentially_on_one_model_after_another_compresses_each():
    models, press = [tiny_model(), tiny_model(seed=1), tiny_model(family="qwen3")], ComposePress(0.5)
    for model in models + models[:1]:
        with press(model):
            assert compressed_prefill(model) == N_KEPT
    with ComposedPress([press])(models[1]):  # a wrapper's block, then the press alone elsewhere
        pass
    with press(models[2]):
        assert compressed_prefill(models[2]) == N_KEPT


def test_a_press_used_by_two_threads_at_once_refuses_the_second_and_compresses_the_first():
    model, press = tiny_model(), ComposePress(0.5, query_source="prefill")
    paused, resume, errors, cache = threading.Event(), threading.Event(), [], DynamicCache()

    def run_first():
        try:
            with torch.no_grad():
                model.model(input_ids=random_ids(1, 40), past_key_values=cache)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    first = threading.Thread(target=run_first)

    def pause_first(module, args, output):
        if threading.current_thread() is first:
            paused.set()
            resume.wait(30)

    handle = model.model.layers[1].register_forward_hook(pause_first)
    try:
        with press(model):
            first.start()
            assert paused.wait(30)
            with torch.no_grad(), pytest.raises(RuntimeError, match="another thread"):
                model.model(input_ids=random_ids(1, 40, seed=2), past_key_values=DynamicCache())
            resume.set()
            first.join(30)
    finally:
        resume.set()
        handle.remove()
    assert errors == [] and sum(cache_layer_lengths(cache)) == N_KEPT


# 3 -------------------------------------------------------------------------------------------------------------


@dataclass
class NeverFirstTen(ScorerPress):
    """Key norms, but ``-inf`` ("never kept") for the first ten positions."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        scores = keys.float().norm(dim=-1)
        scores[..., :10] = float("-inf")
        return scores


@dataclass
class NanScorer(ScorerPress):
    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        scores = keys.float().norm(dim=-1)
        scores[..., 5] = float("nan")
        return scores


def kept_positions_of(cache, full_cache):
    """Per layer, the sorted original positions of every kept entry (matched by key)."""
    kept = []
    for layer, full in zip(cache.layers, full_cache.layers):
        match = (layer.keys[:, :, :, None] == full.keys[:, :, None]).all(-1)  # (b, h, kept, n)
        kept.append(sorted(match.nonzero()[:, -1].tolist()))
    return kept


def test_minus_inf_scores_are_never_kept_and_the_budget_comes_from_the_finite_ones(caplog):
    model, ids = tiny_model(), random_ids(1, 40)
    press = ComposePress(0.5, scorer=NeverFirstTen())
    with caplog.at_level(logging.WARNING):
        cache = prefill(model, ids, press)
    assert sum(cache_layer_lengths(cache)) == N_KEPT and int(press.last_budgets.sum()) == N_KEPT
    assert min(min(positions) for positions in kept_positions_of(cache, prefill(model, ids)) if positions) >= 10
    assert "padding" not in caplog.text


def test_nan_scores_are_refused_naming_the_scorer():
    with pytest.raises(ValueError, match="NanScorer.*NaN"):
        prefill(tiny_model(), random_ids(1, 40), ComposePress(0.5, scorer=NanScorer()))


# 4 -------------------------------------------------------------------------------------------------------------


def test_generate_on_a_whole_conversation_into_a_compressed_cache_warns_with_the_positions(caplog):
    model, ids = tiny_model(), random_ids(1, 40)
    cache = prefill(model, ids, ComposePress(0.5, query_source="prefill"))
    conversation, held = torch.cat([ids, random_ids(1, 7, seed=2)], dim=1), cache.get_seq_length()
    with caplog.at_level(logging.WARNING, logger="kvpress_compose"):
        model.generate(conversation, past_key_values=cache, max_new_tokens=1, do_sample=False)
    assert f"{47 - held} tokens at positions from {held}" in caplog.text
    assert "already processed 40 positions" in caplog.text and "cache_position=torch.arange(40, 47)" in caplog.text


def test_generate_with_cache_position_from_the_original_length_continues_the_compressed_cache(caplog):
    """The pattern the warning names: the same tokens as a hand-run greedy loop over the 7 new tokens."""
    model, ids, new = tiny_model(), random_ids(1, 40), random_ids(1, 7, seed=2)
    press = ComposePress(0.5, query_source="prefill")
    caches = [prefill(model, ids, press) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="kvpress_compose"):
        generated = model.generate(torch.cat([ids, new], dim=1), past_key_values=caches[0], max_new_tokens=4,
                                   do_sample=False, cache_position=torch.arange(40, 47))[0, 47:]
    assert caplog.text == ""
    tokens, inputs, position = [], new, 40
    with torch.no_grad():
        for _ in range(4):
            logits = model(input_ids=inputs, past_key_values=caches[1],
                           position_ids=torch.arange(position, position + inputs.shape[1])[None]).logits
            position += inputs.shape[1]
            inputs = logits[:, -1:].argmax(-1)
            tokens.append(int(inputs))
    assert generated.tolist() == tokens


# 5 -------------------------------------------------------------------------------------------------------------


class CheckBufferedRows(LogitsProcessor):
    """At each step of beam search, the press's buffered layer-0 attention inputs of row r must be those of the
    last tokens of row r's running sequence (the rows follow the cache, which generate reorders)."""

    def __init__(self, model, press):
        self.model, self.press, self.steps, self.reordered = model, press, 0, False
        self.previous = None

    def __call__(self, input_ids, scores):
        run = self.press._generation
        if run is not None and run.hidden_states.get(0):
            buffered = torch.cat(run.hidden_states[0], dim=1)
            n = buffered.shape[1]
            layer = self.model.model.layers[0]
            expected = layer.input_layernorm(self.model.model.embed_tokens(input_ids[:, -n:]))
            torch.testing.assert_close(buffered, expected)
            self.steps += 1
        if self.previous is not None and not torch.equal(input_ids[:, :-1], self.previous):
            self.reordered = True
        self.previous = input_ids.clone()
        return scores


def test_beam_search_reorders_the_decoding_press_buffer_with_the_cache():
    model, ids = tiny_model(), random_ids(1, 20)
    press = ComposeDecodingPress(compression_interval=1000, target_size=8, hidden_states_buffer_size=4)
    check = CheckBufferedRows(model, press)
    with torch.no_grad(), press(model):
        model.generate(ids, past_key_values=DynamicCache(), max_new_tokens=12, num_beams=3, do_sample=False,
                       logits_processor=LogitsProcessorList([check]), early_stopping=False)
    assert check.steps >= 8 and check.reordered


# 6 -------------------------------------------------------------------------------------------------------------


def test_unstructured_masks_stay_with_their_cache_across_a_later_fresh_prefill():
    model, ids, question = tiny_model(), random_ids(1, 40), random_ids(1, 5, seed=3)
    positions = torch.arange(40, 45)[None]
    cache = prefill(model, ids, ComposePress(0.5, query_source="prefill", structured=False))
    with torch.no_grad():
        masked = model(input_ids=question, past_key_values=copy.deepcopy(cache), position_ids=positions).logits
        unmasked = model(input_ids=question, past_key_values=prefill(model, ids), position_ids=positions).logits
        assert not torch.allclose(masked, unmasked, atol=1e-4)  # the masks matter
        prefill(model, random_ids(1, 30, seed=4))  # a fresh prefill: kvpress's attention resets the module's masks
        later = model(input_ids=question, past_key_values=cache, position_ids=positions).logits
    torch.testing.assert_close(later, masked)


# 7 -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query_source", ["prefill", "bidirectional"])
def test_a_static_cache_is_refused_by_name(query_source):
    model = tiny_model()
    cache = StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(ValueError, match="got a StaticCache"):
        prefill(model, random_ids(1, 40), ComposePress(0.5, query_source=query_source), cache=cache)


# 8 -------------------------------------------------------------------------------------------------------------


def test_presses_compare_by_settings_after_use():
    model = tiny_model()
    first, second = ComposePress(0.5, query_source="prefill"), ComposePress(0.5, query_source="prefill")
    prefill(model, random_ids(1, 40), first)
    prefill(model, random_ids(1, 30, seed=2), second)
    assert first == second and first in [second] and first != ComposePress(0.3, query_source="prefill")
    with pytest.raises(TypeError, match="unhashable"):  # a mutable dataclass with eq: unhashable, as kvpress's
        hash(first)
    decoding = [ComposeDecodingPress(base_press=press) for press in (first, second)]
    assert decoding[0] == decoding[1]


# 9 -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, value", [("target_size", 0), ("hidden_states_buffer_size", -5),
                                         ("compression_interval", 1.5), ("base_press", KnormPress()),
                                         ("base_press", ComposePress(0.5, structured=False))])
def test_decoding_press_settings_assigned_after_construction_are_checked(name, value):
    press = ComposeDecodingPress(target_size=16)
    before = getattr(press, name)
    with pytest.raises((TypeError, ValueError), match=name):
        setattr(press, name, value)
    assert getattr(press, name) == before


def test_decoding_press_settings_are_normalised_on_assignment():
    import numpy as np

    press = ComposeDecodingPress()
    press.target_size = np.int64(32)
    assert type(press.target_size) is int and press.target_size == 32


# 10 ------------------------------------------------------------------------------------------------------------


def test_a_context_shorter_than_min_tokens_per_layer_is_refused_before_the_forward():
    model, calls = tiny_model(), []
    handle = model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="the context has 6 tokens, fewer than min_tokens_per_layer=8") as error:
            prefill(model, random_ids(1, 6), ComposePress(0.5, min_tokens_per_layer=8))
    finally:
        handle.remove()
    assert calls == [] and "padding" not in str(error.value)


def test_a_padded_row_shorter_than_min_tokens_per_layer_is_named_as_padding_before_the_forward():
    model, calls = tiny_model(), []
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :16] = 0
    handle = model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"row 1 of the batch has 4 context tokens \(the rest is padding\)"):
            prefill(model, random_ids(2, 20), ComposePress(0.5, min_tokens_per_layer=8), attention_mask=mask)
    finally:
        handle.remove()
    assert calls == []
