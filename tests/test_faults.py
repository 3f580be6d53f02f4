"""Faults found by a probe of bad inputs and failures (the redesign issue's 1-9): each test failed before the fix.

After a press is used, however its use ended, the model must compute exactly what a never-pressed copy computes.
"""

import copy

import numpy as np
import pytest
import torch
from kvpress import ComposedPress, KnormPress, SnapKVPress
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM

from kvpress_compose import ComposePress, attention_scores, compute_n_kept
from tests.models import VOCAB, cache_layer_lengths, prefill, random_ids, tiny_model


@torch.no_grad()
def logits_of(model, ids, **kwargs):
    return model(input_ids=ids, past_key_values=DynamicCache(), **kwargs).logits


def assert_left_as_never_pressed(model, never_pressed, ids):
    """The next forward computes what a never-pressed copy does, and leaves none of our hooks but the decoder
    mask hook (inert on caches we did not compress) and no capture."""
    assert torch.equal(logits_of(model, ids), logits_of(never_pressed, ids))
    assert len(model.model._forward_pre_hooks) == 1
    assert len(model.model._forward_hooks) == 0
    assert not any(layer.self_attn in attention_scores.ACTIVE_CAPTURES for layer in model.model.layers)


# 1 -------------------------------------------------------------------------------------------------------------


def test_an_empty_composed_press_block_leaves_the_model_as_never_pressed():
    model = tiny_model()
    never_pressed = copy.deepcopy(model)
    with ComposedPress([ComposePress(0.5, query_source="bidirectional")])(model):
        pass
    assert_left_as_never_pressed(model, never_pressed, random_ids(1, 30))


def test_an_empty_composed_press_block_leaves_a_sliding_window_model_usable():
    model = tiny_model(family="mistral")
    model.config.sliding_window = 16
    with ComposedPress([ComposePress(0.5, query_source="bidirectional")])(model):
        pass
    logits_of(model, random_ids(1, 40))  # longer than the window: ComposePress would refuse it
    assert len(model.model._forward_pre_hooks) == 1


def test_a_failing_press_before_compose_press_leaves_the_model_as_never_pressed():
    model = tiny_model()
    never_pressed = copy.deepcopy(model)
    press = ComposedPress([SnapKVPress(0.5, window_size=64), ComposePress(0.5, query_source="bidirectional")])
    with pytest.raises(AssertionError):  # SnapKV's own check: the context is shorter than its window
        prefill(model, random_ids(1, 30), press)
    assert_left_as_never_pressed(model, never_pressed, random_ids(1, 30))


# 2 -------------------------------------------------------------------------------------------------------------

DYNAMIC_ROPE = {"rope_type": "dynamic", "factor": 2.0}


def dynamic_rope_model(rope_scaling=DYNAMIC_ROPE, attn="sdpa"):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         rope_scaling=rope_scaling, attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_replay_past_max_positions_leaves_dynamic_rope_as_it_was():
    """40 re-fed tokens after 40 reach position 80 > 64: dynamic RoPE rescales its frequencies in place for
    them; later forwards, short or long, must run at their own frequencies, as on a never-pressed copy."""
    model = dynamic_rope_model()
    never_pressed = copy.deepcopy(model)
    prefill(model, random_ids(1, 40), ComposePress(0.5, query_source="replay"))
    assert vars(model.model.rotary_emb).keys() == vars(never_pressed.model.rotary_emb).keys()
    for length in (30, 70):
        ids = random_ids(1, length, seed=2)
        assert torch.equal(logits_of(model, ids), logits_of(never_pressed, ids))


@pytest.mark.parametrize("rope_scaling", [{"rope_type": "dynamic", "factor": 2.0},
                                          {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
                                           "factor": 2.0, "attention_factor": 1.0,
                                           "original_max_position_embeddings": 64}])
def test_replay_past_the_rope_threshold_rotates_re_fed_queries_as_the_cached_keys(rope_scaling):
    """The re-fed positions (up to 80) pass the threshold (64) where dynamic RoPE and LongRoPE switch frequencies;
    the cached keys were rotated at the prefill's (below it). Replay scores must be those of the context fed twice
    at the prefill's frequencies: the same weights with plain RoPE, attention read from an eager forward."""
    from tests.test_scores import reference_scores

    scaled = dynamic_rope_model(rope_scaling)
    plain = dynamic_rope_model(None, attn="eager")
    plain.load_state_dict(scaled.state_dict())
    ids = random_ids(1, 40)
    if rope_scaling["rope_type"] == "longrope":  # below the threshold LongRoPE's short factors (1.0) are plain RoPE
        assert torch.equal(scaled.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    with torch.no_grad():
        attentions = plain(torch.cat([ids, ids], dim=1), output_attentions=True).attentions
    press = ComposePress(0.5, query_source="replay", add_mean_across_heads=False)
    prefill(scaled, ids, press)
    torch.testing.assert_close(press.last_scores, reference_scores(attentions, slice(40, 80), 40), atol=1e-6,
                               rtol=1e-4)


# 3 -------------------------------------------------------------------------------------------------------------


def test_a_cropped_compressed_cache_reused_for_a_padded_prompt_is_a_fresh_cache():
    model = tiny_model()
    cache = prefill(model, random_ids(2, 40), ComposePress(0.5, query_source="prefill"))
    cache.crop(0)
    ids, mask = random_ids(2, 12, seed=3), torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding on row 1
    with torch.no_grad():
        reused = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
        fresh = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache()).logits
    torch.testing.assert_close(reused[1, 4:], fresh[1, 4:])
    torch.testing.assert_close(reused[0], fresh[0])


# 4, 6 ----------------------------------------------------------------------------------------------------------


def test_numpy_numbers_are_accepted_as_the_python_numbers_they_represent():
    press = ComposePress(np.float16(0.5), min_tokens_per_layer=np.int64(2), score_block_size=np.int32(16),
                         query_source="prefill")
    assert type(press.compression_ratio) is float and type(press.min_tokens_per_layer) is int
    assert type(press.score_block_size) is int
    cache = prefill(tiny_model(), random_ids(1, 40), press)
    assert sum(cache_layer_lengths(cache)) == compute_n_kept(3 * 40, 0.5)


@pytest.mark.parametrize("ratio", [1.5, -0.1, float("nan"), 1.0])
def test_a_ratio_assigned_after_construction_is_checked(ratio):
    press = ComposePress(0.5)
    with pytest.raises(ValueError, match="compression_ratio must be in"):
        press.compression_ratio = ratio
    assert press.compression_ratio == 0.5


def test_every_setting_assigned_after_construction_is_checked():
    press = ComposePress(0.5)
    for name, value in [("query_source", "future"), ("agg_task", "sum"), ("min_tokens_per_layer", 0),
                        ("layer_allocation", "random"), ("composite_tokens", 1), ("scorer", KnormPress)]:
        with pytest.raises((TypeError, ValueError), match=name):
            setattr(press, name, value)


# 5 -------------------------------------------------------------------------------------------------------------


def olmo2_model(attn):
    config = Olmo2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn)
    torch.manual_seed(0)
    return Olmo2ForCausalLM(config).eval()


def test_a_model_whose_queries_cannot_be_recomputed_exactly_is_refused_where_scoring_would_recompute_them():
    """OLMo2's q_norm spans every head: recomputed queries would differ from attention's (eager and sdpa gave
    different budgets). Eager recomputes them: refused; sdpa on CPU scores the queries attention used."""
    ids = random_ids(1, 40)
    with pytest.raises(ValueError, match="cannot recompute the queries of a 'olmo2' model"):
        prefill(olmo2_model("eager"), ids, ComposePress(0.5, query_source="prefill"))
    press = ComposePress(0.5, query_source="prefill")
    prefill(olmo2_model("sdpa"), ids, press)
    assert int(press.last_budgets.sum()) == compute_n_kept(2 * 40, 0.5)


# 7 -------------------------------------------------------------------------------------------------------------


def test_replay_with_one_mask_row_for_a_batch_is_every_rows_mask():
    model, ids = tiny_model(), random_ids(2, 40)
    budgets = {}
    for name, rows in [("broadcast", 1), ("full", 2)]:
        mask = torch.ones(rows, 40, dtype=torch.long)
        press = ComposePress(0.5, query_source="replay")
        prefill(model, ids, press, attention_mask=mask)
        budgets[name] = press.last_budgets
    assert torch.equal(budgets["broadcast"], budgets["full"])


def test_a_mask_that_does_not_fit_the_inputs_is_refused_by_name():
    with pytest.raises(ValueError, match=r"attention_mask .* got shape \(3, 40\)"):
        prefill(tiny_model(), random_ids(2, 40), ComposePress(0.5), attention_mask=torch.ones(3, 40, dtype=torch.long))


# 8 -------------------------------------------------------------------------------------------------------------


def test_a_context_fed_in_two_forwards_is_refused_rather_than_half_compressed():
    model, ids, cache = tiny_model(), random_ids(1, 40), DynamicCache()
    with torch.no_grad(), ComposePress(0.5, query_source="prefill")(model):
        model(input_ids=ids[:, :20], past_key_values=cache)
        with pytest.raises(ValueError, match="in chunks would be compressed only up to its first chunk"):
            model(input_ids=ids[:, 20:], past_key_values=cache)


# 9 -------------------------------------------------------------------------------------------------------------


def test_nested_presses_are_named_as_such_not_as_a_composed_press():
    model, cache = tiny_model(), DynamicCache()
    outer, inner = KnormPress(0.5), ComposePress(0.5, query_source="prefill")
    with torch.no_grad(), outer(model), inner(model), \
            pytest.raises(ValueError, match="another press left 20 in the cache") as error:
        model(input_ids=random_ids(1, 40), past_key_values=cache)
    assert "nested `with press(model)`" in str(error.value)


def test_an_all_padding_row_is_named():
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match="row 1 of the batch has 0 context tokens"):
        prefill(tiny_model(), random_ids(2, 40), ComposePress(0.5, query_source="prefill"), attention_mask=mask)


# found by a review of the redesign ------------------------------------------------------------------------------


def test_compose_press_inside_prefill_decoding_press_compresses_the_prefill():
    from kvpress import PrefillDecodingPress

    press = ComposePress(0.5, query_source="prefill")
    cache = prefill(tiny_model(), random_ids(1, 40), PrefillDecodingPress(prefilling_press=press))
    assert sum(cache_layer_lengths(cache)) == compute_n_kept(3 * 40, 0.5)


def test_a_question_into_a_cache_compressed_in_an_earlier_block_is_not_refused():
    model = tiny_model()
    cache = prefill(model, random_ids(1, 40), ComposePress(0.5, query_source="prefill"))
    with torch.no_grad(), ComposePress(0.0)(model):
        model(input_ids=random_ids(1, 5, seed=2), past_key_values=cache, position_ids=torch.arange(40, 45)[None])


def test_two_prefills_in_one_composed_press_block_are_both_compressed():
    model, press = tiny_model(), ComposePress(0.5, query_source="bidirectional")
    caches = [DynamicCache(), DynamicCache()]
    with torch.no_grad(), ComposedPress([press])(model):
        for cache in caches:
            model.model(input_ids=random_ids(1, 40), past_key_values=cache)
    assert [sum(cache_layer_lengths(cache)) for cache in caches] == [compute_n_kept(3 * 40, 0.5)] * 2
    assert len(model.model._forward_pre_hooks) == 1  # ours went when the ComposedPress's hooks did


def test_nested_compose_presses_name_the_order_instead_of_scoring_the_outer_replay():
    model = tiny_model()
    outer, inner = ComposePress(0.5, query_source="replay"), ComposePress(0.3, query_source="bidirectional")
    with torch.no_grad(), outer(model), inner(model), \
            pytest.raises(ValueError, match="changed the cache after ComposePress scored it"):
        model.model(input_ids=random_ids(1, 40), past_key_values=DynamicCache())


def test_a_prefill_interrupted_without_its_hooks_leaves_nothing_to_the_next():
    model, press = tiny_model(), ComposePress(0.5, query_source="prefill")

    def interrupt(module, args, output):
        raise KeyboardInterrupt  # torch runs always_call hooks on Exception only

    with torch.no_grad(), press(model):
        handle = model.model.layers[1].register_forward_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            model.model(input_ids=random_ids(1, 30), past_key_values=DynamicCache())
        handle.remove()
        cache = DynamicCache()
        model.model(input_ids=random_ids(1, 12), past_key_values=cache)
    assert sum(cache_layer_lengths(cache)) == compute_n_kept(3 * 12, 0.5)


def test_settings_that_depend_on_each_other_are_checked_when_assigned():
    press = ComposePress(0.5)
    press.structured = False
    with pytest.raises(ValueError, match="structured press only"):
        press.layer_allocation = "global_normalized"
    assert press.layer_allocation == "auto"


# found by the review of the early-stopped replay and the compression at the decoder's end ---------------------


def test_the_decoding_press_beside_a_replaying_prefill_press_sees_no_decoding_in_the_replay():
    """In PrefillDecodingPress, the re-fed context's positions follow the context: kvpress hands those calls to the
    decoding press, which must not buffer them as decoded tokens nor compress the replay's own cache."""
    from kvpress import PrefillDecodingPress

    from kvpress_compose import ComposeDecodingPress

    decoding = ComposeDecodingPress(compression_interval=16, target_size=4)
    press = PrefillDecodingPress(prefilling_press=ComposePress(0.5, query_source="replay"), decoding_press=decoding)
    cache = prefill(tiny_model(), random_ids(1, 40), press)
    assert sum(cache_layer_lengths(cache)) == compute_n_kept(3 * 40, 0.5)
    assert decoding._generation is None


def test_replay_leaves_no_output_capture_behind_when_the_config_asks_for_hidden_states():
    model = tiny_model()
    model.config.output_hidden_states = True
    prefill(model, random_ids(1, 40), ComposePress(0.5, query_source="replay"))
    # every layer's forward is its class's again (transformers 4.57 may store it back on the instance)
    assert all(getattr(layer.forward, "__func__", None) is type(layer).forward for layer in model.model.layers)


def test_a_failing_decoder_hook_before_ours_compresses_nothing():
    """An earlier forward hook on the decoder raising: torch still runs always-called hooks, with the real output;
    ComposePress must not replay or compress then."""
    model = tiny_model()
    press = ComposePress(0.5, query_source="replay")
    cache = DynamicCache()
    with press(model):
        handle = model.model.register_forward_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("earlier hook")),
                                                   prepend=True)
        with pytest.raises(RuntimeError, match="earlier hook"):
            model.model(input_ids=random_ids(1, 40), past_key_values=cache)
        handle.remove()
    assert cache_layer_lengths(cache) == [40, 40, 40] and not press.in_prefill


def test_a_rotary_embedding_without_one_frequency_set_works_under_replay():
    """Gemma 3 keeps one frequency set per layer type (no inv_freq to pin): replay leaves it as it is and
    recomputes Gemma 3's queries exactly (once refused by name; exactness in tests/test_hybrid.py)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    cache = prefill(model, random_ids(1, 40), ComposePress(0.5, query_source="replay"))
    assert sum(cache_layer_lengths(cache)) == 40  # both layers sliding, window 4096: compressed as full ones
