"""ComposeDecodingPress: re-compression during decoding, exact against the uncompressed model with a mask hiding
exactly the evicted (layer, head, position) entries, whatever each token saw when it was processed."""

import pytest
import torch
from kvpress import DecodingPress, KnormPress, SnapKVPress
from transformers import DynamicCache

from kvpress_compose import ComposeDecodingPress, ComposePress, compute_n_kept
from tests.models import cache_layer_lengths, random_ids, tiny_model


class PositionLedger:
    """Which original position every cached (layer, row, head) entry is, found by its key: each new token's key
    is recorded, by a hook that runs before the press's, right after attention appended it to the cache."""

    def __init__(self, model, cache):
        self.cache, self.positions = cache, {}  # (layer, row, head, key bytes) -> position
        self.next_position = None
        self.handles = [layer.self_attn.register_forward_hook(self.record, with_kwargs=True)
                        for layer in model.model.layers]

    def record(self, module, args, kwargs, output):
        keys = self.cache.layers[module.layer_idx].keys  # (batch, kv_heads, k, head_dim)
        q_len = kwargs["hidden_states"].shape[1]
        for offset in range(q_len):
            for row in range(keys.shape[0]):
                for head in range(keys.shape[1]):
                    key = keys[row, head, keys.shape[2] - q_len + offset].numpy().tobytes()
                    self.positions[(module.layer_idx, row, head, key)] = self.next_position + offset

    def held(self):
        """Per layer, ``{(row, head): set of positions}`` the cache holds now."""
        held = []
        for layer_idx, layer in enumerate(self.cache.layers):
            keys = layer.keys
            held.append({(row, head): {self.positions[(layer_idx, row, head, keys[row, head, j].numpy().tobytes())]
                                       for j in range(keys.shape[2])}
                         for row in range(keys.shape[0]) for head in range(keys.shape[1])})
        return held


@torch.no_grad()
def compressed_run(model, ids, mask, press, steps):
    """Greedy decoding under ``press``, one token per forward: logits per step, the tokens, and what each
    step's query could see (held entries before it, per layer, row and head)."""
    cache = DynamicCache()
    ledger = PositionLedger(model, cache)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    n = ids.shape[1]
    try:
        with press(model):
            ledger.next_position = 0
            logits = [model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits]
            tokens, seen, full_mask = [], [], mask
            for step in range(steps):
                token = logits[-1][:, -1:].argmax(-1)
                tokens.append(token)
                seen.append(ledger.held())
                full_mask = torch.cat([full_mask, torch.ones_like(token)], dim=1)
                ledger.next_position = n + step
                position = positions[:, -1:] + step + 1
                logits.append(model(input_ids=token, attention_mask=full_mask, position_ids=position,
                                    past_key_values=cache).logits)
    finally:
        for handle in ledger.handles:
            handle.remove()
    return logits, torch.cat(tokens, dim=1), seen, cache


@torch.no_grad()
def reference_logits(model, ids, mask, tokens, seen):
    """One uncompressed pass over context + tokens where the query of decode step t sees, per layer and head,
    exactly the valid entries held before it and itself; context queries attend causally as in the prefill."""
    full_ids = torch.cat([ids, tokens], dim=1)
    batch, n, total = ids.shape[0], ids.shape[1], full_ids.shape[1]
    valid = torch.cat([mask.bool(), torch.ones_like(tokens, dtype=torch.bool)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, tokens.shape[1] + 1)], dim=1)
    handles = []
    for layer_idx, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        kv_heads = model.config.num_key_value_heads
        group = model.config.num_attention_heads // kv_heads
        visible = torch.ones(total, total, dtype=torch.bool).tril()[None, None].repeat(batch, kv_heads, 1, 1)
        visible &= valid[:, None, None, :]
        for step, held in enumerate(seen):
            row_index = n + step
            visible[:, :, row_index] = False
            for (row, head), kept in held[layer_idx].items():
                visible[row, head, row_index, sorted(kept)] = True
            visible[:, :, row_index, row_index] = True
            visible[:, :, row_index] &= valid[:, None, :]
        visible = visible.repeat_interleave(group, dim=1)

        def hook(module, args, kwargs, visible=visible):
            if module.config._attn_implementation == "eager":
                additive = torch.zeros(visible.shape, dtype=kwargs["hidden_states"].dtype)
                kwargs["attention_mask"] = additive.masked_fill_(~visible, torch.finfo(additive.dtype).min)
            else:
                kwargs["attention_mask"] = visible
            return args, kwargs

        handles.append(attention.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        return model(input_ids=full_ids, position_ids=positions).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prefill_ratio", [0.0, 0.5])
def test_decoding_compression_matches_the_masked_reference(attn, prefill_ratio):
    model = tiny_model(attn=attn, layers=3)
    ids, mask = random_ids(2, 24), torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0  # left padding on row 1
    press = ComposeDecodingPress(ComposePress(prefill_ratio, query_source="bidirectional"), compression_interval=4,
                                 target_size=10, hidden_states_buffer_size=3)
    logits, tokens, seen, cache = compressed_run(model, ids, mask, press, steps=13)
    assert press._generation is None  # its state went with the with block, and every hook but the mask hooks
    assert (len(model.model._forward_pre_hooks), len(model.model._forward_hooks)) == (1, 0)
    assert press.base_press._attachment is None
    reference = reference_logits(model, ids, mask, tokens, seen)
    n = ids.shape[1]
    for step in range(1, len(logits)):
        torch.testing.assert_close(logits[step][:, -1], reference[:, n + step - 1], atol=2e-5, rtol=1e-4)
    # 13 steps at interval 4: compressed three times to 3 x 10 entries, then one token more
    assert sum(cache_layer_lengths(cache)) == 3 * 10 + 3 * 1
    for held_before in seen[5:]:  # padding is never kept once compressed
        for layer in held_before:
            assert not set(range(5)) & layer[(1, 0)] and not set(range(5)) & layer[(1, 1)]


def test_shared_allocation_during_decoding_keeps_one_token_set_and_matches_the_masked_reference():
    model = tiny_model(layers=3)
    ids, mask = random_ids(2, 24), torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    base = ComposePress(0.0, query_source="bidirectional", layer_allocation="shared", score_pooling=3)
    press = ComposeDecodingPress(base, compression_interval=4, target_size=10, hidden_states_buffer_size=3)
    logits, tokens, seen, cache = compressed_run(model, ids, mask, press, steps=13)
    reference = reference_logits(model, ids, mask, tokens, seen)
    n = ids.shape[1]
    for step in range(1, len(logits)):
        torch.testing.assert_close(logits[step][:, -1], reference[:, n + step - 1], atol=2e-5, rtol=1e-4)
    assert cache_layer_lengths(cache) == [10 + 1] * 3  # the same number in every layer
    for held_before in seen[5:]:  # once compressed, every layer and head of a row holds the same positions
        for row in range(2):
            sets = [layer[(row, head)] for layer in held_before for head in range(2)]
            assert all(kept == sets[0] for kept in sets)


def test_composite_tokens_and_global_allocation_during_decoding():
    model = tiny_model(layers=4)
    press = ComposeDecodingPress(ComposePress(0.0, query_source="prefill", layer_allocation="global"),
                                 compression_interval=6, target_size=8)
    with torch.no_grad(), press(model):
        cache = DynamicCache()
        model.generate(random_ids(1, 30), past_key_values=cache, max_new_tokens=7, do_sample=False)
    lengths = cache_layer_lengths(cache)
    assert sum(lengths) == 4 * 8 and len(set(lengths)) > 1  # one budget over layers, not 8 in each
    assert press.base_press.last_budgets.tolist() == lengths


def test_prefill_and_decoding_compression_combine():
    model = tiny_model(layers=3)
    press = ComposeDecodingPress(ComposePress(0.5, query_source="replay"), compression_interval=5, target_size=9)
    with torch.no_grad(), press(model):
        cache = DynamicCache()
        model.model(input_ids=random_ids(1, 40), past_key_values=cache)
        assert sum(cache_layer_lengths(cache)) == compute_n_kept(3 * 40, 0.5)  # the prefill, by ComposePress
        for step in range(5):
            model(input_ids=random_ids(1, 1, seed=step), past_key_values=cache,
                  position_ids=torch.tensor([[40 + step]]))
    assert sum(cache_layer_lengths(cache)) == 3 * 9


def test_it_is_a_kvpress_decoding_press_that_kvpress_pipeline_runs_during_decoding(tmp_path, monkeypatch):
    from transformers import pipeline

    from evaluation.tasks.word_tasks import build_tokenizer
    from tests.test_evaluation import tiny_model_folder

    with pytest.raises(AssertionError):  # kvpress's own DecodingPress refuses a press that is not a ScorerPress
        DecodingPress(base_press=ComposePress())
    press = ComposeDecodingPress(ComposePress(), compression_interval=4, target_size=16)
    assert isinstance(press, DecodingPress)
    budgets = []
    original = ComposePress.compress_scored
    def counted(self, cache, scores, n_kept, *layer_indices):
        budgets.append(n_kept)
        return original(self, cache, scores, n_kept, *layer_indices)

    monkeypatch.setattr(ComposePress, "compress_scored", counted)
    pipe = pipeline("kv-press-text-generation", model=str(tiny_model_folder(tmp_path / "m")),
                    tokenizer=build_tokenizer(), device="cpu")
    answer = pipe(" ".join(["| k001 v002"] + ["tree"] * 30), question="? k001", press=press, max_new_tokens=10)
    assert isinstance(answer["answer"], str)
    assert budgets and set(budgets) == {2 * 16}  # the tiny model's 2 layers, compressed during decoding


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"base_press": KnormPress()}, "base_press must be a ComposePress"),
    ({"base_press": ComposePress(structured=False)}, "must be structured"),
    ({"target_size": 0}, "target_size must be an int >= 1"),
    ({"compression_interval": 0}, "compression_interval must be an int >= 1"),
    ({"hidden_states_buffer_size": 1.5}, "hidden_states_buffer_size must be an int >= 1"),
])
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        ComposeDecodingPress(**{"base_press": ComposePress(), **kwargs})


def test_a_scorer_can_score_during_decoding():
    model = tiny_model(layers=3)
    press = ComposeDecodingPress(ComposePress(0.0, scorer=SnapKVPress(window_size=2)), compression_interval=4,
                                 target_size=6, hidden_states_buffer_size=4)
    with torch.no_grad(), press(model):
        cache = DynamicCache()
        model.generate(random_ids(1, 20), past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert sum(cache_layer_lengths(cache)) == 3 * 6


def test_the_decoding_benchmark_compares_on_the_same_continuation(tmp_path):
    import json

    from evaluation.bench import decoding as bench_decoding

    figures = bench_decoding.main(["--tokens", "80", "--interval", "70", "--target-size", "40", "--context-words",
                                   "128", "--json", str(tmp_path / "b.json")])
    results = figures["results"]
    assert json.loads((tmp_path / "b.json").read_text())["results"] == results
    assert results["none"]["kl"] == 0 and results["none"]["top1_agreement"] == 1
    assert results["none"]["peak_entries_per_layer_head"] == 129 + 80  # <s>, 128 words, 80 decoded: never cut
    for name in ("compose_decoding", "decoding_snapkv", "decoding_knorm"):  # one compression at token 70
        assert results[name]["peak_entries_per_layer_head"] == 129 + 69  # the 70th compresses in its forward
        assert results[name]["kl"] > 0


@pytest.mark.parametrize("settings", [["--buffer", "32"], ["--interval", "64"]])
def test_the_decoding_benchmark_names_a_buffer_too_short_for_snapkv(settings, capsys):
    from evaluation.bench import decoding as bench_decoding

    with pytest.raises(SystemExit):
        bench_decoding.main(["--tokens", "8", *settings])
    assert "--buffer must be >= 64 and --interval >= 65" in capsys.readouterr().err


def test_the_decoding_benchmark_bootstrap_interval_brackets_the_mean():
    from evaluation.metrics.accuracy import bootstrap_mean_interval

    assert bootstrap_mean_interval([0.5]) == (0.5, 0.5)  # one context: nothing to resample
    assert bootstrap_mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    low, high = bootstrap_mean_interval([0.0, 1.0] * 50)  # mean 0.5, standard error 0.05
    assert 0.39 < low < 0.42 and 0.58 < high < 0.61  # about 0.5 -/+ 1.96 x 0.05
    assert bootstrap_mean_interval([0.0, 1.0, 3.0], seed=1) == bootstrap_mean_interval([0.0, 1.0, 3.0], seed=1)
    low, high = bootstrap_mean_interval([0.0, 1.0, 3.0])
    assert 0.0 <= low < 4 / 3 < high <= 3.0
    with pytest.raises(ValueError, match="values must be a non-empty 1-d sequence"):
        bootstrap_mean_interval([])


def test_the_decoding_benchmark_cuts_consecutive_prose_windows():
    from evaluation.bench.decoding import leading_special_tokens, prose_windows

    ids = list(range(1000))
    pairs = prose_windows(ids, n_contexts=4, context_tokens=100, continuation_tokens=50, seed=3)
    assert len(pairs) == 4
    starts = [context[0] for context, _ in pairs]
    for i, (context, continuation) in enumerate(pairs):
        assert len(context) == 100 and len(continuation) == 50
        assert context + continuation == list(range(context[0], context[0] + 150))  # the text goes on unbroken
        assert 250 * i <= context[0] <= 250 * (i + 1) - 150  # inside its own quarter: windows never overlap
    assert pairs == prose_windows(ids, 4, 100, 50, seed=3) and starts != [c[0] for c, _ in prose_windows(
        ids, 4, 100, 50, seed=4)]
    with pytest.raises(ValueError, match="fewer than n_contexts=4 windows"):
        prose_windows(list(range(500)), 4, 100, 50)
    with pytest.raises(ValueError, match="context_tokens must be an int >= 1"):
        prose_windows(ids, 4, 0, 50)

    class Tokenizer:  # adds a BOS (id 1) before the text's words
        def __call__(self, text, add_special_tokens=True):
            words = [len(word) + 10 for word in text.split()]
            return type("Encoding", (), {"input_ids": [1] * add_special_tokens + words})

    assert leading_special_tokens(Tokenizer()) == [1]


def test_a_cache_that_cannot_be_compressed_is_named():
    from transformers import StaticCache

    model = tiny_model(layers=2)
    cache = StaticCache(config=model.config, max_cache_len=64)
    press = ComposeDecodingPress(ComposePress(), compression_interval=2, target_size=4)
    with torch.no_grad(), press(model), pytest.raises(ValueError, match="got a StaticCache"):
        model.generate(random_ids(1, 10), past_key_values=cache, max_new_tokens=3, do_sample=False)


def test_a_quantized_cache_is_compressed_during_decoding():
    pytest.importorskip("optimum.quanto")
    from tests.models import quantized_cache

    model = tiny_model(layers=2)
    cache = quantized_cache(model)
    press = ComposeDecodingPress(ComposePress(), compression_interval=4, target_size=10)
    with torch.no_grad(), press(model):
        model.generate(random_ids(1, 30), past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert sum(cache_layer_lengths(cache)) == 2 * 10


def test_the_base_press_sinks_are_kept_by_every_decoding_compression():
    model = tiny_model(layers=3)
    ids = random_ids(1, 30)
    with_sinks = ComposeDecodingPress(ComposePress(0.0, query_source="prefill", n_sink=2), compression_interval=6,
                                      target_size=6)
    full = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=full)
    with torch.no_grad(), with_sinks(model):
        cache = DynamicCache()
        model.generate(ids, past_key_values=cache, max_new_tokens=7, do_sample=False)
    for kept, whole in zip(cache.layers, full.layers):  # the first two context entries of every head survive
        torch.testing.assert_close(kept.keys[:, :, :2], whole.keys[:, :, :2])
