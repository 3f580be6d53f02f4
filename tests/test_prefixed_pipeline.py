"""The pipeline that answers each question after its own answer prefix (RULER names the asked key in it) from one
compression of the context (evaluation.runner.prefixed_pipeline)."""

from __future__ import annotations

import random

import pytest
from kvpress import KnormPress
from transformers import pipeline

from evaluation.runner.prefixed_pipeline import PrefixedQuestionsPipeline
from evaluation.runner.run import answer_prefixes
from evaluation.tasks.word_tasks import build_tokenizer, make_sample, vocabulary
from tests.models import tiny_model


class CountingKnorm(KnormPress):
    """Knorm that counts the layers it compresses."""

    calls = 0

    def compress(self, *args, **kwargs):
        CountingKnorm.calls += 1
        return super().compress(*args, **kwargs)


def test_each_question_is_answered_after_its_own_prefix_from_one_compression():
    tokenizer = build_tokenizer()
    model = tiny_model(layers=3, vocab=len(vocabulary()))
    model.generation_config.eos_token_id = None
    sample = make_sample("niah_multiquery", 120, random.Random(0))
    questions = sample.questions[:3]
    words = vocabulary()
    prefixes = [f"{words[10]} {words[11]}", words[12], f"{words[13]} {words[10]} {words[14]}"]
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu",
                    pipeline_class=PrefixedQuestionsPipeline)
    press = CountingKnorm(compression_ratio=0.5)
    CountingKnorm.calls = 0
    answers = pipe(sample.context, questions=questions, answer_prefix=prefixes, press=press, max_new_tokens=4)
    assert CountingKnorm.calls == 3  # one compression: each of the 3 layers once
    one_by_one = [pipe(sample.context, question=q, answer_prefix=p, press=press, max_new_tokens=4)["answer"]
                  for q, p in zip(questions, prefixes)]
    assert CountingKnorm.calls == 3 + 3 * 3
    assert answers["answers"] == one_by_one
    # the prefix matters here: a shared prefix answers differently
    shared = pipe(sample.context, questions=questions, answer_prefix=prefixes[0], press=press, max_new_tokens=4)
    assert shared["answers"][0] == one_by_one[0] and shared["answers"] != one_by_one
    with pytest.raises(ValueError, match="answer_prefix: 2 prefixes for 3 questions"):
        pipe(sample.context, questions=questions, answer_prefix=prefixes[:2], press=press)


def test_rows_pass_one_prefix_where_they_share_it_and_a_list_where_they_differ():
    import pandas as pd

    assert answer_prefixes(pd.DataFrame({"answer_prefix": ["a", "a"]})) == "a"
    assert answer_prefixes(pd.DataFrame({"answer_prefix": ["a", "b"]})) == ["a", "b"]
