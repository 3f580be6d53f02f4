"""Chunked scores equal the attention probabilities of a full eager forward (output_attentions)."""

import pytest
import torch

from kvpress_compose import ComposePress
from tests.models import prefill, random_ids, tiny_model


def reference_scores(attentions, rows: slice, n: int, agg_task="max", group=2):
    """(layers, batch, kv_heads, n) from full attention matrices: agg over rows, mean over the GQA group."""
    per_layer = []
    for layer_attention in attentions:  # (batch, q_heads, q, k)
        probs = layer_attention[:, :, rows, :n]
        stat = probs.amax(dim=2) if agg_task == "max" else probs.mean(dim=2)
        per_layer.append(stat.unflatten(1, (-1, group)).mean(dim=2))
    return torch.stack(per_layer)


def press_scores(model, ids, block_size=None, **kwargs):
    press = ComposePress(compression_ratio=0.5, add_mean_across_heads=False, score_block_size=block_size, **kwargs)
    prefill(model, ids, press)
    return press.last_scores


def replay_reference(n=30):
    """A model, a context and its replay scores from an eager forward of the context written twice."""
    model = tiny_model(attn="eager")
    ids = random_ids(1, n)
    with torch.no_grad():
        attentions = model(torch.cat([ids, ids], dim=1), output_attentions=True).attentions
    return model, ids, reference_scores(attentions, slice(n, 2 * n), n)


@pytest.mark.parametrize("agg_task", ["max", "mean"])
@pytest.mark.parametrize("block_size", [None, 7])
def test_prefill_scores_equal_causal_attention(agg_task, block_size):
    model = tiny_model(attn="eager")
    ids = random_ids(1, 30)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    expected = reference_scores(attentions, slice(None), 30, agg_task)
    actual = press_scores(model, ids, block_size, query_source="prefill", agg_task=agg_task)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("block_size", [None, 5])
def test_replay_scores_equal_attention_of_the_context_fed_twice(block_size):
    model, ids, expected = replay_reference()
    actual = press_scores(model, ids, block_size, query_source="replay")
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)


def test_bidirectional_scores_equal_unmasked_attention_in_the_first_layer():
    model = tiny_model(attn="eager")
    ids = random_ids(1, 30)
    all_visible = torch.zeros(1, 1, 30, 30)  # additive eager mask: nothing hidden
    with torch.no_grad():
        attentions = model(ids, attention_mask=all_visible, output_attentions=True).attentions
    expected = reference_scores(attentions[:1], slice(None), 30)
    actual = press_scores(model, ids, 4, query_source="bidirectional")[:1]
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)


def test_group_max_and_value_norm_enhancement():
    model = tiny_model(attn="eager")
    ids = random_ids(1, 24)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    cache = prefill(model, ids)
    probs = torch.stack([a.amax(dim=2).unflatten(1, (-1, 2)).amax(dim=2) for a in attentions])
    value_norms = torch.stack([layer.values.norm(dim=-1) for layer in cache.layers])
    expected = probs * value_norms
    actual = press_scores(model, ids, query_source="prefill", agg_group="max", add_v_norm=True)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)


def test_replay_in_chunks_gives_the_same_scores(monkeypatch):
    model, ids, expected = replay_reference()
    monkeypatch.setattr("kvpress_compose.replay.MIN_REPLAY_CHUNK", 7)
    monkeypatch.setattr("kvpress_compose.replay.MAX_REPLAY_CHUNK", 7)
    actual = press_scores(model, ids, 4, query_source="replay")
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)


def test_a_rotary_embedding_other_than_cos_sin_is_refused_by_name():
    """Llama 4 passes one complex tensor: its queries cannot be recomputed, and the error says what works."""
    from kvpress_compose.attention_scores import query_blocks

    model = tiny_model()
    hidden = torch.zeros(1, 4, model.config.hidden_size)
    with pytest.raises(ValueError, match="query_source='prefill' or 'bidirectional'"):
        query_blocks(model.model.layers[0].self_attn, hidden, torch.zeros(1, 4, 8, dtype=torch.complex64))


@pytest.mark.parametrize("query_source", ["replay", "replay_local"])
def test_replay_forward_stops_after_the_last_attention_layer(query_source, monkeypatch):
    """What follows the last layer's attention in a replay forward is never read: its MLP does not run, in one
    pass or in chunks, and the scores stay those of the context fed twice."""
    model, ids, expected = replay_reference()
    monkeypatch.setattr("kvpress_compose.replay.MIN_REPLAY_CHUNK", 10)
    monkeypatch.setattr("kvpress_compose.replay.MAX_REPLAY_CHUNK", 10)  # 3 chunks
    calls = {index: [] for index in range(len(model.model.layers))}
    for index, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda module, args, output, index=index: calls[index].append(1))
    press = ComposePress(compression_ratio=0.5, add_mean_across_heads=False, query_source=query_source)
    prefill(model, ids, press)
    last = len(model.model.layers) - 1
    assert len(calls[last]) == 1  # the prefill's only
    assert all(len(calls[index]) == 1 + 3 for index in range(last))
    if query_source == "replay":
        torch.testing.assert_close(press.last_scores, expected, atol=1e-6, rtol=1e-4)


def prompted_replay_reference(prompt, skip=0, n=30, attn="eager"):
    """Scores of "replay_prompted" from an eager forward of the context, the prompt, then the context from
    ``skip``: the re-fed queries (prompt and context) attending to the context's keys."""
    model = tiny_model(attn="eager")
    ids = random_ids(1, n)
    sequence = torch.cat([ids, torch.tensor([prompt]), ids[:, skip:]], dim=1)
    with torch.no_grad():
        attentions = model(sequence, output_attentions=True).attentions
    return ids, reference_scores(attentions, slice(n, None), n)


@pytest.mark.parametrize("attn, block_size, chunk", [("eager", None, None), ("eager", 5, 7), ("sdpa", None, None),
                                                     ("sdpa", None, 7)])
def test_prompted_replay_scores_equal_attention_of_the_context_after_the_prompt(attn, block_size, chunk,
                                                                               monkeypatch):
    if chunk is not None:
        monkeypatch.setattr("kvpress_compose.replay.MIN_REPLAY_CHUNK", chunk)
        monkeypatch.setattr("kvpress_compose.replay.MAX_REPLAY_CHUNK", chunk)
    prompt = [5, 17, 3]
    ids, expected = prompted_replay_reference(prompt)
    model = tiny_model(attn=attn)
    press = ComposePress(compression_ratio=0.5, add_mean_across_heads=False, score_block_size=block_size,
                         query_source="replay_prompted", replay_prompt_ids=prompt)
    cache = prefill(model, ids, press)
    torch.testing.assert_close(press.last_scores, expected, atol=1e-6, rtol=1e-4)
    assert sum(layer.keys.shape[2] for layer in cache.layers) == 3 * 15  # the context's entries only, halved
    assert not torch.allclose(expected, replay_reference()[2])  # the prompt does change the scores


def test_prompted_replay_does_not_refeed_the_chat_templates_opening(monkeypatch):
    from kvpress_compose import compose_press
    from kvpress_compose.query_sources import RepeatPrompt

    model = tiny_model(attn="eager")
    ids = random_ids(1, 30)
    opening = tuple(ids[0, :4].tolist())  # the context starts with the template's opening
    monkeypatch.setattr(compose_press, "repeat_prompt_from", lambda ids, path: RepeatPrompt((5, 17, 3), opening))
    press = ComposePress(compression_ratio=0.5, add_mean_across_heads=False, query_source="replay_prompted")
    prefill(model, ids, press)
    _, expected = prompted_replay_reference([5, 17, 3], skip=4)
    torch.testing.assert_close(press.last_scores, expected, atol=1e-6, rtol=1e-4)
    monkeypatch.setattr(compose_press, "repeat_prompt_from", lambda ids, path: RepeatPrompt((5, 17, 3), (1, 2, 3, 4)))
    prefill(model, ids, press)  # a context that does not start with the opening is re-fed whole
    torch.testing.assert_close(press.last_scores, prompted_replay_reference([5, 17, 3])[1], atol=1e-6, rtol=1e-4)


def test_prompted_replay_without_a_tokenizer_asks_for_the_prompt_ids():
    model, ids = tiny_model(), random_ids(1, 20)
    with pytest.raises(ValueError, match="replay_prompt_ids"):
        prefill(model, ids, ComposePress(0.5, query_source="replay_prompted"))


def test_the_repeat_prompt_is_the_instruction_in_the_chat_template():
    from kvpress_compose.query_sources import repeat_prompt_for

    class CharTokenizer:  # one token per character, a ChatML-like template
        chat_template = "chatml"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<s>user:{messages[0]['content']}</s><s>assistant:"

        def encode(self, text, add_special_tokens):
            return [ord(c) for c in text]

    prompt = repeat_prompt_for(CharTokenizer())
    assert "".join(map(chr, prompt.ids)) == "\n\nRepeat the previous context exactly.</s><s>assistant:"
    assert "".join(map(chr, prompt.template_prefix)) == "<s>user:"
    CharTokenizer.chat_template = None
    plain = repeat_prompt_for(CharTokenizer())
    assert "".join(map(chr, plain.ids)) == "\n\nRepeat the previous context exactly.\n" and plain.template_prefix == ()


def test_prefill_seen_scores_average_causal_attention_over_the_queries_that_saw_each_key():
    model = tiny_model(attn="eager")
    ids = random_ids(1, 30)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    summed = reference_scores(attentions, slice(None), 30, "mean") * 30  # sum over queries, mean over the group
    expected = summed / torch.arange(30, 0, -1)  # key j is seen by the 30 - j queries from j on
    actual = press_scores(model, ids, query_source="prefill_seen", agg_task="mean")
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="agg_task='mean'"):
        press_scores(model, ids, query_source="prefill_seen")
