"""RULER's synthetic tasks (evaluation.tasks.ruler): needles in their contexts, rows sharing contexts, lengths as RULER
counts them (prompt and generated tokens within the target, the prompt within 2% of it) in a real subword
tokenizer's tokens, determinism, refusals. A byte-level BPE tokenizer trained
here on the fly stands in for a model's; the slow test uses the converted SmolLM2 tokenizer when it exists."""

from __future__ import annotations

import json
import random
import re
import uuid
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

pytest.importorskip("wonderwords")

from evaluation.metrics.accuracy import string_match_all
from evaluation.tasks import ruler
from evaluation.tasks.dataset_files import load_rows
from evaluation.tasks.ruler import NIAH, RULER_TASKS, write_ruler_dataset
from evaluation.tasks.ruler_prose import split_sentences

N_TOKENS, N_CONTEXTS = 2048, 2
ROWS_PER_CONTEXT = {
    "niah_single_1": 1, "niah_single_2": 1, "niah_single_3": 1, "niah_multikey_1": 4, "niah_multikey_2": 10,
    "niah_multikey_3": 10, "niah_multivalue": 1, "niah_multiquery": 1, "vt": 1, "cwe": 1, "fwe": 1,
}
SENTENCES = [
    "The council met on Tuesday to discuss the new bridge across the river.",
    "Several residents said the plan would cost far more than the town could afford.",
    "Engineers from the state office presented three designs, each with its own risks.",
    "After two hours of debate, the mayor asked for a vote that was later postponed.",
    "Farmers in the valley have waited years for a safer road to the market.",
    "Rain fell for most of the week, and the old ford was closed twice.",
    "A spokesman for the builders promised that work could begin before winter.",
    "Critics argued that the money should go to the hospital instead.",
    "The debate is expected to continue when the council meets again next month.",
    "Meanwhile, schoolchildren still cross the river by ferry every morning.",
]
SMOLLM2 = Path.home() / ".cache" / "kvpress-compose" / "models" / "smollm2-135m"


def test_prose() -> str:
    """A deterministic stand-in for the essay corpus: shuffled news-like sentences with numbered paragraphs."""
    rng = random.Random(0)
    paragraphs = []
    for i in range(300):
        picked = rng.sample(SENTENCES, 5)
        paragraphs.append(f"In report {i + 1}, " + picked[0][0].lower() + picked[0][1:] + " " + " ".join(picked[1:]))
    return " ".join(paragraphs)


PROSE = test_prose()
test_prose.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of 1000 tokens trained on the prose, the templates and random needles: numbers, uuids
    and made-up words split into several tokens each, as a model's tokenizer splits them."""
    rng = random.Random(0)
    corpus = [PROSE, ruler.NOISE, ruler.NIAH_INSTRUCTION, ruler.VT_INSTRUCTION, ruler.CWE_INSTRUCTION,
              ruler.FWE_INSTRUCTION, ruler.FWE_QUESTION, ruler.VT_ANSWER_PREFIX]
    corpus += [f"{rng.randint(10**6, 10**7)} {uuid.UUID(int=rng.getrandbits(128))}" for _ in range(200)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", model_max_length=8192)


@pytest.fixture(scope="module")
def dataset(tokenizer, tmp_path_factory) -> Path:
    return write_ruler_dataset(tmp_path_factory.mktemp("ruler"), tokenizer, N_TOKENS, N_CONTEXTS, seed=0,
                               prose=PROSE)


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_every_task_is_written_in_kvpress_columns(dataset):
    rows = load_rows(dataset)
    assert sorted(rows["task"].unique()) == sorted(RULER_TASKS)
    assert {"context", "question", "answer_prefix", "answer", "max_new_tokens", "task", "haystack"} <= set(rows)
    expected_new_tokens = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}
    for task, group in rows.groupby("task"):
        assert set(group["max_new_tokens"]) == {expected_new_tokens[ruler.task_kind(task)]}
        assert group["context"].nunique() == N_CONTEXTS
        assert len(group) == ROWS_PER_CONTEXT[task] * N_CONTEXTS, task
    card = (dataset / "README.md").read_text()
    assert all(f"config_name: {task}" in card for task in RULER_TASKS) and "config_name: default" in card


def test_answers_are_nonempty_strings_found_in_their_context(dataset):
    rows = load_rows(dataset)
    for row in rows.itertuples():
        assert isinstance(row.answer, list) and row.answer, row.task
        assert all(isinstance(item, str) and item.strip() for item in row.answer), row.task
        for item in row.answer:
            assert item in row.context, (row.task, item)
        assert string_match_all(" ".join(row.answer), row.answer) == 1.0


def test_needles_pair_each_asked_key_with_its_value(dataset):
    """A niah row asks one key whose needle sentences in the context carry the answer (multiquery's four keys:
    its own test)."""
    rows = load_rows(dataset)
    for row in rows[rows["task"].str.startswith("niah") & (rows["task"] != "niah_multiquery")].itertuples():
        kind = NIAH[row.task].value_type
        key = row.question.split(" for ", 1)[1].rsplit(" mentioned", 1)[0]
        for value in row.answer:
            assert f"One of the special magic {kind} for {key} is: {value}." in row.context, (row.task, key, value)


def test_rows_of_a_context_share_it_and_each_answer_prefix_names_its_key(dataset):
    rows = load_rows(dataset)
    for _, group in rows.groupby("context"):
        assert group["task"].nunique() == 1
        assert group["question"].nunique() == len(group)  # every row asks something else
        assert group["answer_prefix"].nunique() == len(group)  # each row's prefix names its own key
    for row in rows[rows["task"].str.startswith("niah")].itertuples():  # RULER's prefix repeats the question's key
        key = row.question.split(" for ", 1)[1].rsplit(" mentioned", 1)[0]
        assert f" for {key} mentioned in the provided text " in row.answer_prefix, (row.task, row.answer_prefix)
    multikey = rows[rows["task"] == "niah_multikey_1"].iloc[1]
    key = multikey.question.split(" for ", 1)[1].rsplit(" mentioned", 1)[0]
    assert multikey.question == f"What is the special magic number for {key} mentioned in the provided text?"
    assert multikey.answer_prefix == f"The special magic number for {key} mentioned in the provided text is"
    single = rows[rows["task"] == "niah_single_1"].iloc[0]
    key = single.question.split(" for ", 1)[1].rsplit(" mentioned", 1)[0]
    assert single.answer_prefix == f"The special magic number for {key} mentioned in the provided text is"


def test_multiquery_asks_its_four_keys_in_one_plural_question_as_ruler_does(dataset):
    rows = load_rows(dataset)
    multiquery = rows[rows["task"] == "niah_multiquery"]
    assert len(multiquery) == N_CONTEXTS and multiquery["context"].nunique() == N_CONTEXTS
    for row in multiquery.itertuples():
        assert row.context.startswith("Some special magic numbers are hidden within the following text.")
        match = re.fullmatch(r"What are all the special magic numbers for (\S+), (\S+), (\S+), and (\S+) mentioned "
                             r"in the provided text\?", row.question)
        assert match, row.question
        keys = match.groups()
        assert row.answer_prefix == (f"The special magic numbers for {keys[0]}, {keys[1]}, {keys[2]}, and {keys[3]} "
                                     "mentioned in the provided text are")
        assert len(row.answer) == 4 and len(set(row.answer)) == 4
        for key, value in zip(keys, row.answer):  # the values in the order their keys are asked
            assert f"One of the special magic numbers for {key} is: {value}." in row.context


def test_context_and_question_split_as_kvpress_does(dataset):
    """Instruction and haystack (ending in the newline before the question) in ``context``, RULER's final query
    in ``question``, RULER's answer prefix without its leading space."""
    rows = load_rows(dataset)
    first = rows.groupby("task").first()
    assert first.loc["vt", "question"].startswith("Question: Find all variables that are assigned the value")
    assert first.loc["vt", "context"].startswith("Memorize and track")  # RULER's worked example comes first
    assert first.loc["vt", "context"].count("Question: Find all variables") == 1  # the example's question
    assert first.loc["cwe", "question"] == ruler.CWE_QUESTION
    assert first.loc["fwe", "answer_prefix"] == ruler.FWE_ANSWER_PREFIX
    assert all(context.endswith("\n") for context in rows["context"])
    assert all(not prefix.startswith(" ") for prefix in rows["answer_prefix"])


def test_prompt_and_answer_fit_the_target_as_ruler_counts_them(dataset, tokenizer):
    """RULER's length counts the tokens to generate: the prompt is the largest that fits beside them, within 2%."""
    rows = load_rows(dataset)
    for row in rows.itertuples():
        tokens = count(tokenizer, f"{row.context}{row.question} {row.answer_prefix}")
        assert tokens == row.prompt_tokens
        room = N_TOKENS - row.max_new_tokens
        if row.Index == rows[rows["context"] == row.context].index[0]:  # RULER's own row: the largest that fits
            assert tokens <= room and room - tokens <= 0.02 * N_TOKENS, (row.task, tokens, room)
        else:  # the other keys of a multikey context: a few tokens longer or shorter than RULER's row
            assert abs(room - tokens) <= 0.02 * N_TOKENS, (row.task, tokens, room)


def test_haystacks_are_labelled(dataset):
    rows = load_rows(dataset)
    labels = rows.groupby("task")["haystack"].first()
    assert labels["niah_single_1"] == "noise" and labels["niah_multikey_2"] == "needle"
    assert labels["niah_single_2"] == "prose:gensim:lee_background" and labels["cwe"] == "words"
    essay = rows[rows["task"] == "niah_single_2"].iloc[0]
    assert "The council met on Tuesday" in essay.context or "In report 1," in essay.context


def test_cwe_and_fwe_answers_are_the_most_frequent_words(dataset):
    rows = load_rows(dataset)
    cwe = rows[rows["task"] == "cwe"].iloc[0]
    listing = re.split(r"(?:^| )\d+\. ", cwe.context.rsplit(ruler.CWE_INSTRUCTION, 1)[1].strip())[1:]
    counts = {word: listing.count(word) for word in set(listing)}
    assert {counts[word] for word in cwe.answer} == {6}  # below 4096 tokens: common 6 times, the others once
    assert {count for word, count in counts.items() if word not in cwe.answer} == {1}
    fwe = rows[rows["task"] == "fwe"].iloc[0]
    words = fwe.context[len(ruler.FWE_INSTRUCTION):].split()
    counts = {word: words.count(word) for word in set(words) if word != "..."}
    ranked = sorted(counts.values(), reverse=True)
    assert [counts[word] for word in fwe.answer] == ranked[:3] and ranked[2] > ranked[3]


def test_same_seed_same_files_other_seed_other_files(tokenizer, dataset, tmp_path):
    tasks = ("niah_multikey_3", "vt", "cwe")
    again = write_ruler_dataset(tmp_path / "again", tokenizer, N_TOKENS, N_CONTEXTS, seed=0, tasks=tasks,
                                prose=PROSE)
    other = write_ruler_dataset(tmp_path / "other", tokenizer, N_TOKENS, N_CONTEXTS, seed=1, tasks=tasks,
                                prose=PROSE)
    for task in tasks:
        name = f"test-{task}.jsonl"
        assert (again / name).read_text() == (dataset / name).read_text()
        assert (other / name).read_text() != (dataset / name).read_text()


def test_refusals_name_the_argument(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="tasks"):
        write_ruler_dataset(tmp_path, tokenizer, N_TOKENS, 1, tasks=("qa_1",), prose=PROSE)
    with pytest.raises(ValueError, match="n_contexts"):
        write_ruler_dataset(tmp_path, tokenizer, N_TOKENS, 0, prose=PROSE)
    with pytest.raises(ValueError, match="n_tokens"):  # 2048 (prompt and generated) > 2000
        write_ruler_dataset(tmp_path, tokenizer, N_TOKENS, 1, max_context=2000, prose=PROSE)
    with pytest.raises(ValueError, match="n_tokens"):  # the tokenizer's model_max_length (8192)
        write_ruler_dataset(tmp_path, tokenizer, 8193, 1, prose=PROSE)
    with pytest.raises(ValueError, match="n_tokens must be > 256"):  # no room for a prompt beside 128 generated
        write_ruler_dataset(tmp_path, tokenizer, 200, 1, tasks=("niah_single_1",), prose=PROSE)
    with pytest.raises(ValueError, match="n_tokens"):  # vt's worked example alone holds ~500 tokens
        write_ruler_dataset(tmp_path, tokenizer, 300, 1, tasks=("vt",), prose=PROSE)
    write_ruler_dataset(tmp_path, tokenizer, 1024, 1, tasks=("fwe",), max_context=1024)  # fits exactly


def test_cli_writes_a_dataset(tokenizer, tmp_path):
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    out = ruler.main(["--tokenizer", str(folder), "--tokens", "1024", "--contexts", "2", "--seed", "3",
                      "--out", str(tmp_path / "data"), "--tasks", "niah_single_1", "fwe"])
    rows = load_rows(out)
    assert sorted(rows["task"].unique()) == ["fwe", "niah_single_1"] and len(rows) == 4
    assert all(0 <= 1024 - n - t <= 0.02 * 1024 for t, n in zip(rows["prompt_tokens"], rows["max_new_tokens"]))


def test_split_sentences_keeps_the_text():
    text = 'He said "Go." Then he left. 3 men came! Why? no split here. OK'
    assert split_sentences(text) == ['He said "Go."', "Then he left.", "3 men came!", "Why? no split here.", "OK"]
    assert " ".join(split_sentences(PROSE)) == PROSE


def test_lee_corpus_is_read_when_gensim_is_installed():
    pytest.importorskip("gensim")
    from evaluation.tasks.ruler_prose import load_prose

    words = load_prose().split()
    assert len(words) > 50_000 and words[:3] == ["Hundreds", "of", "people"]


def test_zeta_matches_its_closed_form():
    assert ruler.zeta(2.0) == pytest.approx(3.141592653589793**2 / 6, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("n_tokens", [2048, 4096])
def test_smollm2_prompts_within_two_percent(n_tokens, tmp_path):
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"no converted SmolLM2 at {SMOLLM2}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(SMOLLM2))
    out = write_ruler_dataset(tmp_path, tokenizer, n_tokens, 3, max_context=8192)
    rows = load_rows(out)
    assert sorted(rows["task"].unique()) == sorted(RULER_TASKS)
    for row in rows.itertuples():
        tokens = len(tokenizer.encode(f"{row.context}{row.question} {row.answer_prefix}", add_special_tokens=False))
        assert abs(tokens + row.max_new_tokens - n_tokens) <= 0.02 * n_tokens, (row.task, tokens)
        assert all(item in row.context for item in row.answer)
    assert json.loads((out / "test-vt.jsonl").read_text().splitlines()[0])["max_new_tokens"] == 30


def test_an_interrupted_generation_leaves_no_partial_dataset(tokenizer, tmp_path, monkeypatch):
    real_rows, calls = ruler.context_rows, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second task's first context
            raise KeyboardInterrupt
        return real_rows(*args, **kwargs)

    monkeypatch.setattr(ruler, "context_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_ruler_dataset(tmp_path / "cut", tokenizer, N_TOKENS, 2, tasks=("niah_single_1", "niah_single_2"),
                            prose=PROSE)
    assert not list((tmp_path / "cut").glob("*"))  # no task file, whole or partial
    assert not ruler.check_ruler_dataset(tmp_path / "cut", ("niah_single_1", "niah_single_2"))


def test_a_dataset_lacking_tasks_or_contexts_is_refused(dataset, tmp_path):
    tasks = ("niah_single_1", "vt")
    assert ruler.check_ruler_dataset(dataset, tasks, N_CONTEXTS)
    with pytest.raises(SystemExit, match=f"holds {N_CONTEXTS} contexts per task, fewer than the {N_CONTEXTS + 1}"):
        ruler.check_ruler_dataset(dataset, tasks, N_CONTEXTS + 1)
    (tmp_path / "test-vt.jsonl").write_text((dataset / "test-vt.jsonl").read_text())
    assert not ruler.check_ruler_dataset(tmp_path, tasks)  # no card: a dataset of an older format, written again
    (tmp_path / "README.md").write_text((dataset / "README.md").read_text().replace("ruler-format: 2", "ruler-format: 1"))
    assert not ruler.check_ruler_dataset(tmp_path, tasks)
    (tmp_path / "README.md").write_text((dataset / "README.md").read_text())
    with pytest.raises(SystemExit, match="lacks the tasks \\['niah_single_1'\\]"):
        ruler.check_ruler_dataset(tmp_path, tasks)
    (tmp_path / "test-niah_single_1.jsonl").write_text('{"context": "a"}\n{"cont')  # cut off mid-row
    with pytest.raises(SystemExit, match="test-niah_single_1.jsonl, line 2, is not a RULER row"):
        ruler.check_ruler_dataset(tmp_path, tasks)


def test_one_question_keeps_rulers_own_row_of_every_context(dataset, tokenizer, tmp_path):
    """kvpress's evaluate.py asserts one answer prefix per context: ``one_question`` writes RULER's dataset as it
    is, its own question (the first row) of every context."""
    tasks = ("niah_multikey_1", "niah_multikey_2", "niah_single_1")
    out = write_ruler_dataset(tmp_path, tokenizer, N_TOKENS, N_CONTEXTS, seed=0, tasks=tasks, prose=PROSE,
                              one_question=True)
    rows, every = load_rows(out), load_rows(dataset)
    assert len(rows) == len(tasks) * N_CONTEXTS
    assert (rows.groupby("context")["answer_prefix"].nunique() == 1).all()
    firsts = every[every["task"].isin(tasks)].groupby("context", sort=False).head(1)
    assert sorted(rows["question"]) == sorted(firsts["question"])
