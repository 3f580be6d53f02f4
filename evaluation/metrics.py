"""Answer accuracy, RULER-style: the share of the reference answer's items found in the prediction."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

PUNCTUATION = re.compile(r"[.,;:!?\"'()\[\]{}<>*`]")


def words_of(text) -> str:
    """``text`` lower-cased, punctuation turned into spaces (a hyphen stays: uuids hold hyphens), whitespace
    collapsed: the words an answer is matched on."""
    return " ".join(PUNCTUATION.sub(" ", str(text).lower()).split())


def string_match_all(prediction: str, answer: list[str] | str) -> float:
    """Fraction of ``answer``'s items found in ``prediction`` as whole words (case-blind): an item of several
    words must appear as that sequence of words. ``answer`` is a list of strings (kvpress's RULER format) or a
    string, whose whitespace-separated words are then its items. Punctuation is no part of a word
    (:func:`words_of`: ``"is 1234567."`` holds ``1234567``). Unlike kvpress's substring match, ``v203`` is not
    found in ``v2030``."""
    items = answer.split() if isinstance(answer, str) else list(answer)
    expected = [words_of(item) for item in items]
    if not expected or not all(expected):
        raise ValueError(f"answer has an empty item or none: {answer!r}")
    predicted = f" {words_of(prediction)} "
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


def resampled_averages(
    df: pd.DataFrame, scores: list[pd.Series], n_resamples: int = 2000, seed: int = 0
) -> np.ndarray:
    """``(len(scores), n_resamples)`` bootstrap replicates of :func:`average` (in percent) for each of ``scores``
    (row scores of ``df``'s rows, e.g. two presses' answers to the same questions), every one drawn with the same
    contexts, so that differences between them are paired.

    Contexts are the sampling unit: each resample draws, within every task, as many contexts as it has, with
    replacement, keeping each context's questions together; the statistic is the mean over tasks of each task's
    accuracy over the drawn questions, as :func:`task_scores` and :func:`average` compute it."""
    rng = np.random.default_rng(seed)
    per_task = []  # per task: (len(scores), n_resamples) accuracies
    for _, rows in df.groupby("task", sort=True):
        drawn = None
        accuracies = []
        for row_score in scores:
            by_context = row_score[rows.index].groupby(rows["context"], sort=False).agg(["sum", "count"]).to_numpy()
            if drawn is None:
                drawn = rng.integers(0, len(by_context), size=(n_resamples, len(by_context)))  # (resamples, contexts)
            totals = by_context[drawn].sum(axis=1)  # (resamples, 2): correct, questions
            accuracies.append(totals[:, 0] / totals[:, 1])
        per_task.append(accuracies)
    return np.mean(per_task, axis=0) * 100


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``replicates``, rounded to 4 decimals."""
    low, high = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)])
    return round(float(low), 4), round(float(high), 4)


def bootstrap_interval(
    df: pd.DataFrame, n_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval (``level``, in percent) of :func:`average` over :func:`task_scores`, with
    contexts resampled within tasks (see :func:`resampled_averages`)."""
    return percentile_interval(resampled_averages(df, [row_scores(df)], n_resamples, seed)[0], level)


def paired_difference(
    a: pd.DataFrame, b: pd.DataFrame, n_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(difference, low, high)``: :func:`average` of predictions ``a`` minus that of ``b`` (in points) with
    its paired percentile bootstrap interval: both answered the same questions, and each resample draws the
    same contexts for both, so the context-to-context spread that both share cancels out."""
    keys = ["task", "context", "question"]
    for name, df in (("a", a), ("b", b)):
        if df.duplicated(keys).any():
            raise ValueError(f"predictions {name} repeat a (task, context, question): cannot pair them")
    merged = a[keys + ["answer", "predicted_answer"]].merge(
        b[keys + ["predicted_answer"]], on=keys, how="inner", suffixes=("_a", "_b"), validate="one_to_one")
    if len(merged) != len(a) or len(merged) != len(b):
        raise ValueError(f"predictions a ({len(a)} rows) and b ({len(b)} rows) do not answer the same questions")
    score_a = row_scores(merged.rename(columns={"predicted_answer_a": "predicted_answer"}))
    score_b = row_scores(merged.rename(columns={"predicted_answer_b": "predicted_answer"}))
    replicates = resampled_averages(merged, [score_a, score_b], n_resamples, seed)
    difference = average(task_scores(merged.assign(predicted_answer=merged["predicted_answer_a"]))) - average(
        task_scores(merged.assign(predicted_answer=merged["predicted_answer_b"])))
    return (round(difference, 4), *percentile_interval(replicates[0] - replicates[1], level))
