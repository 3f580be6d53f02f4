"""Evaluate KV cache presses on RULER's retrieval tasks (a real model) or the word-level tasks (a toy model).

    python -m evaluation                  # the quick sweep: SmolLM2-135M-Instruct, RULER at 1024 tokens, 4 presses
    python -m evaluation --presses snapkv compose_replay --ratios 0.25 0.5 0.75 --fidelity
    python -m evaluation --model Qwen/Qwen3-0.6B --tokens 4096 --contexts 5 --tasks niah_single_1 niah_multikey_1
    python -m evaluation --model evaluation/models/retrieval-llama      # the trained toy model, word-level tasks
    python -m evaluation data --out evaluation/data/synthetic-1024-x20 --contexts 20   # only write word-level data

A real model (a short name of :mod:`evaluation.model_zoo.real_models`, a hub id or a folder) is evaluated on RULER's tasks
(:mod:`evaluation.tasks.ruler`: ``--tasks``, ``--contexts`` per task of ``--tokens`` tokens of its own tokenizer); the
trained toy models under ``evaluation/models/`` on the word-level tasks (``--contexts`` of ``--words`` words).
The data is generated into ``--dataset-dir`` (by default a folder under ``evaluation/data/`` named by those
settings) when that folder holds none; it is checked (files, columns) and ``--out`` is checked writable before the first run. Runs
go to ``--out`` (default ``results/sweep``; kvpress's own evaluate.py writes under ``results/kvpress``). A run
already there is skipped when its record (data fingerprint, press settings, contexts, seed, fidelity options)
matches; otherwise it runs again, saying why (``--overwrite`` reruns all, ``--retry-failed`` the failed ones).
The summary table, ``summary.csv`` and the accuracy-vs-ratio plot are written to
``<out>/sweep__<dataset>__<data>__<model>/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .model_zoo.toy_models import SHIPPED_MODEL, is_toy_model
from .runner.run import DEFAULT_OUTPUT_DIR, add_run_options, check_model, preflight, run_options
from .runner.sweep import plan, run_sweep
from .tasks import dataset_files
from .tasks.ruler import RULER_TASKS, check_ruler_dataset

DEFAULT_MODEL = "smollm2-135m"
# the default ComposePress (replay, uniform allocation), KVzip (masks; holds the whole cache), SnapKV (no extra pass)
DEFAULT_PRESSES = ["no_press", "compose", "kvzip", "snapkv"]
DEFAULT_RATIOS = [0.5, 0.75]
DEFAULT_CONTEXTS = 2
DEFAULT_WORDS = 1024
DEFAULT_TOKENS = 1024
# RULER tasks SmolLM2-135M-Instruct answers uncompressed, each asking 4 questions of a context (the study's screening)
QUICK_TASKS = ["niah_multikey_1", "niah_multiquery"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a real model's short name (evaluation.model_zoo.real_models), "
                        "a hub id or a model folder (default: %(default)s)")
    parser.add_argument("--presses", nargs="+", default=DEFAULT_PRESSES, help="names from evaluation.runner.presses")
    parser.add_argument("--ratios", nargs="+", type=float, default=DEFAULT_RATIOS, help="compression ratios")
    parser.add_argument("--dataset-dir", type=Path, default=None, help="default: evaluation/data/ruler-<model>-<tokens>-c<contexts>-<tasks> (a real model) or "
                        "evaluation/data/synthetic-<words> (a toy model); a real model's folder without a dataset "
                        "gets RULER's tasks")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUTPUT_DIR), help="results folder")
    parser.add_argument("--contexts", type=int, default=DEFAULT_CONTEXTS, help="contexts per task, when generating")
    parser.add_argument("--words", type=int, default=DEFAULT_WORDS, help="words per context, toy models' tasks")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens per context, RULER's tasks")
    parser.add_argument("--tasks", nargs="+", default=QUICK_TASKS, help="RULER's tasks (evaluation.tasks.ruler)")
    add_run_options(parser)
    parser.set_defaults(threads=min(2, os.cpu_count() or 1))  # one sweep process: its cores are idle otherwise
    return parser


def holds_other_tasks(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds a dataset of tasks other than RULER's (the word-level tasks, whose card records
    their parameters; two of their names are RULER's too): read as it is."""
    tasks = dataset_files.task_names_in(data_dir)
    return bool(tasks - set(RULER_TASKS)) or (bool(tasks) and dataset_files.recorded_parameters(data_dir) is not None)


def ruler_data_dir(model: str, n_tokens: int, n_contexts: int, tasks: list[str]) -> Path:
    """Where the quick sweep keeps RULER's ``tasks`` for ``model`` (named by every setting that shapes them)."""
    name = Path(model).name if Path(model).exists() else model.replace("/", "--")
    return dataset_files.DEFAULT_DATA_ROOT / f"ruler-{name}-{n_tokens}-c{n_contexts}-{'+'.join(sorted(tasks))}"


def ensure_ruler_data(model: str, data_dir: Path, n_tokens: int, n_contexts: int, tasks: list[str]) -> Path:
    """``data_dir``, after writing RULER's ``tasks`` there in ``model``'s tokens if it holds none."""
    if check_ruler_dataset(data_dir, tuple(tasks), n_contexts):
        print(f"data: {data_dir}")
        return data_dir
    import json

    from transformers import AutoTokenizer

    from .model_zoo.real_models import resolve_model
    from .tasks.ruler import write_ruler_dataset

    folder = Path(resolve_model(model))
    tokenizer = AutoTokenizer.from_pretrained(str(folder) if folder.exists() else model)
    config = folder / "config.json"
    max_context = json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None
    write_ruler_dataset(data_dir, tokenizer, n_tokens, n_contexts, tasks=tuple(tasks), max_context=max_context)
    print(f"data: generated {n_contexts} contexts of {n_tokens} tokens per task ({', '.join(tasks)}) in {data_dir}")
    return data_dir


def shipped_model() -> str:
    """The trained model's folder (relative to the working directory), or exit saying how to train it."""
    if not (SHIPPED_MODEL / "config.json").is_file():
        sys.exit(
            f"error: no trained model in {SHIPPED_MODEL}. Train it with `python -m evaluation.model_zoo.train_model` "
            "(it resumes from evaluation/checkpoints/ when interrupted), or pass --model."
        )
    return os.path.relpath(SHIPPED_MODEL)


def ensure_data(data_dir: Path, n_contexts: int, n_words: int) -> Path:
    """``data_dir``, after writing the synthetic tasks there if it holds none (one of other contexts or words is
    used as it is, with a warning)."""
    if dataset_files.has_dataset(data_dir):
        print(f"data: {data_dir}")
        recorded = dataset_files.recorded_parameters(data_dir) or {}
        other = {name: recorded[name] for name, asked in (("contexts", n_contexts), ("words", n_words))
                 if name in recorded and recorded[name] != asked}
        if other:
            print(f"warning: {data_dir} holds {other}, not --contexts {n_contexts} --words {n_words}: used as it "
                  "is (pass another --dataset-dir to generate those)")
    else:
        dataset_files.write_dataset(data_dir, n_contexts, n_words)
        print(f"data: generated {n_contexts} contexts of {n_words} words per task in {data_dir}")
    return data_dir


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m evaluation`` and of the ``kvpress-compose-eval`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["data"]:
        dataset_files.main(argv[1:], prog="python -m evaluation data")
        return
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("contexts", "words", "tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.dataset_dir is not None and args.dataset_dir.exists() and not args.dataset_dir.is_dir():
        parser.error(f"--dataset-dir {args.dataset_dir}: a file, not a folder")
    model = shipped_model() if args.model in ("shipped", str(SHIPPED_MODEL)) else args.model
    try:
        check_model(model)
    except ValueError as error:
        parser.error(str(error))
    toy = is_toy_model(model)
    if toy:
        data_dir = args.dataset_dir or dataset_files.default_data_dir(args.words)
    else:
        unknown = sorted(set(args.tasks) - set(RULER_TASKS))
        if unknown:
            parser.error(f"--tasks: unknown {unknown}; RULER's tasks here are {list(RULER_TASKS)}")
        data_dir = args.dataset_dir or ruler_data_dir(model, args.tokens, args.contexts, args.tasks)
    dataset_name = "synthetic" if toy or holds_other_tasks(data_dir) else "ruler"
    try:
        configs = plan(model, args.presses, args.ratios, data_dir, args.out, dataset=dataset_name,
                       **run_options(args))
    except ValueError as error:
        parser.error(str(error))
    try:
        if toy:
            ensure_data(data_dir, args.contexts, args.words)
        elif dataset_name == "ruler":  # RULER's tasks, written there unless they are
            ensure_ruler_data(model, data_dir, args.tokens, args.contexts, args.tasks)
        preflight(configs)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    start = time.perf_counter()
    outputs = run_sweep(configs)
    print(f"{len(configs)} runs in {time.perf_counter() - start:.0f} s")
    print(f"table: {outputs.summary_md}\ncsv:   {outputs.summary_csv}\nplot:  {outputs.plot}")


if __name__ == "__main__":
    main()
