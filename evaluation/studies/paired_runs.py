"""Accuracy and paired differences of finished runs read from their folders, for runs made beside a study on the
same dataset and contexts that the study's plan does not hold (other settings, other ratios): the tables of
``docs/smollm2-kvzip-gap.md`` come from here.

``python -m evaluation.studies.paired_runs --reference RUN [RUN ...]`` prints one markdown row per run: its press
and ratio, its accuracy with a 95% bootstrap interval over contexts, its memory held, and its paired difference
from the reference run (the same questions; contexts resampled within tasks). A run folder is a results folder of
``evaluation.runner.run`` or its archived copy in a study's ``runs/`` (contexts stored as hashes): both pair.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from ..metrics.accuracy import average, bootstrap_interval, paired_difference, task_scores
from .core import context_hash, read_predictions
from .report import markdown


def run_predictions(folder: Path) -> pd.DataFrame:
    """A run's predictions with each context as its archive hash, so that fresh and archived runs pair."""
    path = Path(folder) / "predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no predictions.csv (not a finished run, or archived without answers)")
    frame = read_predictions(path)
    frame["context"] = frame["context"].map(context_hash)
    return frame


def run_row(folder: Path, reference: pd.DataFrame | None) -> tuple[dict, pd.DataFrame]:
    """One table row: the run's press, ratio, accuracy [interval] (from its predictions, as the paired difference
    is), memory held, and its difference from ``reference``; and the run's predictions."""
    metrics = json.loads((Path(folder) / "metrics.json").read_text())
    if metrics.get("status") != "ok":
        raise ValueError(f"{folder}: the run failed ({'; '.join(metrics.get('errors', []))})")
    frame = run_predictions(folder)
    low, high = bootstrap_interval(frame)
    row = {"press": metrics["press"], "ratio": metrics["compression_ratio"],
           "accuracy": f"{average(task_scores(frame)):.1f} [{low:.1f}, {high:.1f}]",
           "memory held": metrics.get("memory"), "questions": len(frame)}
    if reference is not None:
        try:
            difference, low, high = paired_difference(frame, reference)
        except ValueError as error:
            raise ValueError(f"{folder} against the reference: {error}") from None
        row["minus reference (paired)"] = f"{difference:+.1f} [{low:+.1f}, {high:+.1f}]"
    return row, frame


def paired_rows(reference: Path, runs: list[Path]) -> pd.DataFrame:
    """The reference's row, then each run's with its paired difference from the reference."""
    first, base = run_row(reference, None)  # the reference's predictions are read once
    return pd.DataFrame([first] + [run_row(folder, base)[0] for folder in runs])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="the run every other is paired with")
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders on the same questions")
    args = parser.parse_args(argv)
    print(markdown(paired_rows(args.reference, args.runs), index=False))


if __name__ == "__main__":
    main()
