"""What the toy-model and real-model studies share: the plan of runs in two tiers, which runs are done, the
archive of finished runs in the report's folder (and their restoring into the results folder), paired differences
between presses, and the report writer (``summary.md``, ``summary.csv`` and plots).

The leaders, comparisons and ratios here are the toy study's (:mod:`evaluation.studies.toy_study`); the real-model
study (:mod:`evaluation.studies.real_study`) passes its own. Both run as ``python -m evaluation.studies``.
"""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

import pandas as pd

from ..metrics.accuracy import paired_difference
from ..runner.presses import BASELINE, KVPRESS_PRESSES, PRESS_REGISTRY
from ..runner.run import RunConfig, ratio_label, rerun_reason
from ..safe_files import check_inside, write_atomic
from ..tasks import dataset_files
from ..tasks.word_tasks import TASKS
from .report import by_ratio, human_title, intervals_by_ratio, markdown, plot, plot_accuracy_vs_memory, run_summary

STUDY_SEED = 2026
ARCHIVE = "runs"  # under the report's folder: a copy of every finished run, from which a later study resumes
RATIOS = (0.25, 0.5, 0.75, 0.9, 0.95)
CLAIM_RATIOS = (0.75, 0.9, 0.95)
LEADERS = (
    BASELINE,
    "compose_replay",
    "compose_replay_local",
    "compose_bidirectional",
    "compose_unstructured",
    "compose_uniform",
    "compose_shared_positions",
    "compose_bidirectional_unstructured",
    "compose_bidirectional_uniform",
    "compose_bidirectional_shared_positions",
    "kvzip",
)
# (a, b, what a - b measures): the paired comparisons the findings rest on
COMPARISONS = (
    ("compose_bidirectional", "kvzip", "ComposePress (bidirectional, no extra pass) against KVzip"),
    ("compose_replay", "kvzip", "the paper's replay against KVzip"),
    ("compose_replay_local", "kvzip", "the cheaper replay against KVzip"),
    ("compose_bidirectional", "compose_replay", "the bidirectional source against the paper's replay"),
    ("compose_replay_local", "compose_replay", "cheaper replay against exact replay"),
    ("compose_bidirectional", "compose_bidirectional_unstructured",
     "what the dense structure costs (unstructured frees no memory)"),
    ("compose_bidirectional", "compose_bidirectional_uniform", "what global layer allocation adds"),
    ("compose_bidirectional", "compose_bidirectional_shared_positions",
     "what composite tokens add (over one position set per layer)"),
    ("compose_replay", "compose_unstructured", "what the dense structure costs, under replay"),
    ("compose_replay", "compose_uniform", "what global layer allocation adds, under replay"),
    ("compose_replay", "compose_shared_positions", "what composite tokens add, under replay"),
)


FULL_LAYERS_SUFFIX = "_full_layers"


def field_presses() -> list[str]:
    """The leaders, then every other press of the registry (kvpress's in registry order, then ours), but for the
    ``*_full_layers`` forms, which differ from their press on hybrid models only (name them with
    ``--field-presses`` there)."""
    others = [name for name in PRESS_REGISTRY if name not in LEADERS and not name.endswith(FULL_LAYERS_SUFFIX)]
    kvpress_first = sorted(others, key=lambda name: name not in KVPRESS_PRESSES)
    return list(LEADERS) + kvpress_first


def study_plan(model: str, data_dir: Path, out: Path, contexts: int, field_contexts: int,
               claim_ratios=CLAIM_RATIOS, ratios=RATIOS, field: list[str] | None = None,
               leaders: tuple[str, ...] = LEADERS, dataset: str = "synthetic") -> dict[str, list[RunConfig]]:
    """``{"claims": ..., "field": ...}`` run configurations (``field``: the field's presses, by default
    :func:`field_presses`); each tier writes under its own folder."""
    if field_contexts > contexts:
        raise ValueError(f"field_contexts ({field_contexts}) must not exceed contexts ({contexts})")
    tiers = {"claims": (list(leaders), claim_ratios, contexts),
             "field": (field or field_presses(), ratios, field_contexts)}
    plan = {}
    for tier, (presses, tier_ratios, n_contexts) in tiers.items():
        output_dir = out / f"study__{dataset_files.dataset_name(data_dir)}" / f"contexts-{n_contexts}"
        plan[tier] = [
            RunConfig(model, str(data_dir), press, ratio, dataset=dataset, output_dir=str(output_dir),
                      max_contexts=n_contexts)
            for press in presses
            for ratio in ([0.0] if press == BASELINE else sorted(tier_ratios))
        ]
    return plan


def done(configs: list[RunConfig]) -> list[RunConfig]:
    """The runs of ``configs`` that have finished with this run's record (:func:`evaluation.runner.run.rerun_reason`:
    a run restored from the archive counts when its record matches; one archived before records held a data
    fingerprint and the press's settings counts too, those fields being unknown)."""
    return [config for config in configs if rerun_reason(config) is None]


def run_table(configs: list[RunConfig]) -> pd.DataFrame:
    """One summary row per finished run (see :func:`evaluation.studies.report.run_summary`), with its contexts per task."""
    rows = [run_summary(config.results_dir()) | {"contexts": config.max_contexts} for config in done(configs)]
    return pd.DataFrame(rows)


def archived(config: RunConfig, docs: Path) -> Path:
    """Where ``docs`` keeps a copy of a run (``runs/<tier folder>/<run folder>``)."""
    results_dir = config.results_dir()
    return docs / ARCHIVE / results_dir.parent.name / results_dir.name


def archive_run(config: RunConfig, docs: Path) -> None:
    """Copy a finished run into ``docs``, small enough to commit: ``metrics.json``, ``config.yaml`` and the
    predictions with each context replaced by a short hash (enough to pair presses' answers). A run archived
    already is left as it is (its predictions are read only once). Every file is written whole and never through
    a link (a linked file is replaced); a linked folder leading outside ``docs`` is refused (OSError)."""
    source, target = config.results_dir(), archived(config, docs)
    metrics = (source / "metrics.json").read_bytes()
    if (target / "metrics.json").is_file() and (target / "metrics.json").read_bytes() == metrics:
        return
    target.mkdir(parents=True, exist_ok=True)
    check_inside(target, docs)
    if not (source / "predictions.csv").is_file():
        (target / "predictions.csv").unlink(missing_ok=True)  # a failed rerun: the old answers are not its own
    else:
        frame = pd.read_csv(source / "predictions.csv", keep_default_na=False)
        frame["context"] = frame["context"].map(context_hash)
        columns = ["task", "context", "question", "answer", "predicted_answer"]
        write_atomic(target / "predictions.csv", frame[columns].to_csv(index=False))
    write_atomic(target / "config.yaml", (source / "config.yaml").read_bytes())
    write_atomic(target / "metrics.json", metrics)  # last, whole: a run is archived once its metrics are


def context_hash(text: str) -> str:
    """How an archive stores a context: the first 12 hex digits of its SHA-1 (a hash already is kept as it is)."""
    if re.fullmatch(r"[0-9a-f]{12}", text):
        return text
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def restore_run(config: RunConfig, docs: Path) -> None:
    """A run archived in ``docs`` but missing from the results folder (results do not survive everywhere) gets
    its files back there (its predictions with contexts as hashes), so that the study skips it; the report reads
    every run's predictions from ``docs``. Written whole, never through a link, never outside the results
    folder."""
    source, target = archived(config, docs), config.results_dir()
    if (source / "metrics.json").is_file() and not (target / "metrics.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        check_inside(target, config.output_dir)
        for name in ("predictions.csv", "config.yaml", "metrics.json"):  # metrics last: what marks a run done
            if (source / name).is_file():
                write_atomic(target / name, (source / name).read_bytes())


def predictions(config: RunConfig, docs: Path) -> pd.DataFrame | None:
    """A run's archived predictions (contexts as hashes, the same for every run), or None."""
    path = archived(config, docs) / "predictions.csv"
    return read_predictions(path) if path.is_file() else None


def read_predictions(path: Path) -> pd.DataFrame:
    """A ``predictions.csv`` with its answers as lists again and its contexts as text (an archive's hashes of
    digits only would otherwise be read as numbers)."""
    frame = pd.read_csv(path, keep_default_na=False, dtype={"context": str})
    frame["answer"] = frame["answer"].map(parse_answer)
    return frame


def parse_answer(text):
    """An ``answer`` list as pandas wrote it to CSV (``"['v1', 'v2']"``) back to a list."""
    return ast.literal_eval(text) if isinstance(text, str) and text.startswith("[") else text


def paired_result(by_run: dict[tuple[str, float], RunConfig], a: str, b: str, ratio: float,
                  docs: Path) -> tuple[float, float, float] | None:
    """``(difference, low, high)`` of ``a`` minus ``b`` at ``ratio`` on the same questions (``by_run``: finished
    runs by ``(press, ratio)``), or None where either run or its archived predictions is missing."""
    frames = [predictions(by_run[(press, ratio)], docs) if (press, ratio) in by_run else None for press in (a, b)]
    if any(frame is None for frame in frames):
        return None
    return paired_difference(*frames)


def paired_table(configs: list[RunConfig], docs: Path, comparisons=COMPARISONS) -> pd.DataFrame:
    """Each of ``comparisons`` (``(a, b, meaning)``) at each ratio both presses ran: the difference in average
    accuracy (points) with its paired 95% bootstrap interval and a verdict."""
    by_run = {(config.press_name, config.compression_ratio): config for config in configs}
    rows = []
    for a, b, meaning in comparisons:
        for ratio in sorted({ratio for press, ratio in by_run if press == a}):
            result = paired_result(by_run, a, b, ratio, docs)
            if result is None:
                continue
            difference, low, high = result
            verdict = "A better" if low > 0 else "B better" if high < 0 else "tie (interval holds 0)"
            rows.append({"A": a, "B": b, "ratio": ratio_label(ratio), "A - B": difference, "95% interval":
                         f"[{low:.3g}, {high:.3g}]", "verdict": verdict, "what it measures": meaning})
    return pd.DataFrame(rows)


def per_task_table(table: pd.DataFrame, ratio: float, tasks=TASKS) -> pd.DataFrame:
    """Accuracy per task of every run at ``ratio`` (and ``no_press``)."""
    rows = table[(table["ratio"] == ratio) | (table["press"] == BASELINE)]
    columns = [task for task in tasks if task in rows]
    return rows.set_index("press")[columns + ["average"]]




def plot_title(config: RunConfig, tasks, what: str) -> str:
    """A plot's title: model, data and task count, contexts per task, and which presses (``what``)."""
    return human_title(config.model, dataset_files.dataset_name(config.data_dir), len(tasks), config.max_contexts, what)


def write_report(plan: dict[str, list[RunConfig]], docs: Path, overlap_text: str | None, tasks=TASKS,
                 comparisons=COMPARISONS, preface: str = "") -> Path:
    """``summary.md``, ``summary.csv`` and the plots in ``docs`` from the finished runs of ``plan`` (a study
    still under way is reported as far as it got, and says so) over ``tasks``; ``preface`` (markdown) follows the
    title."""
    docs.mkdir(parents=True, exist_ok=True)
    claims, field = run_table(plan["claims"]), run_table(plan["field"])
    n_claims, n_field = plan["claims"][0].max_contexts, plan["field"][0].max_contexts
    setting = plan["claims"][0].setting
    write_atomic(docs / "summary.csv", pd.concat([claims, field], ignore_index=True).to_csv(index=False))
    n_runs, n_done = sum(map(len, plan.values())), len(claims) + len(field)
    progress = "" if n_done == n_runs else (
        f" **{n_done} of {n_runs} runs done** (claims tier {len(claims)} of {len(plan['claims'])}, field "
        f"{len(field)} of {len(plan['field'])}): the tables hold those; rerun the command to finish the rest.")
    sections = [(f"# Study: {setting}\n\nWritten by `python -m evaluation.studies`. Sample: {len(tasks)} tasks; the "
                f"leaders on {n_claims} contexts per task, the field on {n_field}. Accuracy in % by kvpress's RULER "
                f"metric (`string_match_all`: the share of answer items found as case-blind substrings), 95% "
                f"bootstrap intervals over contexts (resampled within each task).{progress}")]
    sections += [preface] if preface else []
    if len(claims):
        sections += leaders_sections(claims, plan["claims"], docs, n_claims, tasks, comparisons)
    if len(field):
        plot(field, docs / "field_accuracy_vs_ratio.png", plot_title(plan["field"][0], tasks, "every press"))
        sections.append(f"## Every press: average accuracy [95% interval], {n_field} contexts per task\n\n"
                        f"{markdown(intervals_by_ratio(field))}\n\n![field](field_accuracy_vs_ratio.png)")
    if overlap_text:
        sections.append(f"## Are the KV heads redundant?\n\n{overlap_text}")
    write_atomic(docs / "summary.md", "\n\n".join(sections) + "\n")
    return docs / "summary.md"


def leaders_sections(claims: pd.DataFrame, configs: list[RunConfig], docs: Path, n_contexts: int,
                     tasks=TASKS, comparisons=COMPARISONS) -> list[str]:
    """The leaders' part of the report: intervals, per task at the two highest ratios, paired differences,
    memory held; with their plots."""
    plot(claims, docs / "leaders_accuracy_vs_ratio.png", plot_title(configs[0], tasks, "leaders"))
    plot_accuracy_vs_memory(claims, docs / "accuracy_vs_memory.png", plot_title(configs[0], tasks, "leaders"))
    leaders = (f"## Leaders: average accuracy [95% interval], {n_contexts} contexts per task\n\n"
               f"{markdown(intervals_by_ratio(claims))}\n\n![leaders](leaders_accuracy_vs_ratio.png)")
    per_task = [f"## Per task at {ratio_label(ratio)}, {n_contexts} contexts per task\n\n"
                f"{markdown(per_task_table(claims, ratio, tasks))}" for ratio in sorted(set(claims["ratio"]) - {0.0})[-2:]]
    paired = ("## Paired differences (A - B in points, same questions; a verdict only where the interval "
              f"excludes 0)\n\n{markdown(paired_table(done(configs), docs, comparisons), index=False)}")
    memory = (f"## Cache memory held (fraction of the full cache)\n\n{markdown(by_ratio(claims, 'memory'))}\n\n"
              "![accuracy against memory held](accuracy_vs_memory.png)")
    return [leaders, *per_task, paired, memory]

