"""Sweep presses x compression ratios with :mod:`evaluation.runner.run`, then tabulate and plot the results
(:mod:`evaluation.studies.report`).

``no_press`` runs once, at ratio 0. Runs go to ``<output_dir>`` (default ``results/sweep``; kvpress's own
evaluate.py writes under ``results/kvpress``), the summary to ``<output_dir>/sweep__<dataset>__<data>__<model>/``:

- ``summary.csv``: one row per run (press, ratio, status, per-task and average accuracy, memory, seconds,
  fidelity);
- ``summary.md``: that table, then average accuracy with one row per press and one column per ratio, and its
  mean over the ratios the press ran (``mean over ratios``, each ratio weighted equally; ``no_press``: its
  uncompressed accuracy), then the cache memory held per press and ratio;
- ``accuracy_vs_ratio.png``: average accuracy against compression ratio, one line per press
  (:func:`evaluation.studies.report.plot`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..studies.report import human_title, run_summary, sample_size, task_names, write_summary
from ..tasks.dataset_files import dataset_name
from .presses import BASELINE
from .run import DEFAULT_OUTPUT_DIR, RunConfig, run


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

    ``options`` are :class:`evaluation.runner.run.RunConfig` fields (device, max_contexts, fidelity, ...).
    """
    return [RunConfig(model, str(data_dir), press, ratio, dataset=dataset, output_dir=str(output_dir), **options)
            for press, ratio in planned_runs(presses, ratios)]


def run_sweep(configs: list[RunConfig]) -> SweepOutputs:
    """Run (or skip) every configuration, print the tables and write the summary files."""
    runs = [run(config) for config in tqdm(configs, desc="sweep")]
    table = pd.DataFrame([run_summary(results_dir) for results_dir in runs])
    first = configs[0]
    title = human_title(first.model, dataset_name(first.data_dir), len(task_names(table)), first.max_contexts,
                        sample=sample_size(table))
    csv, md, png = write_summary(table, Path(first.output_dir) / f"sweep__{first.setting}", title)
    print(md.read_text())
    return SweepOutputs(runs=runs, summary_csv=csv, summary_md=md, plot=png)

