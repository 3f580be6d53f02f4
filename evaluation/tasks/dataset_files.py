"""Write the synthetic retrieval tasks as a local Hugging Face dataset, and read them back.

    python -m evaluation.tasks.dataset_files --out evaluation/data/synthetic-1024-x20 --contexts 20 --words 1024

The folder holds one JSON-lines file per task, ``test-<task>.jsonl``, and a ``README.md`` dataset card whose
YAML header declares the configurations, so that ``datasets.load_dataset(folder, split="test")`` loads every
task and ``datasets.load_dataset(folder, "<task>", split="test")`` loads one, and records the parameters that
wrote it (``kvpress_compose``: contexts, words, seed, tasks). Rows carry kvpress's columns (``context``,
``question``, ``answer_prefix``, ``answer``, ``max_new_tokens``, ``task``).

A folder that holds a dataset of other parameters is refused unless ``--overwrite`` (which first removes its
task files, so that no task of the old dataset stays mixed in); one of the same parameters is left as it is.
:func:`load_rows` checks every file (JSON lines, not empty, kvpress's columns) and names the bad one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import numbers
from pathlib import Path

import pandas as pd
import yaml

from ..safe_files import write_atomic
from .word_tasks import BASE_TASKS, TASKS, dataset_rows

DEFAULT_DATA_ROOT = Path(__file__).parents[1] / "data"
COLUMNS = ("context", "question", "answer_prefix", "answer", "max_new_tokens", "task")  # kvpress's
# contexts x words x tasks one command writes at most: each question's row repeats its context (about 7 bytes a
# word), so 10^8 words is a dataset of about a gigabyte or more
MAX_CONTEXT_WORDS = 10**8
CARD = """---
configs:
{configs}
kvpress_compose: {parameters}
---
# Synthetic retrieval tasks

RULER-style retrieval tasks from `evaluation.tasks.word_tasks`: {n_contexts} contexts of {n_words} words per
task, seed {seed}. Written by `python -m evaluation.tasks.dataset_files`.
"""


def default_data_dir(n_words: int) -> Path:
    """Where the CLI keeps generated data for contexts of ``n_words`` words."""
    return DEFAULT_DATA_ROOT / f"synthetic-{n_words}"


def task_file(data_dir: str | Path, task: str) -> Path:
    """The JSON-lines file holding one task's rows."""
    return Path(data_dir) / f"test-{task}.jsonl"


def task_names_in(data_dir: str | Path) -> set[str]:
    """The tasks whose files (:func:`task_file`) ``data_dir`` holds (none where it does not exist)."""
    return {path.stem.removeprefix("test-") for path in Path(data_dir).glob("test-*.jsonl")}


def _card(tasks: tuple[str, ...], n_contexts: int, n_words: int, seed: int) -> str:
    """The dataset card: a ``default`` configuration with every task, then one configuration per task."""
    entries = [("default", "test-*.jsonl")] + [(task, task_file("", task).name) for task in tasks]
    configs = "\n".join(
        f"- config_name: {name}\n  data_files:\n  - split: test\n    path: {files}" for name, files in entries
    )
    parameters = json.dumps(_parameters(tasks, n_contexts, n_words, seed))  # JSON is YAML
    return CARD.format(configs=configs, parameters=parameters, n_contexts=n_contexts, n_words=n_words, seed=seed)


def _parameters(tasks: tuple[str, ...], n_contexts: int, n_words: int, seed: int) -> dict:
    """What :func:`write_dataset` was asked for, as its dataset card records it."""
    return {"contexts": n_contexts, "words": n_words, "seed": seed, "tasks": list(tasks)}


def recorded_parameters(data_dir: str | Path) -> dict | None:
    """The parameters recorded in the dataset card of ``data_dir`` (None: no card, or one written before they
    were recorded)."""
    card = Path(data_dir) / "README.md"
    if not card.is_file() or not card.read_text().startswith("---"):
        return None
    header = yaml.safe_load(card.read_text().split("---")[1])
    return header.get("kvpress_compose") if isinstance(header, dict) else None


def write_dataset(
    out_dir: str | Path, n_contexts: int, n_words: int, seed: int = 0, tasks: tuple[str, ...] = BASE_TASKS,
    overwrite: bool = False,
) -> Path:
    """Generate ``n_contexts`` contexts of ``n_words`` words for each task and write them under ``out_dir``.

    A dataset already there with the same parameters is left as it is; one of other (or unknown) parameters
    raises FileExistsError unless ``overwrite``, which removes its task files first."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}; known tasks are {list(TASKS)}")
    if isinstance(n_contexts, bool) or not isinstance(n_contexts, numbers.Integral) or n_contexts < 1:
        raise ValueError(f"contexts (--contexts) must be an int >= 1, got {n_contexts!r}")
    if isinstance(n_words, bool) or not isinstance(n_words, numbers.Integral) or n_words < 1:
        raise ValueError(f"words (--words) must be an int >= 1, got {n_words!r}")
    total = n_contexts * n_words * len(tasks)
    if total > MAX_CONTEXT_WORDS:
        raise ValueError(
            f"--contexts {n_contexts} x --words {n_words} x {len(tasks)} tasks = {total:.3g} context words, about "
            f"{7 * total / 1e9:.3g} GB or more on disk (each question's row repeats its context), more than the "
            f"{MAX_CONTEXT_WORDS:.0e} one command writes: ask for fewer contexts or words"
        )
    out_dir = Path(out_dir)
    wanted = _parameters(tuple(tasks), n_contexts, n_words, seed)
    if has_dataset(out_dir) and not overwrite:
        if recorded_parameters(out_dir) == wanted:
            return out_dir
        raise FileExistsError(f"{out_dir} holds a dataset of other parameters ({_differences(out_dir, wanted)}): "
                              "choose another folder, or overwrite it (--overwrite)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("test-*.jsonl"):
        stale.unlink()
    for task in tasks:  # each file written whole, replacing a link rather than writing through it
        rows = dataset_rows(task, n_contexts, n_words, seed)
        write_atomic(task_file(out_dir, task), "".join(json.dumps(row) + "\n" for row in rows))
    write_atomic(out_dir / "README.md", _card(tuple(tasks), n_contexts, n_words, seed))
    return out_dir


def _differences(data_dir: Path, wanted: dict) -> str:
    """``name: <recorded> there, <wanted> asked`` for each parameter that differs from those recorded in
    ``data_dir``."""
    recorded = recorded_parameters(data_dir)
    if recorded is None:
        return "its card records no parameters"
    return ", ".join(f"{name}: {recorded.get(name)!r} there, {value!r} asked" for name, value in wanted.items()
                     if recorded.get(name) != value)


def fingerprint(data_dir: str | Path) -> str:
    """SHA-256 of the task files' names and bytes: the same whenever the same generator and seed write them
    (kept per file state, so that checking many runs on one dataset reads it once)."""
    files = sorted(Path(data_dir).glob("test-*.jsonl"))
    state = tuple((str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in files)
    if state not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        _FINGERPRINTS[state] = digest.hexdigest()
    return _FINGERPRINTS[state]


_FINGERPRINTS: dict[tuple, str] = {}


def dataset_name(data_dir: str | Path) -> str:
    """The dataset's own name, for result folders: its folder's name, whatever path reached it (``.``, ``..``,
    a trailing ``/``)."""
    return Path(data_dir).resolve().name


def has_dataset(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds at least one task file written by :func:`write_dataset`."""
    return any(Path(data_dir).glob("test-*.jsonl"))


def load_rows(data_dir: str | Path, task: str | None = None) -> pd.DataFrame:
    """The rows of every task (or of ``task`` only) in ``data_dir``, in file order."""
    data_dir = Path(data_dir)
    files = [task_file(data_dir, task)] if task else sorted(data_dir.glob("test-*.jsonl"))
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise FileNotFoundError(
            f"no dataset at {missing or data_dir}: write one with `python -m evaluation.tasks.dataset_files --out {data_dir}`"
        )
    return pd.concat([read_task_file(f) for f in files], ignore_index=True)


def read_task_file(path: Path) -> pd.DataFrame:
    """One task file's rows; a ValueError naming the file where it is empty, not JSON lines or lacks one of
    kvpress's columns."""
    try:
        rows = pd.read_json(path, lines=True, dtype=False)
    except ValueError as error:
        raise ValueError(f"dataset file {path}: not JSON lines ({error})") from None
    if rows.empty:
        raise ValueError(f"dataset file {path}: empty, no rows")
    missing = [column for column in COLUMNS if column not in rows.columns]
    if missing:
        raise ValueError(f"dataset file {path}: missing column(s) {missing}; kvpress's columns are {list(COLUMNS)}")
    for index, row in enumerate(rows[list(COLUMNS)].itertuples(index=False), start=1):
        problem = row_problem(row._asdict())
        if problem:
            raise ValueError(f"dataset file {path}, row {index}: {problem}")
    return rows


def row_problem(row: dict) -> str | None:
    """What is wrong with one dataset row, naming the field (None: nothing): a context that is a non-empty text,
    a question and task that are texts, an answer prefix that is a text or empty, an answer that is a non-empty
    list of texts, and max_new_tokens an int >= 1. Checked before any run, rather than after every answer."""
    def text(value) -> bool:
        return isinstance(value, str)

    if not text(row["context"]) or not row["context"]:
        return f"context must be a non-empty text, got {row['context']!r}"
    for name in ("question", "task"):
        if not text(row[name]):
            return f"{name} must be a text, got {row[name]!r}"
    prefix = row["answer_prefix"]
    if not (text(prefix) or prefix is None or (isinstance(prefix, float) and math.isnan(prefix))):  # NaN: empty
        return f"answer_prefix must be a text (or null), got {prefix!r}"
    answer = row["answer"]
    if not isinstance(answer, list) or not answer or not all(text(item) for item in answer):
        return f"answer must be a non-empty list of texts (each scored on its own), got {answer!r}"
    tokens = row["max_new_tokens"]
    integral = isinstance(tokens, numbers.Integral) or (isinstance(tokens, float) and tokens.is_integer())
    if isinstance(tokens, bool) or not integral or tokens < 1:
        return f"max_new_tokens must be an int >= 1, got {tokens!r}"
    return None


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="default: evaluation/data/synthetic-<words>")
    parser.add_argument("--contexts", type=int, default=20, help="contexts per task")
    parser.add_argument("--words", type=int, default=1024, help="words (= tokens) per context")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=list(BASE_TASKS), choices=TASKS,
                        help="default: the five base tasks; the dense ones (dense_kv dense_multivalue) make the "
                        "budget bind")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset of other parameters already in --out")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    out_dir = args.out or default_data_dir(args.words)
    same = has_dataset(out_dir) and recorded_parameters(out_dir) == _parameters(
        tuple(args.tasks), args.contexts, args.words, args.seed)
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"--out {out_dir}: a file, not a folder")
    try:
        out = write_dataset(out_dir, args.contexts, args.words, args.seed, tuple(args.tasks), args.overwrite)
    except (FileExistsError, ValueError) as error:
        parser.error(str(error))
    if same and not args.overwrite:
        print(f"{out} exists with these parameters: left as it is")
    else:
        print(f"wrote {len(args.tasks)} tasks x {args.contexts} contexts of {args.words} words to {out}")
    return out


if __name__ == "__main__":
    main()
