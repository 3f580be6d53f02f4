"""Answer accuracy, RULER-style: the share of the reference answer's words found in the prediction."""

from __future__ import annotations

import pandas as pd


def string_match_all(prediction: str, answer: str) -> float:
    """Fraction of ``answer``'s whitespace-separated words that are among ``prediction``'s words (case-blind)."""
    expected = answer.lower().split()
    if not expected:
        raise ValueError(f"answer has no words: {answer!r}")
    predicted = set(str(prediction).lower().split())
    return sum(word in predicted for word in expected) / len(expected)


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
