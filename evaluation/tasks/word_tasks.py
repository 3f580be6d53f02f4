"""RULER-style synthetic long-context retrieval tasks over a small word-level vocabulary.

Every context is filler words with *needles* inserted at random places. A needle starts with the marker
``|``, then a key, then what the key maps to. A question is ``? KEY`` and the answer is what follows the
key in its needle, so every task is solved by in-context retrieval (an induction head), which a small model
trained from scratch can learn on a CPU:

- ``niah_single``: one needle ``| k017 v203``; question ``? k017``; answer ``v203``.
- ``niah_multikey``: many needles with distinct keys (distractors); one is asked.
- ``niah_multivalue``: one key holds several values written together, ``| k017 v203 v011 v145``; the answer
  lists them all (RULER scatters the values; ours are contiguous so that a small model can copy them).
- ``niah_multiquery``: many needles; several questions about the same context (one compression, several
  answers, as kvpress's pipeline does with ``questions=[...]``).
- ``variable_tracking``: a chain ``| k001 v042`` ... ``| k007 k001`` ... ``| k033 k007``; question ``? k033``;
  the answer walks the chain back, ``k007 k001 v042``.

Two *dense* tasks make the cache budget bind: needles for up to every key (one per 8 words, at most 256) spread
over the whole context, four questions per context. Since any key may be asked, a query-agnostic press must
keep every needle's answer tokens:

- ``dense_kv``: needles ``| k017 v203``, every value used once; answer ``v203`` (at 4096 words: 256 needles,
  19% of the context; the answers alone are 6%).
- ``dense_multivalue``: needles ``| k017 v203 v118``, the first values all different and so the second ones;
  answer ``v203 v118`` (at 4096 words: 25% of the context; the answers alone are 12.5%). What follows a
  needle's values is a filler word (or a mark) in both tasks, so where an answer ends is never ambiguous.

Rows follow kvpress's dataset columns: ``context``, ``question``, ``answer_prefix``, ``answer`` (a list of
strings, as kvpress's RULER data has it), ``max_new_tokens``, ``task``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
NEEDLE_MARK, QUESTION_MARK = "|", "?"
N_KEYS, N_VALUES = 256, 256
FILLER_WORDS = (
    "the a an of to in on at by for with from and or but not is are was were be been has have had do does "
    "did this that these those it its they them their we our you your he she his her one two three four "
    "five six seven eight nine ten time year day way man world life hand part child eye woman place work "
    "week case point number group problem fact water room mother area money story month lot right study "
    "book job word business issue side kind head house service friend father power hour game line end "
    "member law car city name team minute idea kid body back parent face others level office door health "
    "person art war history party result change morning reason research girl guy moment air teacher force "
    "education green blue red grass sky sun tree river stone road field hill light small large old new good"
).split()
KEYS = [f"k{i:03d}" for i in range(N_KEYS)]
VALUES = [f"v{i:03d}" for i in range(N_VALUES)]
BASE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking")
DENSE_TASKS = ("dense_kv", "dense_multivalue")
TASKS = BASE_TASKS + DENSE_TASKS
DENSE_WORDS_PER_NEEDLE, DENSE_QUESTIONS = 8, 4


def vocabulary() -> list[str]:
    """The model's whole vocabulary, special tokens first (ids are list positions)."""
    return SPECIAL_TOKENS + [NEEDLE_MARK, QUESTION_MARK] + FILLER_WORDS + KEYS + VALUES


def build_tokenizer(model_max_length: int = 32768) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :func:`vocabulary` (whitespace-split, one token per word)."""
    vocab = {token: i for i, token in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


@dataclass
class Sample:
    """One context with its questions and answers (``questions[i]`` is answered by ``answers[i]``)."""

    task: str
    context: str
    questions: list[str]
    answers: list[str]


def _dense_needles(task: str, n_words: int, rng: random.Random) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """One needle per ``DENSE_WORDS_PER_NEEDLE`` words (at most one per key), distinct values, four asked."""
    n_needles = min(N_KEYS, N_VALUES, n_words // DENSE_WORDS_PER_NEEDLE)
    keys, values = rng.sample(KEYS, n_needles), rng.sample(VALUES, n_needles)
    if task == "dense_kv":
        answers = [[v] for v in values]
    else:
        answers = [[v, second] for v, second in zip(values, rng.sample(VALUES, n_needles))]
    asked = rng.sample(range(n_needles), min(DENSE_QUESTIONS, n_needles))
    return [[k, *a] for k, a in zip(keys, answers)], [(keys[i], " ".join(answers[i])) for i in asked]


def _needles(task: str, n_words: int, rng: random.Random) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """Needles (token lists without the mark) and (question key, answer) pairs for one task."""
    if task in DENSE_TASKS:
        return _dense_needles(task, n_words, rng)
    keys = rng.sample(KEYS, 24)
    values = rng.sample(VALUES, 24)
    if task == "niah_single":
        return [[keys[0], values[0]]], [(keys[0], values[0])]
    if task in ("niah_multikey", "niah_multiquery"):
        n_needles = rng.randint(4, 16)
        needles = [[k, v] for k, v in zip(keys[:n_needles], values[:n_needles])]
        n_questions = 1 if task == "niah_multikey" else min(4, n_needles)
        asked = rng.sample(range(n_needles), n_questions)
        return needles, [(keys[i], values[i]) for i in asked]
    if task == "niah_multivalue":
        n_values = rng.randint(2, 4)
        distractors = [[k, v] for k, v in zip(keys[1:4], values[n_values : n_values + 3])]
        return [[keys[0], *values[:n_values]], *distractors], [(keys[0], " ".join(values[:n_values]))]
    if task == "variable_tracking":
        hops = rng.randint(2, 4)  # chain keys[0] <- keys[1] <- ... <- keys[hops - 1]
        chain = [[keys[0], values[0]]] + [[keys[i], keys[i - 1]] for i in range(1, hops)]
        distractor_chain = [[keys[hops], values[1]], [keys[hops + 1], keys[hops]]]
        answer = " ".join([keys[i] for i in range(hops - 2, -1, -1)] + [values[0]])
        return chain + distractor_chain, [(keys[hops - 1], answer)]
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def make_sample(task: str, n_words: int, rng: random.Random) -> Sample:
    """A context of ``n_words`` words (filler plus needles, each needle one token per word)."""
    needles, qa = _needles(task, n_words, rng)
    needle_words = sum(len(n) + 1 for n in needles)
    if n_words < needle_words + 8:
        raise ValueError(f"n_words={n_words} is too short for task {task!r} (needs >= {needle_words + 8})")
    filler = [rng.choice(FILLER_WORDS) for _ in range(n_words - needle_words)]
    slots = sorted(rng.sample(range(len(filler) + 1), len(needles)))
    if task == "variable_tracking":  # definitions appear in chain order: value first, then each alias
        order = list(range(len(needles)))
    else:
        order = rng.sample(range(len(needles)), len(needles))
    words: list[str] = []
    previous = 0
    for slot, needle_index in zip(slots, order):
        words += filler[previous:slot] + [NEEDLE_MARK] + needles[needle_index]
        previous = slot
    words += filler[previous:]
    return Sample(
        task=task,
        context=" ".join(words),
        questions=[f"{QUESTION_MARK} {key}" for key, _ in qa],
        answers=[answer for _, answer in qa],
    )


def dataset_rows(task: str, n_contexts: int, n_words: int, seed: int) -> list[dict]:
    """kvpress-style rows: one per question; rows of one context share the ``context`` string."""
    rng = random.Random(f"{task}-{n_words}-{seed}")
    rows = []
    for _ in range(n_contexts):
        sample = make_sample(task, n_words, rng)
        for question, answer in zip(sample.questions, sample.answers):
            rows.append(
                {
                    "context": sample.context,
                    "question": question,
                    "answer_prefix": "",
                    "answer": answer.split(),  # kvpress's RULER format: a list, each word scored on its own
                    "max_new_tokens": len(answer.split()) + 1,
                    "task": task,
                }
            )
    return rows
