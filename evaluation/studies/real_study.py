"""The study on a real pretrained model: RULER's tasks, written in the model's own tokens.

    python -m evaluation.studies --model smollm2-135m                       # 2048 tokens -> docs/study-smollm2-135m-2048/
    python -m evaluation.studies --model smollm2-135m --tier screen         # step 2 only
    python -m evaluation.studies --model smollm2-135m --tier claims &       # two processes share two cores:
    python -m evaluation.studies --model smollm2-135m --tier claims &       # each claims the next run not taken
    python -m evaluation.studies --model smollm2-135m --tokens 4096 --contexts 5    # the leaders at 4096, smaller

1. **Data**: RULER's synthetic tasks (:mod:`evaluation.tasks.ruler`) of ``--tokens`` tokens of the model's tokenizer,
   ``--contexts`` contexts per task, seed :data:`STUDY_SEED`, in ``evaluation/data/ruler-<model>-<tokens>/``.
2. **Screening**: ``no_press`` on the first ``--screen-contexts`` contexts of every task. A task where the
   uncompressed model scores under ``--min-accuracy`` (40%) cannot tell presses apart: it is shown in the report
   and left out of every average; the tiers run on a copy of the dataset holding the other tasks
   (``ruler-<model>-<tokens>-eligible``).
3. **Claims tier**: the leaders (:data:`REAL_LEADERS`) at ``--claim-ratios`` (0.5 / 0.75 / 0.9) on ``--contexts``
   contexts per task, run in :func:`priority` order (0.75 first) so a study cut short has the cells that matter.
   The tier is sequential: a leader whose interval at the first ratio lies wholly below another leader's is not
   run at the other ratios (:func:`eliminated`; the baseline and the :data:`FLOORS` always run).
   **Field tier**: every press of the registry at ``--ratios`` on ``--field-contexts`` contexts per task.

Runs are resumable and archived exactly as the toy study's (:mod:`evaluation.studies.core`) (``--docs``/runs/); the report is rewritten
after every run, so it always shows what has finished. Several processes may run the same tiers at once: each takes
the next run that no live process has claimed (a ``.claimed`` file in the run's folder holding its process id and
start time; a claim with the id alone, from an earlier version, is honoured while that id runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from kvpress_compose.compression import AUTO, resolved_allocation
from kvpress_compose.layer_masks import is_hybrid, layer_windows

from ..model_zoo.real_models import REAL_MODELS, cache_root
from ..runner.presses import BASELINE
from ..runner.run import RunConfig, ratio_label, read_result, run
from ..tasks import dataset_files
from ..tasks.ruler import RULER_TASKS, check_ruler_dataset
from .core import (
    STUDY_SEED,
    archive_run,
    done,
    field_presses,
    paired_result,
    restore_run,
    run_table,
    study_plan,
    write_report,
)
from .report import markdown

CLAIM_RATIOS = (0.5, 0.75, 0.9)
FIELD_RATIOS = (0.25, 0.5, 0.75, 0.9)
RATIO_PRIORITY = (0.75, 0.9, 0.5, 0.25)  # the ratio where presses part first, then the harder one
# the default candidates against KVzip, with SnapKV as the floor, in the order they run at each ratio
REAL_LEADERS = (
    BASELINE,
    "compose_replay",  # the paper's, and what the default runs on a model without windowed layers
    "kvzip",
    "compose_uniform",  # replay, uniform allocation
    "compose_bidirectional",
    "snapkv",
    "compose_replay_prompted",  # KVzip's framing and sinks, global allocation over per-head shares
    "compose_replay_local",
    "compose_replay_shared",  # one pooled token ranking for every layer (the Gemma fix)
)
REAL_COMPARISONS = (
    ("compose_replay", "kvzip", "the paper's replay against KVzip"),
    ("compose_uniform", "kvzip", "replay with uniform allocation against KVzip"),
    ("compose_uniform", "compose_replay", "uniform against the paper's global allocation, under replay"),
    ("compose_bidirectional", "compose_replay", "the no-extra-pass source against replay"),
    ("compose_replay_local", "compose_replay", "KVzip's cheaper chunk attention against exact replay"),
    ("compose_replay", "snapkv", "replay against SnapKV (frees memory, no extra pass)"),
    ("compose_replay_prompted", "kvzip", "KVzip's framing in ComposePress against KVzip"),
    ("compose_replay_prompted", "compose_replay", "KVzip's framing, normalized global allocation, against the default"),
    ("compose_replay_shared", "compose_replay", "one pooled token set for every layer (hybrid default) against global"),
    ("compose_replay_shared", "kvzip", "one pooled token set for every layer against KVzip"),
    ("compose_replay_pooled", "compose_replay", "pooling 9 alone, under global allocation, against global"),
    ("compose_unstructured", "compose_replay", "per-head budgets (masks, no memory freed) against composite tokens"),
    ("compose_replay", "compactor", "replay against kvpress's best memory-freeing press (SmolLM2's field)"),
    ("compose_replay_shared", "compactor_full_layers", "the hybrid default against Compactor on the full layers"),
)
MIN_ACCURACY = 40.0
# run at every claim ratio whatever they score: the baseline, the default, KVzip and SnapKV (the presses the
# claims and most comparisons are about)
FLOORS = (BASELINE, "compose_replay", "kvzip", "snapkv")


def dataset_dir(model: str, n_tokens: int) -> Path:
    return dataset_files.DEFAULT_DATA_ROOT / f"ruler-{model}-{n_tokens}"


def write_data(model: str, data_dir: Path, n_tokens: int, n_contexts: int) -> None:
    """RULER's tasks for ``model`` in ``data_dir`` unless a dataset with enough contexts per task is there."""
    if check_ruler_dataset(data_dir, RULER_TASKS, n_contexts):
        return
    from transformers import AutoTokenizer

    from ..model_zoo.real_models import resolve_model
    from ..tasks.ruler import write_ruler_dataset

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    write_ruler_dataset(data_dir, tokenizer, n_tokens, n_contexts, seed=STUDY_SEED)


def screening_config(model: str, data_dir: Path, out: Path, n_contexts: int) -> RunConfig:
    """``no_press`` on the first ``n_contexts`` contexts of every task."""
    return RunConfig(model, str(data_dir), BASELINE, 0.0, dataset="ruler", retry_failed=True, output_dir=str(out / f"study__{data_dir.name}" /
                     f"screen-{n_contexts}"), max_contexts=n_contexts)


def screening(config: RunConfig, min_accuracy: float) -> tuple[dict[str, float], list[str]]:
    """The uncompressed model's accuracy per task, and the tasks at or above ``min_accuracy``."""
    metrics = json.loads((config.results_dir() / "metrics.json").read_text())
    if metrics.get("status") != "ok":
        raise SystemExit(f"error: the screening run failed ({'; '.join(metrics.get('errors', []))}): fix it and "
                         "rerun (a failed run is run again)")
    scores = metrics["scores"]
    return scores, [task for task, score in scores.items() if score >= min_accuracy]


def eligible_dataset(data_dir: Path, tasks: list[str]) -> Path:
    """A copy of ``data_dir`` holding ``tasks`` only (their files, byte for byte), beside it."""
    target = data_dir.with_name(f"{data_dir.name}-eligible")
    wanted = {dataset_files.task_file(target, task).name for task in tasks}
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("test-*.jsonl"):
        if stale.name not in wanted:
            stale.unlink()
    for task in tasks:
        source = dataset_files.task_file(data_dir, task)
        if not dataset_files.task_file(target, task).is_file() or \
                dataset_files.task_file(target, task).read_bytes() != source.read_bytes():
            shutil.copyfile(source, dataset_files.task_file(target, task))
    return target


def ratio_priority(ratio: float) -> tuple[int, float]:
    """Where ``ratio`` runs in :data:`RATIO_PRIORITY`; a ratio not listed there runs after them, lowest first."""
    return (RATIO_PRIORITY.index(ratio), 0.0) if ratio in RATIO_PRIORITY else (len(RATIO_PRIORITY), ratio)


def priority(configs: list[RunConfig], leaders: tuple[str, ...] = REAL_LEADERS) -> list[RunConfig]:
    """``configs`` in run order: the baseline, then ratio by :data:`RATIO_PRIORITY`, then press by ``leaders``."""
    def key(config):
        ratio_rank = ratio_priority(config.compression_ratio)
        press_rank = leaders.index(config.press_name) if config.press_name in leaders else len(leaders)
        return (config.press_name != BASELINE, ratio_rank, press_rank)

    return sorted(configs, key=key)


def first_ratio(claims: list[RunConfig]) -> float | None:
    """The claim ratio that runs first (:data:`RATIO_PRIORITY`), where leaders are eliminated (None: no ratio)."""
    ratios = {config.compression_ratio for config in claims if config.press_name != BASELINE}
    return min(ratios, key=ratio_priority) if ratios else None


def eliminated(claims: list[RunConfig], floors: tuple[str, ...] = FLOORS) -> dict[str, str]:
    """``{press: why}`` for the leaders out of the running: at :func:`first_ratio`, the press's 95% interval lies
    wholly below the interval of another finished leader (unpaired intervals that do not overlap: it is behind).
    Its cells at the other ratios are not run: at a higher ratio accuracy falls further, and at a lower one curves
    close in on the uncompressed model, where such a press may catch up with the leaders but has shown no sign of
    passing them. Presses in ``floors`` are never eliminated; a run not yet finished eliminates nothing."""
    ratio = first_ratio(claims)
    if ratio is None:
        return {}
    table = run_table([config for config in claims if config.compression_ratio == ratio])
    table = table[table["press"] != BASELINE].dropna(subset=["ci_low", "ci_high"]) if len(table) else table
    if table.empty:
        return {}
    best = table.loc[table["ci_low"].idxmax()]
    return {row.press: (f"{row.average:.1f} [{row.ci_low:.1f}, {row.ci_high:.1f}] at {ratio}, wholly below "
                        f"{best.press}'s [{best.ci_low:.1f}, {best.ci_high:.1f}]")
            for row in table.itertuples() if row.press not in floors and row.ci_high < best.ci_low}


def runs_left_out(claims: list[RunConfig], floors: tuple[str, ...] = FLOORS) -> list[RunConfig]:
    """The claims runs :func:`eliminated` drops: an eliminated press's runs at every ratio but the first, unless
    they have finished (an earlier version, or another process, may have run them: their results are reported)."""
    out, ratio = eliminated(claims, floors), first_ratio(claims)
    return [config for config in claims if config.press_name in out and config.compression_ratio != ratio
            and config not in done([config])]


def elimination_section(claims: list[RunConfig], floors: tuple[str, ...] = FLOORS) -> str:
    """Markdown naming the eliminated leaders and why ('' when none)."""
    out = eliminated(claims, floors)
    if not out:
        return ""
    lines = "\n".join(f"- `{press}`: {why}" for press, why in out.items())
    return (f"## Leaders not run at the other ratios\n\nAt {first_ratio(claims)}, these leaders' intervals lie wholly "
            f"below another's, so the tier does not spend its other ratios on them ({', '.join(floors)} always run):"
            f"\n\n{lines}")


def claim(config: RunConfig) -> bool:
    """Whether this process may run ``config``: it writes its claim (process id and start time) to the run's
    ``.claimed`` file unless a live process holds it (a claim left by a process that died, or whose id a later
    process reuses, is taken over)."""
    folder = config.results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".claimed"
    mine = process_claim(os.getpid())
    try:
        holder = path.read_text().strip()
    except FileNotFoundError:
        holder = ""
    if holder and holder != mine and claim_alive(holder):
        return False
    path.write_text(mine)
    return path.read_text() == mine  # two takers at once: the last writer wins, the other skips


def process_claim(pid: int) -> str:
    """``"<pid> <start time>"``: the start time (in clock ticks since boot, from /proc) tells a process from a
    later one given the same id; ``"<pid>"`` alone where /proc is not there."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return str(pid)
    return f"{pid} {start}"


def claim_alive(claim_text: str) -> bool:
    """Whether the process that wrote ``claim_text`` still runs (the same process, not one reusing its id)."""
    try:
        pid = int(claim_text.split()[0])
    except (IndexError, ValueError):
        return False  # an unreadable claim holds nothing
    if pid == os.getpid():  # ours, or left by a process that had our id before us
        return claim_text == process_claim(pid)
    if not process_alive(pid):
        return False
    now = process_claim(pid)
    # the same process unless both start times are known and differ (an id alone: alive while the id runs)
    return len(claim_text.split()) == 1 or len(now.split()) == 1 or now == claim_text


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def failed_section(configs: list[RunConfig]) -> str:
    """Markdown naming each run of ``configs`` that failed, with its error ('' when none): a failed run is left
    out of every table (and tried again when the study resumes), so without this section a press that cannot
    run on the model (KVzip on Gemma 3) would vanish from the report unexplained."""
    lines = []
    for config in {config.results_dir(): config for config in configs}.values():  # the tiers may share a run
        metrics, _ = read_result(config.results_dir() / "metrics.json")  # missing or unreadable: not a failure
        if metrics is not None and metrics.get("status") == "failed":
            errors = "; ".join(metrics.get("errors", [])) or "no error recorded"
            lines.append(f"- `{config.press_name}` at {ratio_label(config.compression_ratio)}: {errors}")
    return "## Runs that failed\n\nLeft out of every table:\n\n" + "\n".join(lines) if lines else ""


# the registry press that ComposePress() equals, by the allocation "auto" resolves to (tests/test_real_study.py
# checks their settings against the default's resolution): the studies run these under their explicit names
DEFAULT_AS_RUN = {"global": "compose_replay", "shared": "compose_replay_shared"}
DEFAULT_ALIAS = "compose"  # the registry's ComposePress() itself: the same press as DEFAULT_AS_RUN's, never "another"


def default_press_name(model: str) -> str | None:
    """The registry press that ``ComposePress()`` equals on ``model``, from the model's own config as the press
    reads it (None where the converted model is not on this machine)."""
    folder = cache_root() / model
    if not (folder / "config.json").is_file():
        return None
    config = AutoConfig.from_pretrained(folder).get_text_config()  # as the press reads its decoder's config
    allocation, _ = resolved_allocation(AUTO, 1, is_hybrid(layer_windows(config, config.num_hidden_layers)))
    return DEFAULT_AS_RUN[allocation]


def default_section(configs: list[RunConfig], docs: Path, default: str | None) -> str:
    """Markdown: at each claim ratio, the default against the best other ComposePress setting that ran there (its
    accuracy, the paired difference, whether the two intervals overlap); '' where the default has not run."""
    finished = done(configs)
    table = run_table(finished)
    if default is None or not len(table) or default not in set(table["press"]):
        return ""
    by_run = {(config.press_name, config.compression_ratio): config for config in finished}
    rows = []
    for ratio in sorted(set(table.loc[table["press"] == default, "ratio"])):
        at = table[(table["ratio"] == ratio) & table["press"].str.startswith("compose")].set_index("press")
        others = at.drop([default, DEFAULT_ALIAS], errors="ignore").dropna(subset=["average"])
        if not len(others):
            continue
        mine, best = at.loc[default], others.loc[others["average"].idxmax()]
        result = paired_result(by_run, default, best.name, ratio, docs)
        if result is None:  # an archive without its predictions: nothing to pair
            paired, verdict = "n/a (predictions missing)", "n/a"
        else:
            difference, low, high = result
            paired = f"{difference:+.1f} [{low:+.1f}, {high:+.1f}]"
            verdict = "default ahead" if low > 0 else "default behind" if high < 0 else "tie (interval holds 0)"
        rows.append({
            "ratio": ratio_label(ratio),
            "default": f"{mine['average']:.1f} [{mine['ci_low']:.1f}, {mine['ci_high']:.1f}], memory {mine['memory']:.2f}",
            "best other setting": f"`{best.name}` {best['average']:.1f} [{best['ci_low']:.1f}, {best['ci_high']:.1f}], "
                                  f"memory {best['memory']:.2f}",
            "default - best other (paired)": paired,
            "verdict": verdict,
            "intervals overlap": "yes" if mine["ci_high"] >= best["ci_low"] and best["ci_high"] >= mine["ci_low"]
            else "no",
            "other settings run": len(others),
        })
    if not rows:
        return ""
    return ("## The default against the best other ComposePress setting\n\n`ComposePress()` resolves its "
            f"allocation from this model's config to what `{default}` runs (`layer_allocation=\"auto\"`). At each "
            f"ratio, the ComposePress setting of the claims tier that scored highest besides it (memory: the fraction of the "
            f"cache each really holds; `structured=False` masks entries and frees nothing):\n\n"
            f"{markdown(pd.DataFrame(rows), index=False)}")


def screening_section(scores: dict[str, float], eligible: list[str], n_contexts: int, min_accuracy: float) -> str:
    table = pd.DataFrame({"uncompressed accuracy": scores}).rename_axis("task")
    table["in averages"] = ["yes" if task in eligible else "no" for task in table.index]
    left_out = sorted(set(scores) - set(eligible))
    said = f"Left out of every average (under {min_accuracy:g}): {', '.join(left_out)}." if left_out else \
        "Every task passes."
    return (f"## Screening: the uncompressed model per task ({n_contexts} contexts per task)\n\n"
            f"{markdown(table)}\n\n{said}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.studies --model <real model>", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(REAL_MODELS))
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per context, in the model's tokenizer")
    parser.add_argument("--contexts", type=int, default=10,
                        help="contexts per task for the leaders' claims (RULER's multi-needle tasks ask 4-10 of each)")
    parser.add_argument("--field-contexts", type=int, default=3, help="contexts per task for every press")
    parser.add_argument("--screen-contexts", type=int, default=5, help="contexts per task for the screening")
    parser.add_argument("--min-accuracy", type=float, default=MIN_ACCURACY,
                        help="uncompressed accuracy a task needs to count in averages")
    parser.add_argument("--claim-ratios", type=float, nargs="+", default=list(CLAIM_RATIOS))
    parser.add_argument("--ratios", type=float, nargs="+", default=list(FIELD_RATIOS), help="the field's ratios")
    parser.add_argument("--leaders", nargs="+", default=list(REAL_LEADERS), help="the claims tier's presses")
    parser.add_argument("--field-presses", nargs="+", default=None, help="default: every press of the registry")
    parser.add_argument("--tier", choices=["all", "screen", "claims", "field"], default="all")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder")
    parser.add_argument("--docs", type=Path, default=None, help="report folder (default: docs/study-<model>-<tokens>)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: report the runs already there")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("tokens", "contexts", "field_contexts", "screen_contexts", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not all(0 < ratio < 1 for ratio in args.ratios + args.claim_ratios):
        parser.error("--ratios and --claim-ratios must be in (0, 1)")
    torch.set_num_threads(args.threads)
    docs = args.docs or Path("docs") / f"study-{args.model}-{args.tokens}"
    data_dir = dataset_dir(args.model, args.tokens)
    write_data(args.model, data_dir, args.tokens, max(args.contexts, args.screen_contexts, args.field_contexts))

    screen = screening_config(args.model, data_dir, args.out, args.screen_contexts)
    restore_run(screen, docs)
    if not done([screen]):
        if args.report_only or args.tier not in ("all", "screen"):
            raise SystemExit("error: the screening has not run: run `--tier screen` first (or `--tier all`)")
        run(screen)
    archive_run(screen, docs)
    scores, eligible = screening(screen, args.min_accuracy)
    if not eligible:
        raise SystemExit(f"error: no task reaches {args.min_accuracy}% uncompressed: {scores}")
    preface = screening_section(scores, eligible, args.screen_contexts, args.min_accuracy)
    eligible_dir = eligible_dataset(data_dir, eligible)

    plan = study_plan(args.model, eligible_dir, args.out, args.contexts, args.field_contexts,
                      tuple(args.claim_ratios), tuple(args.ratios), args.field_presses or field_presses(),
                      leaders=tuple(args.leaders), dataset="ruler")
    for config in plan["claims"] + plan["field"]:
        config.retry_failed = True  # a run that failed (a crash, memory) runs again when the study resumes
    plan = {tier: priority(configs, tuple(args.leaders)) for tier, configs in plan.items()}
    every_run = plan["claims"] + plan["field"]
    for config in every_run:
        restore_run(config, docs)

    default = default_press_name(args.model)  # read from the model's config once, not at every report

    def report() -> Path:
        for config in done(every_run):  # runs made by other processes too
            archive_run(config, docs)
        left_out = runs_left_out(plan["claims"])
        reported = {"claims": [config for config in plan["claims"] if config not in left_out], "field": plan["field"]}
        sections = [preface, default_section(reported["claims"], docs, default),
                    elimination_section(plan["claims"]), failed_section(every_run)]
        return write_report(reported, docs, None, tasks=eligible, comparisons=REAL_COMPARISONS,
                            preface="\n\n".join(section for section in sections if section))

    if not args.report_only and args.tier != "screen":
        tiers = ["claims", "field"] if args.tier == "all" else [args.tier]
        for tier, config in tqdm([(name, config) for name in tiers for config in plan[name]], desc="study runs"):
            if done([config]) or (tier == "claims" and config in runs_left_out(plan["claims"])) or not claim(config):
                continue
            run(config)
            archive_run(config, docs)
            report()
    path = report()
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
