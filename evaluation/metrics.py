"""Answer accuracy, RULER-style: the share of the reference answer's items found in the prediction."""

from __future__ import annotations

import numpy as np
import pandas as pd


def string_match_all(prediction: str, answer: list[str] | str) -> float:
    """Fraction of ``answer``'s items found in ``prediction`` as whole words (case-blind): an item of several
    words must appear as that sequence of words. ``answer`` is a list of strings (kvpress's RULER format) or a
    string, whose whitespace-separated words are then its items. Unlike kvpress's substring match, ``v203`` is
    not found in ``v2030``."""
    items = answer.split() if isinstance(answer, str) else list(answer)
    expected = [" ".join(str(item).lower().split()) for item in items]
    if not expected or not all(expected):
        raise ValueError(f"answer has an empty item or none: {answer!r}")
    predicted = f" {' '.join(str(prediction).lower().split())} "
    return sum(f" {item} " in predicted for item in expected) / len(expected)


def row_scores(df: pd.DataFrame) -> pd.Series:
    """:func:`string_match_all` of every row's ``predicted_answer`` against its ``answer``."""
    missing = {"answer", "predicted_answer"} - set(df.columns)
    if missing:
        raise KeyError(f"predictions need the columns {sorted(missing)}")
    predictions = df["predicted_answer"].fillna("").astype(str)
    return pd.Series(map(string_match_all, predictions, df["answer"]), index=df.index, dtype=float)


def task_scores(df: pd.DataFrame) -> dict[str, float]:
    """Mean :func:`string_match_all` per ``task``, in percent."""
    return (row_scores(df).groupby(df["task"]).mean() * 100).round(4).to_dict()


def average(scores: dict[str, float]) -> float:
    """The mean over tasks of per-task scores (each task weighs the same, as RULER averages)."""
    if not scores:
        raise ValueError("no task scores to average")
    return round(sum(scores.values()) / len(scores), 4)


def bootstrap_interval(
    df: pd.DataFrame, n_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval (``level``, in percent) of :func:`average` over :func:`task_scores`.

    Contexts are the sampling unit: each resample draws, within every task, as many contexts as it has, with
    replacement, keeping each context's questions together; the statistic is the mean over tasks of each task's
    accuracy over the drawn questions, as :func:`task_scores` and :func:`average` compute it."""
    scores = row_scores(df)
    rng = np.random.default_rng(seed)
    per_task = []
    for _, rows in df.groupby("task", sort=True):
        by_context = scores[rows.index].groupby(rows["context"], sort=False).agg(["sum", "count"]).to_numpy()
        drawn = rng.integers(0, len(by_context), size=(n_resamples, len(by_context)))  # (resamples, contexts)
        totals = by_context[drawn].sum(axis=1)  # (resamples, 2): correct, questions
        per_task.append(totals[:, 0] / totals[:, 1])
    averages = np.mean(per_task, axis=0) * 100
    low, high = np.percentile(averages, [50 * (1 - level), 50 * (1 + level)])
    return round(float(low), 4), round(float(high), 4)
