"""kvpress's press contract as it applies to ComposePress (the shape of kvpress's tests/presses/test_presses.py and
tests/test_pipeline.py, written for this project): hooks added and removed, the cache really compressed to the
global budget (a total over layers, not int((1 - r) n) per layer), the pipeline with and without questions."""

import logging

import pytest
import torch
from kvpress import KnormPress
from transformers import pipeline

from evaluation.tasks.word_tasks import build_tokenizer
from kvpress_compose import ComposePress, compute_n_kept
from tests.models import cache_layer_lengths, prefill, random_ids, tiny_model

PRESSES = {
    "prefill": lambda: ComposePress(0.5, query_source="prefill", layer_allocation="global"),
    "bidirectional": lambda: ComposePress(0.5, query_source="bidirectional", layer_allocation="global"),
    "replay": lambda: ComposePress(0.5, query_source="replay", layer_allocation="global"),
    "scorer": lambda: ComposePress(0.5, scorer=KnormPress(), layer_allocation="global"),
}


def hook_counts(model):
    decoder = model.model
    return (len(decoder._forward_pre_hooks), len(decoder._forward_hooks),
            [len(layer.self_attn._forward_hooks) for layer in decoder.layers])


@pytest.mark.parametrize("name", PRESSES)
def test_hooks_are_added_in_use_and_removed_after(name):
    model = tiny_model(layers=3)
    prefill(model, random_ids(1, 20), PRESSES[name]())  # installs the permanent per-layer mask hooks
    before = hook_counts(model)
    press = PRESSES[name]()
    with press(model):
        pre, post, per_layer = hook_counts(model)
        assert (pre, post) == (before[0] + 1, before[1] + 2)  # the prefill's start, its finish and its end
        assert per_layer == [count + 1 for count in before[2]]  # kvpress's forward hook on each layer
    assert hook_counts(model) == before


@pytest.mark.parametrize("name", PRESSES)
def test_the_cache_is_compressed_to_the_global_budget(name):
    model, n = tiny_model(layers=4), 48
    cache = prefill(model, random_ids(2, n), PRESSES[name]())
    lengths = cache_layer_lengths(cache)
    assert sum(lengths) == compute_n_kept(4 * n, 0.5)  # a total over layers
    for layer in cache.layers:  # dense (batch, kv_heads, k_l, head_dim) tensors
        assert layer.keys.shape[:2] == (2, 2) and layer.keys.shape == layer.values.shape


def test_layers_keep_different_numbers_where_their_scores_differ():
    cache = prefill(tiny_model(layers=4), random_ids(1, 48), ComposePress(0.5, query_source="bidirectional", layer_allocation="global"))
    assert len(set(cache_layer_lengths(cache))) > 1  # not int((1 - r) n) in every layer


@pytest.mark.parametrize("questions", [None, ["? k001"], ["? k001", "? k002"]], ids=["none", "one", "two"])
def test_pipeline_with_and_without_questions(questions, tmp_path):
    from tests.test_evaluation import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "model")
    pipe = pipeline("kv-press-text-generation", model=str(folder), tokenizer=build_tokenizer(), device="cpu")
    context = " ".join(["| k001 v002"] + ["tree"] * 40)
    press = ComposePress(0.5, query_source="replay", layer_allocation="global")
    if questions is None:  # no question: our tokenizer has no chat template, so the answer prefix is all that follows
        output = pipe(context, answer_prefix="? k001", press=press, max_new_tokens=2)
        assert isinstance(output["answer"], str)
    elif len(questions) == 1:
        output = pipe(context, question=questions[0], press=press, max_new_tokens=2)
        assert isinstance(output["answer"], str)
    else:
        output = pipe(context, questions=questions, press=press, max_new_tokens=2)
        assert len(output["answers"]) == 2
    n_layers = 2
    assert int(press.last_budgets.sum()) == compute_n_kept(n_layers * (len(context.split()) + 1), 0.5)


def test_a_log_line_says_what_each_layer_kept(caplog):
    press = ComposePress(0.5, query_source="prefill", layer_allocation="global")
    with caplog.at_level(logging.INFO, logger="kvpress_compose.compose_press"):
        prefill(tiny_model(layers=3), random_ids(1, 30), press)
    expected = ("kept 45 of 90 entries per KV head (budget 45, compression_ratio=0.5); "
                f"per layer: {press.last_budgets.tolist()}")
    assert expected in caplog.text
    assert torch.is_tensor(press.last_budgets)
