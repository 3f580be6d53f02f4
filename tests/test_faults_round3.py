"""Faults found by the third reliability round (issue 31), press side: items 1-5, 13 and 14's press cases. Each
test failed before its fix."""

import copy
import pickle
from dataclasses import dataclass

import pytest
import torch
from kvpress import ScorerPress
from transformers import DynamicCache

from kvpress_compose import ComposeDecodingPress, ComposePress, compute_n_kept
from kvpress_compose.compression import layer_budgets
from tests.models import VOCAB, cache_layer_lengths, prefill, random_ids, tiny_model

N_KEPT = compute_n_kept(3 * 40, 0.5)  # a 40-token context over the tiny model's 3 layers at ratio 0.5


def counting_forwards(model):
    """A list that grows by one at each forward of the model's first layer, and the hook's handle."""
    calls = []
    return calls, model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))


# 1: sinks beyond the budget ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "n_sink", "sinks", "budget"), [(0.9, 8, 24, 12), (0.5, 100, 120, 60)])
def test_sinks_beyond_the_budget_are_refused_naming_both_numbers_before_the_forward(ratio, n_sink, sinks, budget):
    model, cache = tiny_model(), DynamicCache()
    calls, handle = counting_forwards(model)
    try:
        with pytest.raises(ValueError, match=rf"n_sink={n_sink} keeps {sinks} entries .* budget of {budget}"):
            prefill(model, random_ids(1, 40), ComposePress(ratio, n_sink=n_sink), cache=cache)
    finally:
        handle.remove()
    assert calls == [] and cache_layer_lengths(cache) == []


@pytest.mark.parametrize("layer_allocation", ["global", "uniform", "global_normalized"])
def test_sinks_that_fill_the_budget_exactly_leave_every_layer_its_sinks(layer_allocation):
    press = ComposePress(0.7, n_sink=12, layer_allocation=layer_allocation, query_source="bidirectional")
    cache = prefill(tiny_model(), random_ids(1, 40), press)  # budget 36 = 3 layers x 12 sinks
    assert cache_layer_lengths(cache) == [12, 12, 12] and press.last_budgets.tolist() == [12, 12, 12]


def test_layer_budgets_give_every_layer_its_minimum_even_when_always_kept_entries_fill_the_budget():
    composite = torch.rand(3, 40).sort(dim=-1, descending=True).values
    composite[:, :8] = float("inf")  # 8 sinks in each of 3 layers, 12 to keep
    assert layer_budgets(composite, 12, 1).tolist() == [8, 3, 1]
    assert layer_budgets(composite, 12, 2).tolist() == [8, 2, 2]


def test_a_decoding_press_whose_sinks_exceed_its_target_size_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"n_sink=8 .* target_size=2"):
        ComposeDecodingPress(base_press=ComposePress(0, n_sink=8), target_size=2)
    press = ComposeDecodingPress(base_press=ComposePress(0, n_sink=2), target_size=4)
    with pytest.raises(ValueError, match=r"n_sink=2 .* target_size=1"):
        press.target_size = 1
    assert press.target_size == 4
    press.base_press.n_sink = 6  # changed on the base press itself: refused when the press is entered
    model = tiny_model()
    calls, handle = counting_forwards(model)
    try:
        with pytest.raises(ValueError, match=r"n_sink=6 .* target_size=4"), press(model):
            model.generate(random_ids(1, 20), max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    assert calls == []


# 2: a left-padded batch's sinks during decoding ---------------------------------------------------------------


def holds_key_of(kept_layer, full_layer, row: int, position: int) -> torch.Tensor:
    """``(kv_heads,)`` booleans: whether each head of ``row`` still holds the key of ``position``."""
    key = full_layer.keys[row, :, position]  # (heads, dim)
    return (kept_layer.keys[row] == key[:, None]).all(-1).any(-1)


def test_decoding_sinks_of_a_left_padded_row_are_its_first_real_tokens():
    model, ids = tiny_model(), random_ids(2, 24)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :6] = 0  # row 1: 6 padding slots, its first real tokens at 6 and 7
    press = ComposeDecodingPress(ComposePress(0.0, query_source="prefill", n_sink=2), compression_interval=4,
                                 target_size=8, hidden_states_buffer_size=4)
    full = DynamicCache()  # the prefill's keys at generate's positions (a padded row's count from its first token)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, past_key_values=full, max_new_tokens=1, do_sample=False)
        with press(model):
            cache = DynamicCache()
            model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5, do_sample=False)
    scores = press.base_press.last_scores  # (layers, batch, heads, cached): the one compression's
    assert (scores[:, 1, :, 6:8] == float("inf")).all() and (scores[:, 1, :, :6] == float("-inf")).all()
    assert (scores[:, 0, :, :2] == float("inf")).all()
    for kept, whole in zip(cache.layers, full.layers):
        for row, position in [(0, 0), (0, 1), (1, 6), (1, 7)]:
            assert holds_key_of(kept, whole, row, position).all()


# 3: prompt lookup and assisted generation on a compressed cache -----------------------------------------------


def compressed_conversation(model):
    ids = random_ids(1, 40)
    cache = prefill(model, ids, ComposePress(0.5, query_source="prefill"))
    return cache, torch.cat([ids, random_ids(1, 7, seed=2)], dim=1)


@pytest.mark.parametrize("assisted", ["prompt_lookup", "assistant_model"])
def test_assisted_generation_on_a_compressed_cache_is_refused_by_name_and_leaves_the_cache(assisted):
    model = tiny_model()
    cache, conversation = compressed_conversation(model)
    lengths = cache_layer_lengths(cache)
    option = {"prompt_lookup_num_tokens": 3} if assisted == "prompt_lookup" else {"assistant_model": tiny_model(seed=1)}
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens or assistant_model") as error:
        model.generate(conversation, past_key_values=cache, cache_position=torch.arange(40, 47), max_new_tokens=8,
                       do_sample=False, **option)
    assert "by position" in str(error.value) and "chunks" not in str(error.value)
    assert cache_layer_lengths(cache) == lengths
    # the same cache goes on with plain greedy decoding
    model.generate(conversation, past_key_values=cache, cache_position=torch.arange(40, 47), max_new_tokens=2,
                   do_sample=False)


@pytest.mark.parametrize("press", [ComposePress(0.5, query_source="prefill"),
                                   ComposeDecodingPress(ComposePress(0.0), compression_interval=4, target_size=8)])
def test_assisted_generation_inside_the_block_is_refused_by_its_own_name_not_as_chunks(press):
    model = tiny_model()
    calls, handle = counting_forwards(model)
    try:
        with pytest.raises(ValueError, match="prompt_lookup_num_tokens or assistant_model") as error, press(model):
            model.generate(random_ids(1, 40), max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3)
    finally:
        handle.remove()
    assert "chunks" not in str(error.value) and calls == []


def test_assisted_generation_without_a_compressed_cache_is_left_alone():
    model = tiny_model()
    ids = random_ids(1, 30)
    with ComposePress(0.0)(model):  # attached, compressing nothing
        assisted = model.generate(ids, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, model.generate(ids, max_new_tokens=6, do_sample=False))


# 4: the scorer's output is checked ------------------------------------------------------------------------------


@dataclass
class ShapedScorer(ScorerPress):
    """Key norms reshaped as ``shape`` says (a function of the expected ``(b, h, n)``), or as a list."""

    shape: str = "ok"

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        scores = keys.float().norm(dim=-1)  # (b, h, n)
        n = scores.shape[-1]
        return {
            "ok": lambda: scores,
            "one head": lambda: scores[:, :1],
            "no head axis": lambda: scores[:, 0],
            "one more": lambda: torch.cat([scores, scores[..., :1]], dim=-1),
            "three fewer": lambda: scores[..., : n - 3],
            "list": lambda: scores.tolist(),
            "integers": lambda: scores.long(),
        }[self.shape]()


@pytest.mark.parametrize("shape", ["one head", "no head axis", "one more", "three fewer", "list", "integers"])
def test_a_scorer_output_of_the_wrong_type_dtype_or_shape_is_refused_naming_the_scorer_and_the_shape(shape):
    model, cache = tiny_model(), DynamicCache()
    with pytest.raises((TypeError, ValueError), match=r"ShapedScorer\.score .* expected a floating-point tensor of "
                                                      r"shape \(batch, kv_heads, n\) = \(1, 2, 40\)") as error:
        prefill(model, random_ids(1, 40), ComposePress(0.5, scorer=ShapedScorer(shape=shape)), cache=cache)
    assert "another press" not in str(error.value)
    assert cache_layer_lengths(cache) == [40]  # refused at the first layer's scores


def test_a_scorer_of_the_right_shape_still_compresses():
    press = ComposePress(0.5, scorer=ShapedScorer())
    assert sum(cache_layer_lengths(prefill(tiny_model(), random_ids(1, 40), press))) == N_KEPT


def test_a_decoding_scorer_of_the_wrong_shape_is_refused_naming_it():
    model = tiny_model()
    press = ComposeDecodingPress(ComposePress(0.0, scorer=ShapedScorer(shape="one head")), compression_interval=4,
                                 target_size=8, hidden_states_buffer_size=4)
    with pytest.raises(ValueError, match=r"ShapedScorer\.score .* \(1, 2, "), torch.no_grad(), press(model):
        model.generate(random_ids(1, 30), max_new_tokens=6, do_sample=False)


# 5: replay_prompt_ids ------------------------------------------------------------------------------------------


def test_replay_prompt_ids_outside_the_vocabulary_are_refused_when_the_press_is_entered():
    model = tiny_model()
    press = ComposePress(0.5, query_source="replay_prompted", replay_prompt_ids=[5, VOCAB + 3, 7])
    calls, handle = counting_forwards(model)
    try:
        with pytest.raises(ValueError, match=rf"replay_prompt_ids .*\[{VOCAB + 3}\].* vocabulary of {VOCAB}"):
            prefill(model, random_ids(1, 40), press)
    finally:
        handle.remove()
    assert calls == []
    press.replay_prompt_ids = [5, VOCAB - 1]
    assert sum(cache_layer_lengths(prefill(model, random_ids(1, 40), press))) == N_KEPT


@pytest.mark.parametrize("settings", [{}, {"query_source": "replay"}, {"query_source": "prefill"},
                                      {"query_source": "replay_prompted", "scorer": ShapedScorer()}])
def test_replay_prompt_ids_with_a_source_that_does_not_feed_them_are_refused_at_construction(settings):
    with pytest.raises(ValueError, match="replay_prompt_ids .* query_source='replay_prompted'"):
        ComposePress(0.5, replay_prompt_ids=[5, 6], **settings)
    press = ComposePress(0.5, query_source="replay_prompted", replay_prompt_ids=[5, 6])
    with pytest.raises(ValueError, match="replay_prompt_ids"):
        press.query_source = "replay"
    assert press.query_source == "replay_prompted"


# 13: copies of a press ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: ComposePress(0.5, query_source="prefill"),
                                  lambda: ComposeDecodingPress(ComposePress(0.5, query_source="prefill"),
                                                               compression_interval=64, target_size=8)])
def test_a_copy_of_a_press_in_use_is_a_fresh_unattached_press(make):
    model, other = tiny_model(), tiny_model(seed=1)
    press = make()
    with press(model):
        prefill(model, random_ids(1, 40))  # used: state and hooks
        copied, unpickled = copy.deepcopy(press), pickle.loads(pickle.dumps(press))
        for fresh in (copied, unpickled):
            assert fresh == press and len(pickle.dumps(fresh)) < 20_000  # the settings, not the model
            assert not any(isinstance(value, torch.nn.Module) for value in vars(fresh).values())
            with fresh(other):  # usable elsewhere while the original is in use
                assert sum(cache_layer_lengths(prefill(other, random_ids(1, 40)))) == N_KEPT
        assert sum(cache_layer_lengths(prefill(model, random_ids(1, 40)))) == N_KEPT  # the original still works
    with copied(model):  # and on the original's model once its block has exited
        assert sum(cache_layer_lengths(prefill(model, random_ids(1, 40)))) == N_KEPT


# 14: a press's last_budgets, prefill_seen ------------------------------------------------------------------------


def test_a_prefill_at_ratio_zero_clears_the_previous_prefills_results():
    model, press = tiny_model(), ComposePress(0.5, query_source="prefill")
    prefill(model, random_ids(1, 40), press)
    assert int(press.last_budgets.sum()) == N_KEPT
    press.compression_ratio = 0.0
    cache = prefill(model, random_ids(1, 40), press)
    assert cache_layer_lengths(cache) == [40, 40, 40]
    assert press.last_budgets is None and press.last_scores is None and press.last_layers is None


def test_prefill_seen_without_mean_aggregation_is_refused_at_construction():
    with pytest.raises(ValueError, match="query_source='prefill_seen' .* agg_task='mean'"):
        ComposePress(0.5, query_source="prefill_seen")
    press = ComposePress(0.5, query_source="prefill_seen", agg_task="mean")
    with pytest.raises(ValueError, match="agg_task='mean'"):
        press.agg_task = "max"
    assert press.agg_task == "mean"
