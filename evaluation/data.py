"""Write the synthetic retrieval tasks as a local Hugging Face dataset, and read them back.

    python -m evaluation.data --out evaluation/data/synthetic-1024 --contexts 20 --words 1024

The folder holds one JSON-lines file per task, ``test-<task>.jsonl``, and a ``README.md`` dataset card whose
YAML header declares the configurations, so that ``datasets.load_dataset(folder, split="test")`` loads every
task and ``datasets.load_dataset(folder, "<task>", split="test")`` loads one. Rows carry kvpress's columns
(``context``, ``question``, ``answer_prefix``, ``answer``, ``max_new_tokens``, ``task``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from .synthetic_tasks import BASE_TASKS, TASKS, dataset_rows

DEFAULT_DATA_ROOT = Path(__file__).parent / "data"
CARD = """---
configs:
{configs}
---
# Synthetic retrieval tasks

RULER-style retrieval tasks from `evaluation.synthetic_tasks`: {n_contexts} contexts of {n_words} words per
task, seed {seed}. Written by `python -m evaluation.data`.
"""


def default_data_dir(n_words: int) -> Path:
    """Where the CLI keeps generated data for contexts of ``n_words`` words."""
    return DEFAULT_DATA_ROOT / f"synthetic-{n_words}"


def task_file(data_dir: str | Path, task: str) -> Path:
    """The JSON-lines file holding one task's rows."""
    return Path(data_dir) / f"test-{task}.jsonl"


def _card(tasks: tuple[str, ...], n_contexts: int, n_words: int, seed: int) -> str:
    """The dataset card: a ``default`` configuration with every task, then one configuration per task."""
    entries = [("default", "test-*.jsonl")] + [(task, task_file("", task).name) for task in tasks]
    configs = "\n".join(
        f"- config_name: {name}\n  data_files:\n  - split: test\n    path: {files}" for name, files in entries
    )
    return CARD.format(configs=configs, n_contexts=n_contexts, n_words=n_words, seed=seed)


def write_dataset(
    out_dir: str | Path, n_contexts: int, n_words: int, seed: int = 0, tasks: tuple[str, ...] = BASE_TASKS
) -> Path:
    """Generate ``n_contexts`` contexts of ``n_words`` words for each task and write them under ``out_dir``."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}; known tasks are {list(TASKS)}")
    if n_contexts < 1:
        raise ValueError(f"n_contexts must be >= 1, got {n_contexts}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        rows = dataset_rows(task, n_contexts, n_words, seed)
        task_file(out_dir, task).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (out_dir / "README.md").write_text(_card(tuple(tasks), n_contexts, n_words, seed))
    return out_dir


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
            f"no dataset at {missing or data_dir}: write one with `python -m evaluation.data --out {data_dir}`"
        )
    return pd.concat([pd.read_json(f, lines=True, dtype=False) for f in files], ignore_index=True)


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
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    args = build_parser(prog).parse_args(argv)
    out_dir = args.out or default_data_dir(args.words)
    out = write_dataset(out_dir, args.contexts, args.words, args.seed, tuple(args.tasks))
    print(f"wrote {len(args.tasks)} tasks x {args.contexts} contexts of {args.words} words to {out}")
    return out


if __name__ == "__main__":
    main()
