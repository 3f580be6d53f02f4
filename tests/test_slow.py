"""Long-context and shipped-model checks; excluded by default, run with ``python -m pytest -m slow``."""

from pathlib import Path

import pytest

from evaluation.tasks.word_tasks import BASE_TASKS as TASKS
from evaluation.tasks.word_tasks import TASKS as ALL_TASKS
from evaluation.tasks.word_tasks import dataset_rows
from kvpress_compose import ComposePress, compute_n_kept
from tests.models import random_ids, tiny_model
from tests.reference import compressed_vs_reference
from tests.test_exactness import assert_same_logits

pytestmark = pytest.mark.slow
SHIPPED_MODEL = Path(__file__).parents[1] / "evaluation" / "models" / "retrieval-llama"
GQA_MODEL = Path(__file__).parents[1] / "evaluation" / "models" / "retrieval-llama-gqa"


@pytest.mark.parametrize("query_source", ["prefill", "bidirectional", "replay"])
def test_long_context_matches_reference(query_source):
    model = tiny_model(layers=4)
    press = ComposePress(compression_ratio=0.75, query_source=query_source)
    compressed, reference, kept = compressed_vs_reference(model, random_ids(1, 4096), press, random_ids(1, 8, seed=3))
    assert sum(int(k[0, 0].sum()) for k in kept) == compute_n_kept(4 * 4096, 0.75)
    assert_same_logits(compressed, reference, atol=1e-4)


def shipped_pipeline(folder=SHIPPED_MODEL):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")


def accuracy(pipe, task, n_words, press=None, n_contexts=10):
    rows = dataset_rows(task, n_contexts=n_contexts, n_words=n_words, seed=123)
    correct = 0
    for row in rows:
        answer = pipe(row["context"], question=row["question"], press=press, max_new_tokens=row["max_new_tokens"])
        expected = " ".join(row["answer"]).split()
        correct += answer["answer"].split()[: len(expected)] == expected
    return correct / len(rows)


needs_model = pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(), reason="no shipped model")


@needs_model
@pytest.mark.parametrize("task", TASKS)
def test_shipped_model_answers_every_task_at_1024_tokens(task):
    assert accuracy(shipped_pipeline(), task, 1024) >= 0.95


@needs_model
@pytest.mark.parametrize("task", TASKS)
def test_shipped_model_answers_every_task_at_4096_tokens(task):
    assert accuracy(shipped_pipeline(), task, 4096, n_contexts=5) >= 0.95


def gqa_model_trained() -> bool:
    """Whether the GQA model's card says it passed every task at 4096 words (``--until-trained``)."""
    card = GQA_MODEL / "README.md"
    return card.is_file() and "every task reached 95% at 4096 words" in card.read_text()


@pytest.mark.skipif(not gqa_model_trained(), reason="retrieval-llama-gqa has not passed every task at 4096 words yet")
@pytest.mark.parametrize("task", ALL_TASKS)
def test_gqa_model_answers_every_task_at_4096_tokens(task):
    assert accuracy(shipped_pipeline(GQA_MODEL), task, 4096, n_contexts=5) >= 0.95


@needs_model
def test_shipped_model_through_the_pipeline_with_compose_press():
    press = ComposePress(compression_ratio=0.5, query_source="replay")
    accuracy(shipped_pipeline(), "niah_single", 1024, press=press, n_contexts=1)
    config_layers = 4
    assert int(press.last_budgets.sum()) == compute_n_kept(config_layers * (1024 + 1), 0.5)


def test_speed_benchmark_runs_and_checks_the_cache_bytes(tmp_path, capsys):
    import json

    from evaluation.bench import speed as bench_speed

    bench_speed.main(["--lengths", "128", "--repeats", "1", "--decode-steps", "2", "--threads", "1",
                      "--json", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png")])
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")
    figures = json.loads((tmp_path / "bench.json").read_text())
    methods = {row["method"] for row in figures["rows"]}
    assert methods == {"plain prefill", "compose[prefill]", "compose[prefill_seen]", "compose[bidirectional]",
                       "compose[replay]", "compose[replay_local]", "compose[replay_prompted]", "snapkv",
                       "kvpress KVzipPress", "kvpress KVComposePress"}  # every query source, and kvpress's
    assert figures["cache"][0]["kept_bytes_fraction"] == 0.5
    assert set(figures["decode_tokens_per_s"]) == {"0.0", "0.5", "0.75"}
    assert "against the targets" in capsys.readouterr().out
