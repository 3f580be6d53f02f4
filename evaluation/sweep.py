"""Sweep presses x compression ratios with :mod:`evaluation.run`, then tabulate and plot the results.

``no_press`` runs once, at ratio 0. Runs go to ``<output_dir>`` (default ``results/sweep``; kvpress's own
evaluate.py writes under ``results/kvpress``), the summary to ``<output_dir>/sweep__<dataset>__<data>__<model>/``:

- ``summary.csv``: one row per run (press, ratio, status, per-task and average accuracy, memory, seconds,
  fidelity);
- ``summary.md``: that table, then average accuracy with one row per press and one column per ratio, and the
  area under the accuracy-vs-ratio curve (trapezoid rule; every press's curve starts at ratio 0 with
  ``no_press``'s accuracy when ``no_press`` ran; ``no_press`` itself is a flat line), then the cache memory held
  per press and ratio;
- ``accuracy_vs_ratio.png``: average accuracy against compression ratio, one line per press.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .run import DEFAULT_OUTPUT_DIR, RunConfig, preflight, run

BASELINE = "no_press"


@dataclass
class SweepOutputs:
    """Where a sweep's runs and summary went."""

    runs: list[Path]
    summary_csv: Path
    summary_md: Path
    plot: Path


def planned_runs(presses: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """(press, ratio) pairs to run: every press at every ratio (ascending), ``no_press`` once at 0."""
    if not presses or not ratios:
        raise ValueError(f"need at least one press and one ratio, got presses={presses} ratios={ratios}")
    runs = []
    for press in dict.fromkeys(presses):
        runs += [(press, 0.0)] if press == BASELINE else [(press, ratio) for ratio in sorted(set(ratios))]
    return runs


def run_summary(results_dir: Path) -> dict:
    """One summary row from a run's ``metrics.json``."""
    metrics = json.loads((results_dir / "metrics.json").read_text())
    fidelity = {f"fidelity_{key}": value for key, value in metrics.get("fidelity", {}).items()
                if key in ("kl", "first_divergence")}
    return {
        "press": metrics["press"],
        "ratio": metrics["compression_ratio"],
        "status": metrics["status"],
        **metrics.get("scores", {}),
        "average": metrics.get("average", np.nan),
        "ci_low": metrics.get("average_ci95", [np.nan, np.nan])[0],
        "ci_high": metrics.get("average_ci95", [np.nan, np.nan])[1],
        "memory": metrics.get("memory", np.nan),
        "seconds": metrics["seconds"],
        **fidelity,
        "error": "; ".join(metrics["errors"]),
    }


def trapezoid_area(ratios, accuracies) -> float:
    """Area under accuracy(ratio), trapezoid rule over the sorted ratios; NaN with a missing point or < 2."""
    order = np.argsort(ratios)
    x, y = np.asarray(ratios, float)[order], np.asarray(accuracies, float)[order]
    if len(x) < 2 or np.isnan(y).any():
        return float("nan")
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum())


def curves(table: pd.DataFrame) -> dict[str, pd.Series]:
    """Average accuracy by ratio for each press; starts at no_press's accuracy at ratio 0 when it ran."""
    by_press = {press: rows.set_index("ratio")["average"] for press, rows in table.groupby("press", sort=False)}
    baseline = by_press.pop(BASELINE, None)
    if baseline is None:
        return by_press
    flat = pd.Series(baseline.iloc[0], index=sorted({0.0, *table["ratio"]}))
    start = baseline.iloc[:1]
    with_start = {p: c if 0.0 in c.index else pd.concat([start, c]) for p, c in by_press.items()}
    return {BASELINE: flat, **with_start}


def accuracy_by_ratio(table: pd.DataFrame) -> pd.DataFrame:
    """One row per press: average accuracy at each ratio, then the area under its curve (``auc``)."""
    wide = by_ratio(table, "average")
    areas = {press: trapezoid_area(curve.index, curve.to_numpy()) for press, curve in curves(table).items()}
    wide["auc"] = pd.Series(areas)
    return wide


def by_ratio(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """One row per press (in run order), one column per ratio, of ``column``."""
    wide = table.pivot_table(index="press", columns="ratio", values=column, sort=False, dropna=False)
    wide = wide.reindex(table["press"].unique())
    wide.columns = [f"{ratio:.2f}" for ratio in wide.columns]
    return wide


def intervals_by_ratio(table: pd.DataFrame) -> pd.DataFrame:
    """Each run's average with its 95% bootstrap interval, as ``avg [low, high]`` text (``failed`` for a run whose
    press raised)."""
    text = table.assign(cell=[
        "failed" if status != "ok" else "" if np.isnan(avg) else f"{avg:.4g} [{low:.4g}, {high:.4g}]"
        for avg, low, high, status in zip(table["average"], table["ci_low"], table["ci_high"], table["status"])
    ])
    wide = text.pivot_table(index="press", columns="ratio", values="cell", aggfunc="first", sort=False)
    wide = wide.reindex(table["press"].unique()).fillna("")
    wide.columns = [f"{ratio:.2f}" for ratio in wide.columns]
    return wide


def plot(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Average accuracy against compression ratio, one line and colour per press (ComposePress variants solid,
    kvpress baselines dashed, no_press black), each run's 95% bootstrap interval as a band."""
    figure = Figure(figsize=(8.5, 5))
    axes = figure.subplots()
    failed = set(table["press"]) - set(table.loc[table["status"] == "ok", "press"])
    palette = matplotlib.colormaps["tab20"].colors
    for index, (press, curve) in enumerate(curves(table).items()):
        if press == BASELINE:
            style = {"linestyle": ":", "color": "black"}
        else:
            ours = press.startswith("compose")
            style = {"marker": "o" if ours else "s", "linestyle": "-" if ours else "--", "color": palette[index % 20]}
        label = f"{press} (failed)" if press in failed else press
        axes.plot(curve.index, curve.to_numpy(), label=label, **style)
        with_interval = table["ci_low"].notna() if "ci_low" in table else False  # tables of older runs lack them
        runs = table[(table["press"] == press) & with_interval].sort_values("ratio")
        if press != BASELINE and len(runs):  # the 95% bootstrap interval of each run, as a band
            axes.fill_between(runs["ratio"], runs["ci_low"], runs["ci_high"], color=style["color"], alpha=0.12,
                              linewidth=0)
    axes.set(xlabel="compression ratio", ylabel="average accuracy (%)", title=title, ylim=(-2, 102))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def markdown(df: pd.DataFrame, index: bool = True) -> str:
    """A GitHub-markdown table (numbers to 4 significant digits, missing ones blank)."""
    if index:
        df = df.reset_index()
    cells = df.map(lambda v: ("" if np.isnan(v) else f"{v:.4g}") if isinstance(v, float) else str(v))
    lines = [list(df.columns), ["---"] * len(df.columns), *cells.to_numpy().tolist()]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def write_summary(table: pd.DataFrame, out_dir: Path, title: str) -> tuple[Path, Path, Path]:
    """``summary.csv``, ``summary.md`` and ``accuracy_vs_ratio.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "summary.csv", index=False)
    runs = table.assign(ratio=table["ratio"].map("{:.2f}".format))
    text = f"# {title}\n\n## Runs\n\n{markdown(runs, index=False)}\n\n" \
           f"## Average accuracy by compression ratio\n\n{markdown(accuracy_by_ratio(table))}\n\n" \
           f"## Average accuracy with 95% bootstrap intervals (over contexts)\n\n" \
           f"{markdown(intervals_by_ratio(table))}\n\n" \
           f"## Cache memory held (fraction of the full cache) by compression ratio\n\n" \
           f"{markdown(by_ratio(table, 'memory'))}\n"
    (out_dir / "summary.md").write_text(text)
    return out_dir / "summary.csv", out_dir / "summary.md", plot(table, out_dir / "accuracy_vs_ratio.png", title)


def plan(
    model: str,
    presses: list[str],
    ratios: list[float],
    data_dir: str | Path,
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    dataset: str = "synthetic",
    **options,
) -> list[RunConfig]:
    """The run configurations of a sweep; raises ValueError on any bad argument before anything runs.

    ``options`` are :class:`evaluation.run.RunConfig` fields (device, max_contexts, fidelity, ...).
    """
    return [RunConfig(model, str(data_dir), press, ratio, dataset=dataset, output_dir=str(output_dir), **options)
            for press, ratio in planned_runs(presses, ratios)]


def run_sweep(configs: list[RunConfig]) -> SweepOutputs:
    """Run (or skip) every configuration, print the tables and write the summary files."""
    runs = [run(config) for config in tqdm(configs, desc="sweep")]
    table = pd.DataFrame([run_summary(results_dir) for results_dir in runs])
    setting = configs[0].setting
    csv, md, png = write_summary(table, Path(configs[0].output_dir) / f"sweep__{setting}", setting)
    print(md.read_text())
    return SweepOutputs(runs=runs, summary_csv=csv, summary_md=md, plot=png)


def sweep(model: str, presses: list[str], ratios: list[float], data_dir: str | Path, **kwargs) -> SweepOutputs:
    """Every press at every ratio on ``model`` over the local dataset ``data_dir``; see :func:`plan`. The data
    and output folder are checked before the first run (:func:`evaluation.run.preflight`)."""
    configs = plan(model, presses, ratios, data_dir, **kwargs)
    preflight(configs)
    return run_sweep(configs)
