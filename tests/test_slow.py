"""Long-context and shipped-model checks; excluded by default, run with ``python -m pytest -m slow``."""

from pathlib import Path

import pytest
import torch

from evaluation.synthetic_tasks import TASKS, dataset_rows
from kvpress_compose import ComposePress, compute_n_kept
from tests.models import random_ids, tiny_model
from tests.reference import compressed_vs_reference
from tests.test_exactness import assert_same_logits

pytestmark = pytest.mark.slow
SHIPPED_MODEL = Path(__file__).parents[1] / "evaluation" / "models" / "retrieval-llama"


@pytest.mark.parametrize("query_source", ["prefill", "bidirectional", "replay"])
def test_long_context_matches_reference(query_source):
    model = tiny_model(layers=4)
    press = ComposePress(compression_ratio=0.75, query_source=query_source)
    compressed, reference, kept = compressed_vs_reference(model, random_ids(1, 4096), press, random_ids(1, 8, seed=3))
    assert sum(int(k[0, 0].sum()) for k in kept) == compute_n_kept(4 * 4096, 0.75)
    assert_same_logits(compressed, reference, atol=1e-4)


@pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(), reason="no shipped model")
@pytest.mark.xfail(reason="the shipped snapshot is mid-curriculum (see its README.md); 95% is the bar to reach")
def test_shipped_model_answers_every_task_uncompressed_and_at_half_compression():
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    for task in TASKS:
        rows = dataset_rows(task, n_contexts=10, n_words=1024, seed=123)
        correct = 0
        for row in rows:
            answer = pipe(row["context"], question=row["question"], max_new_tokens=row["max_new_tokens"])["answer"]
            correct += answer.split()[: len(row["answer"].split())] == row["answer"].split()
        assert correct / len(rows) >= 0.95, f"{task}: {correct}/{len(rows)}"
    cache_lengths = []
    press = ComposePress(compression_ratio=0.5, query_source="replay")
    row = dataset_rows("niah_single", 1, 1024, seed=5)[0]
    pipe(row["context"], question=row["question"], press=press, max_new_tokens=2)
    cache_lengths.append(int(press.last_budgets.sum()))
    assert cache_lengths[0] == compute_n_kept(model.config.num_hidden_layers * (1024 + 1), 0.5)
    assert torch.is_tensor(press.last_scores)
