"""Evaluate KV cache presses on the synthetic retrieval tasks.

    python -m evaluation                  # the quick sweep: shipped model, 7 presses, ratios 0.5 and 0.75
    python -m evaluation --presses snapkv compose_replay --ratios 0.25 0.5 0.75 --fidelity
    python -m evaluation --model Qwen/Qwen3-0.6B --dataset-dir evaluation/data/synthetic-4096
    python -m evaluation data --out evaluation/data/synthetic-1024-x20 --contexts 20   # only write data

The data (``--contexts`` contexts of ``--words`` words per task) is generated into ``--dataset-dir`` when that
folder holds none; it is checked (files, columns) and ``--out`` is checked writable before the first run. Runs
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

from . import data
from .run import DEFAULT_OUTPUT_DIR, add_run_options, preflight, run_options
from .sweep import plan, run_sweep

SHIPPED_MODEL = Path(__file__).parent / "models" / "retrieval-llama"
DEFAULT_PRESSES = [
    "no_press",
    "snapkv",
    "expected_attention",
    "kvzip",
    "compose_prefill",
    "compose_bidirectional",
    "compose_replay",
]
DEFAULT_RATIOS = [0.5, 0.75]
DEFAULT_CONTEXTS = 6
DEFAULT_WORDS = 1024


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="hub id or model folder (default: the shipped model)")
    parser.add_argument("--presses", nargs="+", default=DEFAULT_PRESSES, help="names from evaluation.registry")
    parser.add_argument("--ratios", nargs="+", type=float, default=DEFAULT_RATIOS, help="compression ratios")
    parser.add_argument("--dataset-dir", type=Path, default=None, help="default: evaluation/data/synthetic-<words>")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUTPUT_DIR), help="results folder")
    parser.add_argument("--contexts", type=int, default=DEFAULT_CONTEXTS, help="contexts per task, when generating")
    parser.add_argument("--words", type=int, default=DEFAULT_WORDS, help="words per context, when generating")
    add_run_options(parser)
    return parser


def shipped_model() -> str:
    """The trained model's folder (relative to the working directory), or exit saying how to train it."""
    if not (SHIPPED_MODEL / "config.json").is_file():
        sys.exit(
            f"error: no trained model in {SHIPPED_MODEL}. Train it with `python -m evaluation.train_model` "
            "(it resumes from evaluation/checkpoints/ when interrupted), or pass --model."
        )
    return os.path.relpath(SHIPPED_MODEL)


def ensure_data(data_dir: Path, n_contexts: int, n_words: int) -> Path:
    """``data_dir``, after writing the synthetic tasks there if it holds none (one of other contexts or words is
    used as it is, with a warning)."""
    if data.has_dataset(data_dir):
        print(f"data: {data_dir}")
        recorded = data.recorded_parameters(data_dir) or {}
        other = {name: recorded[name] for name, asked in (("contexts", n_contexts), ("words", n_words))
                 if name in recorded and recorded[name] != asked}
        if other:
            print(f"warning: {data_dir} holds {other}, not --contexts {n_contexts} --words {n_words}: used as it "
                  "is (pass another --dataset-dir to generate those)")
    else:
        data.write_dataset(data_dir, n_contexts, n_words)
        print(f"data: generated {n_contexts} contexts of {n_words} words per task in {data_dir}")
    return data_dir


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m evaluation`` and of the ``kvpress-compose-eval`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["data"]:
        data.main(argv[1:], prog="python -m evaluation data")
        return
    parser = build_parser()
    args = parser.parse_args(argv)
    model = args.model or shipped_model()
    data_dir = args.dataset_dir or data.default_data_dir(args.words)
    try:
        configs = plan(model, args.presses, args.ratios, data_dir, args.out, **run_options(args))
    except ValueError as error:
        parser.error(str(error))
    ensure_data(data_dir, args.contexts, args.words)
    try:
        preflight(configs)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    start = time.perf_counter()
    outputs = run_sweep(configs)
    print(f"{len(configs)} runs in {time.perf_counter() - start:.0f} s")
    print(f"table: {outputs.summary_md}\ncsv:   {outputs.summary_csv}\nplot:  {outputs.plot}")


if __name__ == "__main__":
    main()
