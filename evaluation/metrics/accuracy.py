"""Answer accuracy as RULER and kvpress score it: the share of the reference answer's items found in the
prediction (kvpress's ``evaluation/benchmarks/ruler/calculate_metrics.py``, RULER's ``string_match_all`` and
``string_match_part``), with a whole-word variant kept beside it for comparison with older archives."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

PUNCTUATION = re.compile(r"[.,;:!?\"'()\[\]{}<>*`]")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f]")  # kvpress removes them from a prediction before matching


def answer_items(answer: list[str] | str) -> list[str]:
    """``answer``'s items: a list of strings (kvpress's RULER format) as it is, a string split on whitespace;
    an empty item or none raises ValueError."""
    items = answer.split() if isinstance(answer, str) else list(answer)
    if not items or not all(str(item).strip() for item in items):
        raise ValueError(f"answer has an empty item or none: {answer!r}")
    return [str(item) for item in items]


def cleaned_prediction(prediction) -> str:
    """A prediction as kvpress's RULER scorer reads it: stripped, control characters (newlines included) removed."""
    return CONTROL_CHARACTERS.sub("", str(prediction).strip()).strip()


def string_match_all(prediction: str, answer: list[str] | str) -> float:
    """RULER's ``string_match_all`` as kvpress computes it, for one row: the fraction of ``answer``'s items that
    occur in the prediction as case-blind substrings (``1234567`` is found in ``12345678`` and in ``is 1234567.``)."""
    predicted = cleaned_prediction(prediction).lower()
    items = answer_items(answer)
    return sum(item.lower() in predicted for item in items) / len(items)


def string_match_part(prediction: str, answer: list[str] | str) -> float:
    """RULER's ``string_match_part`` (its qa tasks) as kvpress computes it, for one row: 1 if any of ``answer``'s
    items occurs in the prediction as a case-blind substring, else 0."""
    predicted = cleaned_prediction(prediction).lower()
    return float(any(item.lower() in predicted for item in answer_items(answer)))


def words_of(text) -> str:
    """``text`` lower-cased, punctuation turned into spaces (a hyphen stays: uuids hold hyphens), whitespace
    collapsed: the words :func:`whole_word_match_all` matches on."""
    return " ".join(PUNCTUATION.sub(" ", str(text).lower()).split())


def whole_word_match_all(prediction: str, answer: list[str] | str) -> float:
    """Fraction of ``answer``'s items found in ``prediction`` as whole words (case-blind, punctuation no part of
    a word): stricter than :func:`string_match_all`, where ``v203`` is found in ``v2030``. The metric of this
    project's archives before RULER's own (docs/ names which each used)."""
    expected = [words_of(item) for item in answer_items(answer)]
    if not all(expected):
        raise ValueError(f"answer has an item without a word: {answer!r}")
    predicted = f" {words_of(prediction)} "
    return sum(f" {item} " in predicted for item in expected) / len(expected)


def metric_for(task: str):
    """kvpress's choice of metric by task: :func:`string_match_part` for RULER's qa tasks, else
    :func:`string_match_all`."""
    return string_match_part if str(task).split("_")[0] == "qa" else string_match_all


def row_scores(df: pd.DataFrame, metric=None) -> pd.Series:
    """Every row's score of its ``predicted_answer`` against its ``answer``: by ``metric`` (a function of
    prediction and answer) when given, else by kvpress's metric for the row's ``task`` (:func:`metric_for`)."""
    missing = {"answer", "predicted_answer"} - set(df.columns)
    if missing:
        raise KeyError(f"predictions need the columns {sorted(missing)}")
    predictions = df["predicted_answer"].fillna("").astype(str)
    tasks = df["task"] if "task" in df.columns else pd.Series("", index=df.index)
    metrics = [metric or metric_for(task) for task in tasks]
    return pd.Series(map(lambda f, p, a: f(p, a), metrics, predictions, df["answer"]), index=df.index, dtype=float)


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


def percentile_bounds(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``replicates``."""
    low, high = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """:func:`percentile_bounds`, rounded to 4 decimals."""
    low, high = percentile_bounds(replicates, level)
    return round(low, 4), round(high, 4)


def bootstrap_mean_interval(values, n_resamples: int = 2000, level: float = 0.95,
                            seed: int = 0) -> tuple[float, float]:
    """Central ``level`` percentile bootstrap interval of the mean of ``values`` (one per context, e.g. the
    decoding benchmark's figures): each of ``n_resamples`` resamples draws ``len(values)`` values with
    replacement. Not rounded (the caller rounds each figure to its own digits)."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence (one per context), got shape {values.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    drawn = np.random.default_rng(seed).integers(0, len(values), size=(n_resamples, len(values)))
    return percentile_bounds(values[drawn].mean(axis=1), level)


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
