"""RULER's synthetic tasks, generated offline, with lengths counted in the target model's tokens.

    python -m evaluation.tasks.ruler --tokenizer ~/.cache/kvpress-compose/models/smollm2-135m --tokens 2048 \\
        --contexts 20 --seed 0 --out evaluation/data/ruler-smollm2-2048

Our own generator for the eleven RULER tasks (Hsieh et al. 2024, NVIDIA/RULER ``scripts/synthetic.yaml``) that need
no download: ``niah_single_1/2/3``, ``niah_multikey_1/2/3``, ``niah_multivalue``, ``niah_multiquery``, ``vt``,
``cwe`` and ``fwe``, with RULER's parameters (:data:`NIAH`, :data:`VT`, :data:`CWE`, :data:`FWE`), its task
templates and answer prefixes under the plain ``base`` template (no chat template: kvpress's pipeline applies the
model's own), and its ``tokens_to_generate`` as ``max_new_tokens``. Word pools are RULER's: the ``wonderwords``
package's noun, adjective and verb lists (adjective-noun keys for the needles, single words for ``cwe``).

Lengths, as RULER counts them: ``n_tokens`` holds the prompt (context + question + `` `` + answer prefix, RULER's
input text, without special or chat template tokens) and the task's tokens to generate. As RULER does, each
context's random draws are fixed first and the haystack size (noise blocks, needle sentences, essay words, list
words) is then searched, here per context: an estimate from two small probes, then a doubling bracket and a
bisection, so the whole prompt is tokenized O(log n) times per context; the largest size whose prompt fits
``n_tokens - max_new_tokens`` wins (RULER's rule), and it must land within 2% of it, else :class:`ValueError`.
``n_tokens`` must fit the model's context.

Columns follow kvpress's RULER dataset (``evaluation/benchmarks/ruler/create_huggingface_dataset.py`` splits
RULER's input text at the last question and at the answer prefix): ``context`` is the task instruction and the
haystack up to and including the newline before the question, ``question`` the final query, ``answer_prefix``
RULER's answer prefix (here without its leading space), ``answer`` a list of strings, ``max_new_tokens``, ``task``;
plus ``haystack`` (``noise``, ``needle``, ``prose:gensim:lee_background``, ``words``, ``coded``) and
``prompt_tokens`` (the row's full prompt in the tokenizer's tokens).

Questions and prefixes are RULER's, with the key named in every niah answer prefix ("The special magic number for
{key} mentioned in the provided text is"). ``niah_multiquery`` asks RULER's one plural question for its 4 keys and
expects the 4 values in one answer. One departure, for tighter intervals at no extra compression: a context costs
one compression whatever it is asked, so the multi-key tasks ask more than RULER's one key, each key as its own row
after its own prefix: ``niah_multikey_1`` each of its 4 keys (RULER's asked key first), ``niah_multikey_2``/``_3``
(whose haystack is made of needles, each a real key-value pair) the inserted needle and
:data:`HAYSTACK_NEEDLE_ROWS` - 1 haystack needles drawn at random. The runner answers each row after its own
prefix from one compression (:mod:`evaluation.runner.prefixed_pipeline`); ``one_question`` (``--one-question``) keeps
RULER's own row alone, which is RULER's dataset exactly and what kvpress's ``evaluate.py`` (one answer prefix per
context) needs. The first row of every context is RULER's own and its prompt fits ``n_tokens``; another key's row
may be a few tokens longer or shorter.

Smaller differences: the essay haystack is the Lee background corpus of news prose (:mod:`evaluation.tasks.ruler_prose`,
shipped by the ``gensim`` wheel; RULER downloads Paul Graham's essays), cut into sentences by a small rule instead
of NLTK's punkt; like RULER every essay context starts at the corpus's first word. Needle positions are drawn once
per context as fractions of the haystack (RULER: as indices) so that a context's draws do not change while its
size is searched. ``cwe`` beyond the ~8,700 words of wonderwords' lists continues with adjective-noun compounds
(RULER switches to a downloaded word list).

Scoring (:mod:`evaluation.metrics.accuracy`): kvpress's RULER scorer, ``string_match_all`` for every task here (the share of
answer items found in the prediction as case-blind substrings, control characters removed first;
``string_match_part``, any item found, is for RULER's qa tasks, which need downloads and are not generated here).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tqdm.auto import tqdm

from ..safe_files import write_atomic
from .dataset_files import task_file, task_names_in
from .ruler_prose import PROSE_SOURCE, load_prose, split_sentences

# --- RULER's specification (scripts/synthetic.yaml, scripts/data/synthetic/constants.py) -------------------


@dataclass(frozen=True)
class NiahConfig:
    """One needle-in-a-haystack task of RULER's synthetic.yaml."""

    haystack: str  # "noise" (a repeated 5-sentence block), "essay" (prose) or "needle" (needle sentences)
    key_type: str  # "words" (adjective-noun), "numbers" (7 digits) or "uuids"
    value_type: str  # same choices as key_type
    num_k: int  # keys inserted (RULER takes max(num_needle_k, num_needle_q))
    num_v: int  # values per key, each its own needle sentence
    num_q: int  # keys asked in RULER's single question


NIAH = {
    "niah_single_1": NiahConfig("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": NiahConfig("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": NiahConfig("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", 4, 1, 4),
}
VT = {"num_chains": 1, "num_hops": 4, "icl_tokens": 500}  # noise haystack; one worked example of ~500 tokens
CWE = {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10, "short_below": 4096, "short_freq_cw": 6, "short_freq_ucw": 1}
CWE_EXAMPLE = {"long": (40, 10, 3), "short": (20, 3, 1)}  # few-shot example: (words, common repeats, uncommon)
FWE = {"alpha": 2.0, "coded_wordlen": 6, "tokens_per_vocab_word": 50}  # vocabulary of n_tokens // 50 coded words
RULER_TASKS = tuple(NIAH) + ("vt", "cwe", "fwe")
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}  # RULER's tokens_to_generate
HAYSTACK_NEEDLE_ROWS = 10  # rows asked of each niah_multikey_2/3 context: its needle + 9 haystack needles
TOLERANCE = 0.02  # a prompt lands within 2% of n_tokens
# bumped when the rows change for the same seed (2: RULER's multiquery, answer prefixes naming their keys, lengths
# counting the tokens to generate); a dataset of another format is written again
RULER_FORMAT = 2

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_INSTRUCTION = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n"
)
NIAH_QUESTION = "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = "The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
VT_ANSWER_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are: "
)
CWE_INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n"
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_ANSWER_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
FWE_INSTRUCTION = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. "
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently "
    "appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"

CARD = """---
configs:
{configs}
---
# RULER synthetic tasks

RULER's synthetic tasks from `evaluation.tasks.ruler` (ruler-format: {format}): {n_contexts} contexts per task of
{n_tokens} tokens as RULER counts them (the prompt and the tokens to generate) in the tokenizer `{tokenizer}`, seed
{seed}. Written by `python -m evaluation.tasks.ruler`. Every key of a multi-key context is asked as its own row, after
RULER's answer prefix naming that key (see the module's docstring).

| task | haystack | rows | max_new_tokens |
| --- | --- | --- | --- |
{table}
"""


def singular(text: str) -> str:
    """RULER's rewording of a niah template whose question asks a single value (``num_q * num_v == 1``)."""
    for plural, single in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(plural, single)
    return text


def task_kind(task: str) -> str:
    """``niah``, ``vt``, ``cwe`` or ``fwe``: the RULER template a task uses."""
    return "niah" if task.startswith("niah") else task


def haystack_label(task: str) -> str:
    """The ``haystack`` column of a task's rows: what fills its context around the needles."""
    if task in NIAH:
        kind = NIAH[task].haystack
        return f"prose:{PROSE_SOURCE}" if kind == "essay" else kind
    return {"vt": "noise", "cwe": "words", "fwe": "coded"}[task]


# --- word pools ------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def word_lists() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """wonderwords' (nouns, adjectives, verbs), RULER's word source, read from the installed package."""
    try:
        from wonderwords.random_word import _get_words_from_text_file
    except ImportError as error:
        raise ImportError("RULER's word pools come from `wonderwords`: pip install wonderwords") from error
    return tuple(
        tuple(_get_words_from_text_file(name)) for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt")
    )


@lru_cache(maxsize=1)
def cwe_words() -> tuple[str, ...]:
    """RULER's cwe pool: the sorted distinct nouns, adjectives and verbs."""
    return tuple(sorted({word for words in word_lists() for word in words}))


def random_needle_item(kind: str, rng: random.Random) -> str:
    """One key or value of type ``kind`` as RULER draws it."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        nouns, adjectives, _ = word_lists()
        return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle type must be words, numbers or uuids, got {kind!r}")


class UniqueDraws:
    """An endless sequence of distinct items drawn by ``draw`` from its own generator, avoiding ``taken``: item
    ``i`` is the same however far the sequence was read before, so a haystack of ``n`` items is a prefix."""

    def __init__(self, draw: Callable[[random.Random], str], seed: str, taken: set[str]):
        self.draw, self.rng, self.taken, self.items = draw, random.Random(seed), set(taken), []

    def __getitem__(self, count: slice) -> list[str]:
        while len(self.items) < count.stop:
            item = self.draw(self.rng)
            if item not in self.taken:
                self.taken.add(item)
                self.items.append(item)
        return self.items[count]


# --- one context ------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One context and its rows: ``questions[i]``, answered after ``answer_prefixes[i]``, by ``answers[i]`` (a list
    of strings)."""

    context: str
    questions: list[str]
    answers: list[list[str]]
    answer_prefixes: list[str]

    def prompt(self, row: int = 0) -> str:
        """RULER's input text for row ``row``: context, question, a space, answer prefix."""
        return f"{self.context}{self.questions[row]} {self.answer_prefixes[row]}"


Render = Callable[[int], Sample]  # haystack size -> the context at that size (its random draws fixed)


def insert_at_fractions(units: list[str], items: list[str], fractions: list[float]) -> list[str]:
    """``units`` with ``items[i]`` inserted at ``int(fractions[i] * len(units))``, inserted from the deepest."""
    units = list(units)
    positions = [int(f * len(units)) for f in fractions]
    for position, item in sorted(zip(positions, items), key=lambda pair: pair[0], reverse=True):
        units.insert(position, item)
    return units


def essay_with_needles(words: list[str], n_words: int, needles: list[str], depths: list[int]) -> str:
    """The first ``n_words`` words of the essay (repeated if short), cut into sentences, with ``needles[i]``
    placed before sentence ``int(n_sentences * depths[i] / 100)`` (RULER's insertion)."""
    repeats = -(-n_words // len(words))
    sentences = split_sentences(" ".join((words * repeats)[:n_words]))
    cuts = [0] + sorted(int(len(sentences) * depth / 100) for depth in depths) + [len(sentences)]
    pieces = []
    for i in range(1, len(cuts)):
        pieces.append(" ".join(sentences[cuts[i - 1] : cuts[i]]))
        if i - 1 < len(needles):
            pieces.append(needles[i - 1])
    return " ".join(piece for piece in pieces if piece)


DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's 40 evenly spaced needle depths, in percent


def niah_render(task: str, rng: random.Random, seed_text: str, prose_words: list[str],
                count: Callable[[str], int]) -> Render:
    """Draw a niah context's keys, values and positions; return its renderer (haystack size -> Sample)."""
    config = NIAH[task]
    num_k = max(config.num_k, config.num_q)
    keys = UniqueDraws(lambda r: random_needle_item(config.key_type, r), f"{seed_text}:keys", set())[0:num_k]
    values = UniqueDraws(lambda r: random_needle_item(config.value_type, r), f"{seed_text}:values", set())[
        0 : num_k * config.num_v
    ]
    values = [values[i * config.num_v : (i + 1) * config.num_v] for i in range(num_k)]
    needles = [
        NEEDLE.format(type_needle_v=config.value_type, key=key, value=value)
        for key, key_values in zip(keys, values)
        for value in key_values
    ]
    rng.shuffle(needles)
    asked = rng.sample(range(num_k), config.num_q)
    if config.haystack == "essay":
        depths = rng.sample(DEPTHS, len(needles))
    else:
        fractions = [rng.random() for _ in needles]
    distractor_keys = UniqueDraws(lambda r: random_needle_item(config.key_type, r), f"{seed_text}:hkeys", set(keys))
    distractor_values = UniqueDraws(
        lambda r: random_needle_item(config.value_type, r), f"{seed_text}:hvalues", {v for vs in values for v in vs}
    )
    one_row = config.num_q * config.num_v == 1
    type_needle_v = config.value_type[:-1] if one_row else config.value_type  # RULER drops the "s"
    instruction = (singular(NIAH_INSTRUCTION) if one_row else NIAH_INSTRUCTION).format(type_needle_v=type_needle_v)
    row_question = singular(NIAH_QUESTION)  # one key, one value (RULER rewords the template, then fills it)
    row_prefix = singular(NIAH_ANSWER_PREFIX)
    if task.startswith("niah_multikey"):  # one row per needle key, each after its own answer prefix
        row_keys = [keys[i] for i in asked] + [key for i, key in enumerate(keys) if i not in asked]
        questions = [row_question.format(type_needle_v=config.value_type[:-1], query=key) for key in row_keys]
        answers = [values[keys.index(key)] for key in row_keys]
        answer_prefixes = [row_prefix.format(type_needle_v=config.value_type[:-1], query=key) for key in row_keys]
    else:  # RULER's single question (niah_multiquery's asks its 4 keys at once and expects 4 values)
        queries = [keys[i] for i in asked]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        question, answer_prefix = NIAH_QUESTION, NIAH_ANSWER_PREFIX
        if one_row:
            question, answer_prefix = singular(question), singular(answer_prefix)
        questions = [question.format(type_needle_v=type_needle_v, query=query)]
        answer_prefixes = [answer_prefix.format(type_needle_v=type_needle_v, query=query)]
        answers = [[value for i in asked for value in values[i]]]

    pool = NeedlePool(config, distractor_keys, distractor_values, count)

    def render(n: int) -> Sample:
        """The context at haystack size ``n``: essay words, noise blocks, or for the needle haystack a budget in
        tokens (see :meth:`NeedlePool.pick`)."""
        if config.haystack == "essay":
            haystack = essay_with_needles(prose_words, n, needles, depths)
        else:
            units = [NOISE] * n if config.haystack == "noise" else [pool.needle(i) for i in pool.pick(n)]
            haystack = "\n".join(insert_at_fractions(units, needles, fractions))
        return Sample(f"{instruction}{haystack}\n", list(questions), [list(a) for a in answers], list(answer_prefixes))

    if config.haystack != "needle":
        return render

    def render_with_haystack_rows(n: int) -> Sample:
        """The needle haystack's own needles asked too: HAYSTACK_NEEDLE_ROWS - 1 of those present, drawn with a
        generator seeded by the context and ``n`` (so the rows never change the prompt's length search)."""
        sample = render(n)
        present = pool.pick(n)
        picked = random.Random(f"{seed_text}:rows:{n}").sample(present, min(len(present), HAYSTACK_NEEDLE_ROWS - 1))
        for i in picked:
            sample.questions.append(row_question.format(type_needle_v=config.value_type[:-1], query=pool.keys[i]))
            sample.answer_prefixes.append(row_prefix.format(type_needle_v=config.value_type[:-1], query=pool.keys[i]))
            sample.answers.append([pool.values[i]])
        return sample

    return render_with_haystack_rows


class NeedlePool:
    """The distractor needles of a ``needle`` haystack (each a real key-value pair, keys and values distinct from
    each other and from the inserted needles), and the choice of those filling a budget of tokens.

    A needle holds ~25 (words, numbers) to ~80 (uuids) tokens, too coarse a step for 2% of a short prompt, so the
    haystack's size is a budget in tokens: :meth:`pick` takes pool needles in order while they fit, then trades
    the shortest taken for longer spare ones until the gap is as small as the needles' spread of lengths allows.
    Lengths are each needle's own token count (with its newline), tokenized once."""

    def __init__(self, config: NiahConfig, keys: UniqueDraws, values: UniqueDraws, count: Callable[[str], int]):
        self.type_needle_v, self.key_draws, self.value_draws, self.count = config.value_type, keys, values, count
        self.keys: list[str] = []
        self.values: list[str] = []
        self.lengths: list[int] = []

    def needle(self, i: int) -> str:
        """Pool needle ``i``'s sentence."""
        self._grow(i + 1)
        return NEEDLE.format(type_needle_v=self.type_needle_v, key=self.keys[i], value=self.values[i])

    def length(self, i: int) -> int:
        """Tokens of pool needle ``i`` with its newline."""
        self._grow(i + 1)
        return self.lengths[i]

    def _grow(self, size: int) -> None:
        while len(self.lengths) < size:
            i = len(self.lengths)
            self.keys.append(self.key_draws[i : i + 1][0])
            self.values.append(self.value_draws[i : i + 1][0])
            sentence = NEEDLE.format(type_needle_v=self.type_needle_v, key=self.keys[i], value=self.values[i])
            self.lengths.append(self.count("\n" + sentence))

    def pick(self, budget: int) -> list[int]:
        """Pool indices (in haystack order) whose lengths sum to at most ``budget``, as close to it as trading
        each taken needle once for a longer one of the next ``max(8, taken)`` spares allows."""
        taken, total = [], 0
        while total + self.length(len(taken)) <= budget:
            total += self.length(len(taken))
            taken.append(len(taken))
        spares = list(range(len(taken), len(taken) + max(8, len(taken))))
        gap = budget - total
        for slot in sorted(range(len(taken)), key=lambda s: (self.length(taken[s]), s)):
            gains = [(self.length(s) - self.length(taken[slot]), s) for s in spares]
            fitting = [(gain, s) for gain, s in gains if 0 < gain <= gap]
            if not fitting:
                continue
            gain, spare = max(fitting, key=lambda pair: (pair[0], -pair[1]))
            spares.remove(spare)
            taken[slot], gap = spare, gap - gain
            if gap == 0:
                break
        return taken


def vt_chain(rng: random.Random, name_length: int, num_hops: int) -> tuple[list[str], list[str], str]:
    """RULER's variable chain: ``num_hops + 1`` distinct upper-case names, the first assigned a 5-digit value.
    Returns (names, statements, value)."""
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    return names, statements, value


def vt_prompt(n: int, statements: list[str], fractions: list[float], value: str) -> Sample:
    """A vt context of ``n`` noise blocks with the chain's statements at ``fractions`` of the haystack, in order."""
    units = [NOISE] * n
    for j, (fraction, statement) in enumerate(zip(sorted(fractions), statements)):
        units.insert(int(fraction * n) + j, statement)
    context = VT_INSTRUCTION + "\n".join(units).replace(". \n", ".\n") + "\n"
    question = VT_QUESTION.format(query=value)
    answer_prefix = VT_ANSWER_PREFIX.format(num_v=len(statements), query=value)
    return Sample(context, [question], [], [answer_prefix])


def vt_render(task: str, rng: random.Random, seed_text: str, count: Callable[[str], int]) -> Render:
    """Draw a vt context (its chain, its positions, and RULER's worked example of ~500 tokens with 3-letter
    names, prepended to the context); return its renderer."""
    hops = VT["num_hops"]
    icl_names, icl_statements, icl_value = vt_chain(rng, 3, hops)
    icl_fractions = [rng.random() for _ in icl_statements]
    names, statements, value = vt_chain(rng, 5, hops)
    fractions = [rng.random() for _ in statements]
    icl_n, _ = fit(lambda n: vt_prompt(n, icl_statements, icl_fractions, icl_value), count, VT["icl_tokens"],
                   cap=VT["icl_tokens"], strict=False)
    icl = vt_prompt(icl_n, icl_statements, icl_fractions, icl_value)
    example = f"{icl.prompt()} {' '.join(icl_names)}\n\n"

    def render(n: int) -> Sample:
        sample = vt_prompt(n, statements, fractions, value)
        sample.context = example + sample.context
        sample.answers = [list(names)]
        return sample

    return render


def cwe_list(words: list[str], common: int, freq_common: int, freq_uncommon: int, shuffle_seed: str) -> str:
    """RULER's numbered list: the first ``common`` words ``freq_common`` times, the rest ``freq_uncommon`` times,
    shuffled."""
    items = words[:common] * freq_common + words[common:] * freq_uncommon
    random.Random(shuffle_seed).shuffle(items)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(items))


def cwe_render(task: str, rng: random.Random, seed_text: str, n_tokens: int) -> Render:
    """Draw a cwe context's word order and its few-shot example; return its renderer (distinct words -> Sample).
    Below ``CWE['short_below']`` tokens RULER repeats the common words 6 times and the others once."""
    short = n_tokens < CWE["short_below"]
    freq_cw, freq_ucw = (CWE["short_freq_cw"], CWE["short_freq_ucw"]) if short else (CWE["freq_cw"], CWE["freq_ucw"])
    num_cw = CWE["num_cw"]
    pool = list(cwe_words())
    rng.shuffle(pool)
    nouns, adjectives, _ = word_lists()
    compounds = UniqueDraws(lambda r: f"{r.choice(adjectives)}-{r.choice(nouns)}", f"{seed_text}:compounds", set(pool))
    example_words, example_cw, example_ucw = CWE_EXAMPLE["short" if short else "long"]
    example = rng.sample(pool, example_words)
    example_text = (
        CWE_INSTRUCTION + cwe_list(example, num_cw, example_cw, example_ucw, f"{seed_text}:example") + "\n"
        f"{CWE_QUESTION} {CWE_ANSWER_PREFIX} " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example[:num_cw]))
    )

    def render(n: int) -> Sample:
        n = max(n, num_cw + 1)
        words = pool[:n] + (compounds[0 : n - len(pool)] if n > len(pool) else [])
        listing = cwe_list(words, num_cw, freq_cw, freq_ucw, f"{seed_text}:list")
        context = f"{example_text}\n{CWE_INSTRUCTION}{listing}\n"
        return Sample(context, [CWE_QUESTION], [words[:num_cw]], [CWE_ANSWER_PREFIX])

    return render


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha) for alpha > 1: a partial sum and its Euler-Maclaurin tail (RULER uses scipy's)."""
    head = math.fsum(k**-alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + terms**-alpha / 2 + alpha * terms ** (-alpha - 1) / 12


def fwe_render(task: str, rng: random.Random, seed_text: str, n_tokens: int) -> Render:
    """Draw a fwe context's coded vocabulary (``n_tokens // 50`` words, the first replaced by RULER's ``...``
    noise); return its renderer (words of coded text -> Sample). Word ``k`` appears ``int(n * k**-alpha /
    zeta(alpha))`` times; the answer is the three most frequent real words."""
    alpha, length = FWE["alpha"], FWE["coded_wordlen"]
    vocab_size = max(4, n_tokens // FWE["tokens_per_vocab_word"])
    vocab = sorted(UniqueDraws(lambda r: "".join(r.choices(string.ascii_lowercase, k=length)), f"{seed_text}:vocab",
                               set())[0:vocab_size])
    rng.shuffle(vocab)
    vocab[0] = "..."
    norm = zeta(alpha)

    def render(n: int) -> Sample:
        words = [word for k, word in enumerate(vocab, 1) for _ in range(int(n * k**-alpha / norm))]
        random.Random(f"{seed_text}:text").shuffle(words)
        context = f"{FWE_INSTRUCTION}{' '.join(words)}\n"
        return Sample(context, [FWE_QUESTION], [vocab[1:4]], [FWE_ANSWER_PREFIX])

    return render


# --- fitting the length -----------------------------------------------------------------------------------------


def fit(render: Render, count: Callable[[str], int], target: int, cap: int | None = None, strict: bool = True,
        probe: int = 32) -> tuple[int, int]:
    """The haystack size ``n >= 1`` whose prompt (row 0) is closest to ``target`` tokens without passing ``cap``,
    and its token count. Sizes are guessed from two probes, bracketed by doubling steps and bisected; prompts
    are assumed to grow with ``n`` (near enough: an essay's sentence cuts may move a token or two). With
    ``strict`` a prompt farther than :data:`TOLERANCE` from ``target`` raises ValueError."""
    cap = target + int(TOLERANCE * target) if cap is None else cap
    memo: dict[int, int] = {}

    def tokens(n: int) -> int:
        if n not in memo:
            memo[n] = count(render(n).prompt())
        return memo[n]

    while tokens(1 + probe) == tokens(1) and probe < target:  # a unit bigger than the probe (needle budgets)
        probe *= 4
    largest = 2 * target + probe  # every unit adds at least about a token
    rate = max((tokens(1 + probe) - tokens(1)) / probe, 1e-3)
    guess = min(largest, max(1, 1 + round((target - tokens(1)) / rate)))
    for _ in range(3):  # secant steps: the rate measured over the whole guess is close to the final one
        if guess > 1:
            rate = max((tokens(guess) - tokens(1)) / (guess - 1), 1e-3)
        step = round((target - tokens(guess)) / rate)
        if step == 0:
            break
        guess = min(largest, max(1, guess + step))
    low, high, step = guess, guess, 1
    while tokens(low) > target and low > 1:
        high, low, step = low, max(1, low - step), step * 2
    step = 1
    while tokens(high) <= target and high < largest:
        low, high, step = high, min(largest, high + step), step * 2
    if tokens(low) > target:  # even one unit is too long
        high = low
    while high - low > 1:  # tokens(low) <= target < tokens(high)
        middle = (low + high) // 2
        low, high = (middle, high) if tokens(middle) <= target else (low, middle)
    best = min((n for n in (low, high) if tokens(n) <= cap), key=lambda n: abs(tokens(n) - target), default=low)
    if strict and abs(tokens(best) - target) > TOLERANCE * target:
        raise ValueError(
            f"n_tokens: cannot land within {TOLERANCE:.0%} of {target} tokens (closest prompt: {tokens(best)} "
            f"tokens, one haystack unit: ~{rate:.0f} tokens); ask for more tokens"
        )
    return best, tokens(best)


# --- the dataset --------------------------------------------------------------------------------------------------


def token_counter(tokenizer) -> Callable[[str], int]:
    """Tokens of a text without special tokens, through the fast tokenizer's backend when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda text: len(backend.encode(text, add_special_tokens=False).ids)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def batch_token_counter(tokenizer) -> Callable[[list[str]], list[int]]:
    """:func:`token_counter` of several texts at once (the fast backend encodes them in parallel)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda texts: [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
    return lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def context_limit(tokenizer, max_context: int | None) -> int | None:
    """``max_context``, else the tokenizer's ``model_max_length`` when it is a real length (not HF's huge
    placeholder), else None."""
    if max_context is not None:
        return max_context
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, int) and 0 < length < 10**7 else None


def context_rows(task: str, index: int, seed: int, n_tokens: int, tokenizer, prose_words: list[str],
                 cap: int) -> list[dict]:
    """The rows of context ``index`` of ``task``: its draws seeded by (task, seed, index) alone."""
    count, count_many = token_counter(tokenizer), batch_token_counter(tokenizer)
    seed_text = f"ruler:{task}:{seed}:{index}"
    rng = random.Random(seed_text)
    kind = task_kind(task)
    if kind == "niah":
        render = niah_render(task, rng, seed_text, prose_words, count)
    elif kind == "vt":
        render = vt_render(task, rng, seed_text, count)
    elif kind == "cwe":
        render = cwe_render(task, rng, seed_text, n_tokens)
    else:
        render = fwe_render(task, rng, seed_text, n_tokens)
    try:
        n, _ = fit(render, count, n_tokens - MAX_NEW_TOKENS[kind], cap)
    except ValueError as error:
        raise ValueError(f"{error} (task {task})") from None
    sample = render(n)
    prompt_tokens = count_many([sample.prompt(row) for row in range(len(sample.questions))])
    return [
        {
            "context": sample.context,
            "question": question,
            "answer_prefix": answer_prefix,
            "answer": answer,
            "max_new_tokens": MAX_NEW_TOKENS[kind],
            "task": task,
            "haystack": haystack_label(task),
            "prompt_tokens": tokens,
        }
        for question, answer_prefix, answer, tokens in zip(
            sample.questions, sample.answer_prefixes, sample.answers, prompt_tokens)
    ]


def check_arguments(tokenizer, n_tokens: int, n_contexts: int, tasks: tuple[str, ...],
                    max_context: int | None) -> int | None:
    """Refuse unknown tasks, ``n_contexts < 1`` and lengths the model cannot hold; return the context limit."""
    unknown = sorted(set(tasks) - set(RULER_TASKS))
    if unknown or not tasks:
        raise ValueError(f"tasks: unknown {unknown or 'none given'}; known tasks are {list(RULER_TASKS)}")
    if n_contexts < 1:
        raise ValueError(f"n_contexts must be >= 1, got {n_contexts}")
    generated = max(MAX_NEW_TOKENS[task_kind(task)] for task in tasks)
    if n_tokens <= 2 * generated:
        raise ValueError(f"n_tokens must be > {2 * generated}, got {n_tokens}: RULER's length counts the prompt and "
                         f"the {generated} tokens to generate, and the prompt needs room beside them")
    limit = context_limit(tokenizer, max_context)
    if limit is not None and n_tokens > limit:
        raise ValueError(
            f"n_tokens: {n_tokens} tokens (prompt and generated, as RULER counts them) do not fit the model's "
            f"context of {limit} tokens (max_context or the tokenizer's model_max_length)"
        )
    return limit


def dataset_card(tasks: tuple[str, ...], rows_per_context: dict[str, float], n_contexts: int, n_tokens: int,
                 tokenizer_name: str, seed: int) -> str:
    """The dataset card: a ``default`` configuration with every task, one per task, and the task table."""
    entries = [("default", "test-*.jsonl")] + [(task, task_file("", task).name) for task in tasks]
    configs = "\n".join(
        f"- config_name: {name}\n  data_files:\n  - split: test\n    path: {files}" for name, files in entries
    )
    table = "\n".join(
        f"| {task} | {haystack_label(task)} | {rows_per_context[task]:g} | {MAX_NEW_TOKENS[task_kind(task)]} |"
        for task in tasks
    )
    return CARD.format(configs=configs, n_contexts=n_contexts, n_tokens=n_tokens, tokenizer=tokenizer_name,
                       seed=seed, table=table, format=RULER_FORMAT)


def write_ruler_dataset(
    out_dir: str | Path,
    tokenizer,
    n_tokens: int,
    n_contexts: int,
    seed: int = 0,
    tasks: tuple[str, ...] = RULER_TASKS,
    max_context: int | None = None,
    prose: str | None = None,
    progress: bool = False,
    one_question: bool = False,
) -> Path:
    """Generate ``n_contexts`` contexts of ``n_tokens`` tokens as RULER counts them (the prompt, in
    ``tokenizer``'s tokens, and the tokens to generate) for each of ``tasks`` and write them under ``out_dir`` as
    ``test-<task>.jsonl`` files and a ``README.md`` card (``evaluation.tasks.dataset_files.load_rows`` reads them). ``prose``
    replaces the essay haystack's text (default: the Lee background corpus, :func:`evaluation.tasks.ruler_prose.load_prose`);
    ``progress`` shows a tqdm bar. ``one_question`` keeps RULER's own question alone (the first row) of every
    context: RULER's dataset exactly, and one answer prefix per context, which kvpress's ``evaluate.py`` requires."""
    tasks = tuple(tasks)
    check_arguments(tokenizer, n_tokens, n_contexts, tasks, max_context)
    needs_prose = any(task in NIAH and NIAH[task].haystack == "essay" for task in tasks)
    prose_words = (prose if prose is not None else load_prose() if needs_prose else "").split()
    if needs_prose and not prose_words:
        raise ValueError("prose: the essay haystack needs a non-empty text")
    rows_by_task = {}
    with tqdm(total=len(tasks) * n_contexts, desc="RULER contexts", disable=not progress) as bar:
        for task in tasks:
            cap = n_tokens - MAX_NEW_TOKENS[task_kind(task)]  # RULER: the largest prompt that fits with its answer
            rows_by_task[task] = []
            for index in range(n_contexts):
                rows = context_rows(task, index, seed, n_tokens, tokenizer, prose_words, cap)
                rows_by_task[task] += rows[:1] if one_question else rows
                bar.update()
    # written once every context is generated, each file whole: an interrupted generation leaves no file (a cut
    # during these few writes can leave some tasks, which check_ruler_dataset names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, rows in rows_by_task.items():
        write_atomic(task_file(out_dir, task), "".join(json.dumps(row) + "\n" for row in rows))
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    rows_per_context = {task: len(rows) / n_contexts for task, rows in rows_by_task.items()}
    write_atomic(out_dir / "README.md", dataset_card(tasks, rows_per_context, n_contexts, n_tokens, name, seed))
    return out_dir


def check_ruler_dataset(data_dir: str | Path, tasks: tuple[str, ...], n_contexts: int = 1) -> bool:
    """Whether ``data_dir`` holds a RULER dataset of this :data:`RULER_FORMAT` (False: none there, or one of another
    format, to be written again) with ``tasks`` and at least ``n_contexts`` contexts per task; one that lacks either, or holds a damaged file, raises ``SystemExit`` saying what to do."""
    data_dir = Path(data_dir)
    present = task_names_in(data_dir)
    if not present or ruler_format(data_dir) != RULER_FORMAT:
        return False
    missing = sorted(set(tasks) - present)
    if missing:
        raise SystemExit(f"error: {data_dir} lacks the tasks {missing} (--tasks): remove the folder, it is written "
                         "again, or ask for its tasks only")
    fewest = min(count_contexts(task_file(data_dir, task)) for task in tasks)
    if fewest < n_contexts:
        raise SystemExit(f"error: {data_dir} holds {fewest} contexts per task, fewer than the {n_contexts} asked "
                         "(--contexts): remove the folder (it is written again) or ask for fewer")
    return True


def ruler_format(data_dir: Path) -> int | None:
    """The ``ruler-format`` a dataset's card records (None: no card, or one written before formats)."""
    card = Path(data_dir) / "README.md"
    match = re.search(r"ruler-format: (\d+)", card.read_text()) if card.is_file() else None
    return int(match.group(1)) if match else None


def count_contexts(path: Path) -> int:
    """The distinct contexts of one task file, read line by line; a damaged file raises ``SystemExit``."""
    contexts = set()
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            try:
                contexts.add(json.loads(line)["context"])
            except (ValueError, KeyError, TypeError) as error:
                raise SystemExit(f"error: {path}, line {number}, is not a RULER row ({type(error).__name__}): "
                                 "remove the folder, it is written again") from error
    return len(contexts)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder or hub id (AutoTokenizer)")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens per context (within 2%%)")
    parser.add_argument("--contexts", type=int, default=20, help="contexts per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", default=list(RULER_TASKS), choices=RULER_TASKS)
    parser.add_argument("--one-question", action="store_true",
                        help="RULER's own question alone per context (for kvpress's evaluate.py, which needs one "
                        "answer prefix per context); by default every key of a multi-key context is asked")
    parser.add_argument("--max-context", type=int, default=None,
                        help="the model's context (default: max_position_embeddings of the folder's config.json, "
                        "else the tokenizer's model_max_length)")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    args = build_parser(prog).parse_args(argv)
    from transformers import AutoTokenizer

    folder = Path(args.tokenizer).expanduser()
    tokenizer = AutoTokenizer.from_pretrained(str(folder) if folder.exists() else args.tokenizer)
    max_context = args.max_context
    if max_context is None and (folder / "config.json").is_file():  # a model folder: its position limit
        max_context = json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
    out = write_ruler_dataset(args.out, tokenizer, args.tokens, args.contexts, args.seed, tuple(args.tasks),
                              max_context, progress=True, one_question=args.one_question)
    print(f"wrote {len(args.tasks)} RULER tasks x {args.contexts} contexts of {args.tokens} tokens to {out}")
    return out


if __name__ == "__main__":
    main()
