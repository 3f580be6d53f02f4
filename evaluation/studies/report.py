"""Tables and plots of finished runs, for the sweep's summary and the studies' reports.

A run's summary row (:func:`run_summary`, from its ``metrics.json``); tables by press and ratio (:func:`by_ratio`,
:func:`accuracy_by_ratio`, :func:`intervals_by_ratio`) written as GitHub markdown (:func:`markdown`); plots of
accuracy against compression ratio and against the cache memory held (:func:`accuracy_figure`, :func:`plot`,
:func:`plot_accuracy_vs_memory`) under human titles (:func:`human_title`); a sweep's summary files
(:func:`write_summary`).
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..runner.presses import BASELINE
from ..runner.run import ratio_label
from ..safe_files import save_figure, write_atomic


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
        "total_contexts": metrics.get("contexts", np.nan),
        "questions": metrics.get("rows", np.nan),
        **fidelity,
        "error": "; ".join(metrics["errors"]),
    }



def curves(table: pd.DataFrame) -> dict[str, pd.Series]:
    """Average accuracy by ratio (ascending, whatever order the runs finished in) for each press; starts at
    no_press's accuracy at ratio 0 when it ran."""
    by_press = {press: rows.set_index("ratio")["average"].sort_index()
                for press, rows in table.groupby("press", sort=False)}
    baseline = by_press.pop(BASELINE, None)
    if baseline is None:
        return by_press
    flat = pd.Series(baseline.iloc[0], index=sorted({0.0, *table["ratio"]}))
    start = baseline.iloc[:1]
    with_start = {p: c if 0.0 in c.index else pd.concat([start, c]) for p, c in by_press.items()}
    return {BASELINE: flat, **with_start}


MEAN_COLUMN = "mean over ratios"
MEAN_EXPLAINED = (f"`{MEAN_COLUMN}`: a press's average accuracy averaged over the compression ratios it ran, "
                  f"each ratio weighted equally (blank if a run failed); `{BASELINE}`: its accuracy uncompressed.")


def accuracy_by_ratio(table: pd.DataFrame) -> pd.DataFrame:
    """One row per press: average accuracy at each ratio, then its mean over those ratios (:data:`MEAN_COLUMN`,
    explained by :data:`MEAN_EXPLAINED`; NaN where a run has no accuracy)."""
    wide = by_ratio(table, "average")
    runs = table.groupby("press", sort=False)["average"]
    wide[MEAN_COLUMN] = runs.agg(lambda accuracies: accuracies.mean() if accuracies.notna().all() else np.nan)
    return wide


def task_names(table: pd.DataFrame) -> list[str]:
    """The per-task score columns of a run table (:func:`run_summary`'s, between ``status`` and ``average``)."""
    columns = list(table.columns)
    return columns[columns.index("status") + 1: columns.index("average")] if "average" in columns else []


def by_ratio(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """One row per press (in run order), one column per ratio, of ``column``."""
    wide = table.pivot_table(index="press", columns="ratio", values=column, sort=False, dropna=False)
    wide = wide.reindex(index=table["press"].unique(), columns=sorted(wide.columns))
    wide.columns = [ratio_label(ratio) for ratio in wide.columns]
    return wide


def intervals_by_ratio(table: pd.DataFrame) -> pd.DataFrame:
    """Each run's average with its 95% bootstrap interval, as ``avg [low, high]`` text (``failed`` for a run whose
    press raised)."""
    text = table.assign(cell=[
        "failed" if status != "ok" else "" if np.isnan(avg) else f"{avg:.4g} [{low:.4g}, {high:.4g}]"
        for avg, low, high, status in zip(table["average"], table["ci_low"], table["ci_high"], table["status"])
    ])
    wide = text.pivot_table(index="press", columns="ratio", values="cell", aggfunc="first", sort=False)
    wide = wide.reindex(index=table["press"].unique(), columns=sorted(wide.columns)).fillna("")
    wide.columns = [ratio_label(ratio) for ratio in wide.columns]
    return wide


MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8", "H", "1")
LINE_STYLES = ("-", "--", "-.", (0, (3, 1, 1, 1, 1, 1)), (0, (5, 2)), (0, (1, 1)))
OFFSET_SHARE = 0.25  # the presses' horizontal offsets together span this share of the smallest gap between ratios


@dataclass
class PlotLine:
    """One press's curve as :func:`plot` draws it: the measured ``ratios`` and ``accuracies`` (no_press: its
    accuracy at every ratio, a flat line), drawn ``offset`` to the right of the ratios so that curves that
    coincide stay visible."""

    press: str
    ratios: list[float]
    accuracies: list[float]
    offset: float
    marker: str | None
    linestyle: object
    color: object
    label: str


def plot_lines(table: pd.DataFrame) -> list[PlotLine]:
    """Every press's line: a marker and line style of its own (no_press dotted black, without marker), a small
    horizontal offset per press."""
    failed = set(table["press"]) - set(table.loc[table["status"] == "ok", "press"])
    by_press = curves(table)
    measured = sorted(set(table["ratio"]))
    gap = min(np.diff(measured), default=1.0) if len(measured) > 1 else 1.0
    pressed = [press for press in by_press if press != BASELINE]
    step = OFFSET_SHARE * gap / max(len(pressed), 1)
    palette = matplotlib.colormaps["tab10"].colors  # markers and line styles tell apart presses sharing a colour
    lines = []
    for press, curve in by_press.items():
        label = f"{press} (failed)" if press in failed else press
        if press == BASELINE:
            lines.append(PlotLine(press, list(curve.index), list(curve.to_numpy()), 0.0, None, ":", "black", label))
            continue
        index = pressed.index(press)
        lines.append(PlotLine(
            press, list(curve.index), list(curve.to_numpy()), (index - (len(pressed) - 1) / 2) * step,
            MARKERS[index % len(MARKERS)], LINE_STYLES[index % len(LINE_STYLES)], palette[index % 10], label,
        ))
    return lines


def coinciding(lines: list[PlotLine]) -> list[list[str]]:
    """Groups of presses (2 or more) whose curves have the same points: named on the plot, since their lines
    lie on top of each other but for the offsets."""
    groups: dict[tuple, list[str]] = {}
    for line in lines:
        if line.press != BASELINE and not np.isnan(line.accuracies).any():
            key = tuple(zip(line.ratios, np.round(line.accuracies, 6)))
            groups.setdefault(key, []).append(line.press)
    return [presses for presses in groups.values() if len(presses) > 1]


def draw_accuracy_vs_ratio(axes, table: pd.DataFrame) -> None:
    """Average accuracy against compression ratio on ``axes``: one line per press with its own marker, line
    style and colour (no_press dotted black), shifted right by a small offset per press so that equal curves stay
    visible, each run's 95% bootstrap interval as a band; x ticks at the measured ratios only."""
    with_interval = table["ci_low"].notna() if "ci_low" in table else pd.Series(False, index=table.index)
    for line in plot_lines(table):
        x = np.asarray(line.ratios) + line.offset
        axes.plot(x, line.accuracies, label=line.label, marker=line.marker, linestyle=line.linestyle,
                  color=line.color, markersize=6, linewidth=1.6, alpha=0.9)
        runs = table[(table["press"] == line.press) & with_interval].sort_values("ratio")
        if line.press != BASELINE and len(runs):  # the 95% bootstrap interval of each run, as a band
            axes.fill_between(runs["ratio"] + line.offset, runs["ci_low"], runs["ci_high"], color=line.color,
                              alpha=0.1, linewidth=0)
    ratios = sorted(set(table["ratio"]))
    axes.set_xticks(ratios, [f"{ratio:g}" for ratio in ratios])
    axes.set(xlabel="compression ratio (fraction of the KV cache removed)", ylabel="average accuracy (%)",
             ylim=(-2, 102))
    axes.grid(alpha=0.3)


def draw_accuracy_vs_memory(axes, table: pd.DataFrame) -> None:
    """Average accuracy against the cache memory really held (fraction of the full cache) on ``axes``, in the
    same marker, style and colour per press as :func:`draw_accuracy_vs_ratio`, intervals as error bars: presses
    that only mask stay at 1.0 whatever their ratio."""
    styles = {line.press: line for line in plot_lines(table)}
    ok = table[(table["status"] == "ok") & table["memory"].notna()] if "memory" in table else table.iloc[:0]
    for press, runs in ok.groupby("press", sort=False):
        runs = runs.sort_values("memory")
        line = styles[press]
        errors = None
        if "ci_low" in runs and runs["ci_low"].notna().all():
            errors = [(runs["average"] - runs["ci_low"]).to_numpy(), (runs["ci_high"] - runs["average"]).to_numpy()]
        axes.errorbar(runs["memory"].to_numpy(), runs["average"].to_numpy(), yerr=errors, capsize=3,
                      label=line.label, color=line.color, marker=line.marker or "o", linestyle=line.linestyle, markersize=6, alpha=0.9)
    axes.set(xlabel="cache memory held (fraction of the full cache)", ylabel="average accuracy (%)",
             xlim=(0, 1.05), ylim=(-2, 102))
    axes.grid(alpha=0.3)


def plot(table: pd.DataFrame, path: Path, title: str) -> Path:
    """:func:`accuracy_figure` saved at ``path`` (PNG), written whole and never through a link."""
    return save_figure(accuracy_figure(table, title), path)


def plot_accuracy_vs_memory(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Average accuracy against the cache memory really held (fraction of the full cache), one line per press
    with its intervals as error bars (:func:`draw_accuracy_vs_memory`): presses that only mask
    stay at 1.0 whatever their ratio."""
    figure = Figure(figsize=(9, 5.5))
    axes = figure.subplots()
    draw_accuracy_vs_memory(axes, table)
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.suptitle(textwrap.fill(title, 75), fontsize="medium")  # over the whole figure, wrapped: never cut
    figure.tight_layout()
    return save_figure(figure, path)



def accuracy_figure(table: pd.DataFrame, title: str) -> Figure:
    """Two panels: average accuracy against compression ratio (:func:`draw_accuracy_vs_ratio`) and against the
    cache memory really held (:func:`draw_accuracy_vs_memory`, where the runs recorded it), one legend for both;
    presses whose curves coincide are named under the plot. ``title``: a human one (:func:`human_title`),
    wrapped over the whole figure so that it never runs off its edges."""
    with_memory = "memory" in table and table["memory"].notna().any()
    figure = Figure(figsize=(14 if with_memory else 9, 5.5))
    axes = figure.subplots(1, 2 if with_memory else 1, squeeze=False)[0]
    draw_accuracy_vs_ratio(axes[0], table)
    if with_memory:
        draw_accuracy_vs_memory(axes[1], table)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize="small", loc="center right")
    figure.suptitle(textwrap.fill(title, 110 if with_memory else 75), fontsize="medium")
    same = coinciding(plot_lines(table))
    if same:
        note = "same curve: " + "; ".join(" = ".join(presses) for presses in same)
        figure.text(0.01, 0.01, note, fontsize="small", wrap=True)
    legend_share = 0.1 if with_memory else 0.2
    figure.tight_layout(rect=(0, 0.05 if same else 0, 1 - legend_share, 1))
    return figure


def display_name(model: str) -> str:
    """The model as a person names it: a real model by its own name (SmolLM2-135M-Instruct), a local folder by
    its name, a hub id as it is."""
    from ..model_zoo.real_models import REAL_MODELS

    name = Path(model.rstrip("/")).name
    real = REAL_MODELS.get(name)
    if real is not None:
        return real.description.split(" (")[0]
    return name if Path(model).is_dir() else model


def data_label(data: str) -> str:
    """A dataset as a person names it: the study's ``ruler-<model>-<tokens>[-eligible]`` and the main job's ``...-c<n>-<tasks>`` folders as
    "RULER at <tokens> tokens", any other by its folder name."""
    match = re.fullmatch(r"ruler-.+?-(\d+)(-eligible|-c\d+-[a-z0-9_+]+)?", data)
    return f"RULER at {match.group(1)} tokens" if match else data


def human_title(model: str, data: str, n_tasks: int, n_contexts: int | None, what: str = "",
                sample: str | None = None) -> str:
    """A plot's title, e.g. "SmolLM2-135M-Instruct · RULER at 2048 tokens (3 tasks) · 2 contexts per task";
    ``sample`` (e.g. "4 contexts, 16 questions") in place of "every context" where it is known, after the
    contexts per task otherwise."""
    data = data_label(data)
    if n_contexts is None:
        contexts = sample or "every context"
    else:
        contexts = f"{n_contexts} context{'s' * (n_contexts != 1)} per task"
        contexts += f" ({sample})" if sample else ""
    return " · ".join(part for part in (display_name(model), f"{data} ({n_tasks} tasks)", contexts, what) if part)


def sample_size(table: pd.DataFrame) -> str | None:
    """"<contexts> contexts, <questions> questions" of the runs in ``table`` (their largest: a failed run may have
    fewer), or None where the runs did not record them."""
    if "total_contexts" not in table or table["total_contexts"].isna().all():
        return None
    return f"{int(table['total_contexts'].max())} contexts, {int(table['questions'].max())} questions"


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
    write_atomic(out_dir / "summary.csv", table.to_csv(index=False))
    runs = table.assign(ratio=table["ratio"].map(ratio_label))
    text = f"# {title}\n\n## Runs\n\n{markdown(runs, index=False)}\n\n" \
           f"## Average accuracy by compression ratio\n\n{MEAN_EXPLAINED}\n\n" \
           f"{markdown(accuracy_by_ratio(table))}\n\n" \
           f"## Average accuracy with 95% bootstrap intervals (over contexts)\n\n" \
           f"{markdown(intervals_by_ratio(table))}\n\n" \
           f"## Cache memory held (fraction of the full cache) by compression ratio\n\n" \
           f"{markdown(by_ratio(table, 'memory'))}\n"
    write_atomic(out_dir / "summary.md", text)
    return out_dir / "summary.csv", out_dir / "summary.md", plot(table, out_dir / "accuracy_vs_ratio.png", title)

