"""Answer accuracy, RULER-style: the share of the reference answer's items found in the prediction."""

from __future__ import annotations

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
