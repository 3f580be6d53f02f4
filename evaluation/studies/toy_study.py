"""The study on a toy model (trained on the word-level tasks): where the budget binds, which presses keep their accuracy, with intervals.

    python -m evaluation.studies                  # GQA model, 4096-word contexts of all 7 tasks -> docs/study-4096/
    python -m evaluation.studies --words 2048 --model <folder> --docs docs/study-2048
    python -m evaluation.studies --model smollm2-135m   # a real model: see evaluation.studies.real_study (its own options)

Compute goes where the claims are. The leaders (ComposePress's query sources and ablations, KVzip) run at the
ratios where presses differ (``--claim-ratios``, 0.75 / 0.9 / 0.95) on ``--contexts`` contexts per task (20);
every press of the registry, the leaders included, runs at every ratio (0.25 to 0.95) on
``--field-contexts`` (4). Runs go under ``--out/study__<data>/contexts-<n>/`` and a run already there is
skipped, so an interrupted study resumes where it stopped; ``--tier claims`` and ``--tier field`` in two
processes share two cores. Every finished run is also copied to ``--docs``/runs/ (metrics, and predictions with
each context as a hash): committed, it lets a later checkout resume the study and rebuild its report without the
results folder. ``--docs`` receives:

- ``summary.md``: the leaders' accuracy with 95% bootstrap intervals, per task at the highest ratios, paired
  differences (``A - B`` with its paired interval; "A beats B" only where it excludes 0), the memory held,
  the field's table, and the KV heads' top-k overlap (:mod:`evaluation.studies.head_overlap`);
- ``summary.csv``: every run (press, ratio, contexts, per-task and average accuracy, interval, memory);
- ``leaders_accuracy_vs_ratio.png``, ``field_accuracy_vs_ratio.png`` (bands: the intervals) and
  ``accuracy_vs_memory.png`` (accuracy against the cache memory really held).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..model_zoo.toy_models import GQA_MODEL
from ..runner.run import check_model, check_results_folders, check_writable, load_pipeline, run
from ..tasks import dataset_files
from ..tasks.word_tasks import TASKS
from . import head_overlap
from .core import CLAIM_RATIOS, RATIOS, STUDY_SEED, archive_run, done, restore_run, study_plan, write_report

STUDY_MODEL = GQA_MODEL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.studies", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or model folder (default: retrieval-llama-gqa)")
    parser.add_argument("--words", type=int, default=4096, help="words per context")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: evaluation/data/study-<words>")
    parser.add_argument("--contexts", type=int, default=20, help="contexts per task for the leaders' claims")
    parser.add_argument("--field-contexts", type=int, default=4, help="contexts per task for every press")
    parser.add_argument("--claim-ratios", type=float, nargs="+", default=list(CLAIM_RATIOS))
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="the field's ratios")
    parser.add_argument("--field-presses", nargs="+", default=None, help="the field's presses (default: every "
                        "press of the registry)")
    parser.add_argument("--overlap-contexts", type=int, default=3, help="contexts per task for the head overlap "
                        "(0: skip it)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder")
    parser.add_argument("--docs", type=Path, default=None, help="report folder (default: docs/study-<words>)")
    parser.add_argument("--tier", choices=["all", "claims", "field"], default="all", help="run one tier only: "
                        "two processes, one per tier, share two cores (each report covers every finished run)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: write the report from the "
                        "runs already there")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("contexts", "field_contexts", "words", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not all(0 < ratio < 1 for ratio in args.ratios + args.claim_ratios):
        parser.error("--ratios and --claim-ratios must be in (0, 1)")
    model = args.model or os.path.relpath(STUDY_MODEL)  # relative: the run folders' names do not depend on the checkout
    if args.model is None and not (STUDY_MODEL / "config.json").is_file():
        sys.exit(f"error: no model in {STUDY_MODEL}: train it (see its README) or pass --model")
    torch.set_num_threads(args.threads)
    data_dir = args.data_dir or dataset_files.DEFAULT_DATA_ROOT / f"study-{args.words}"
    if not dataset_files.has_dataset(data_dir):
        dataset_files.write_dataset(data_dir, args.contexts, args.words, STUDY_SEED, TASKS)
    try:
        available = dataset_files.load_rows(data_dir).groupby("task")["context"].nunique()
    except ValueError as error:  # a bad dataset file, named
        parser.error(str(error))
    if set(available.index) != set(TASKS) or available.min() < args.contexts:
        parser.error(f"{data_dir} holds {available.to_dict()} contexts per task; the study needs every task of "
                     f"{list(TASKS)} with at least --contexts {args.contexts}: write it with `python -m "
                     f"evaluation.tasks.dataset_files --out {data_dir} --tasks {' '.join(TASKS)} --contexts {args.contexts} --words "
                     f"{args.words} --seed {STUDY_SEED}`")
    try:
        plan = study_plan(model, Path(data_dir), args.out, args.contexts, args.field_contexts,
                          tuple(args.claim_ratios), tuple(args.ratios), args.field_presses)
        check_model(model)
        check_writable(args.out)  # before the first run, not after it
        check_results_folders(plan["claims"] + plan["field"])
    except (ValueError, OSError) as error:
        parser.error(str(error))
    docs = args.docs or Path("docs") / f"study-{args.words}"
    every_run = plan["claims"] + plan["field"]
    for config in every_run:
        restore_run(config, docs)
    if not args.report_only:
        tiers = ["claims", "field"] if args.tier == "all" else [args.tier]
        for config in tqdm([config for tier in tiers for config in plan[tier]], desc="study runs"):
            run(config)
            archive_run(config, docs)
    for config in done(every_run):  # runs made by other processes too
        archive_run(config, docs)
    overlap_text = None
    if args.overlap_contexts:
        pipe = load_pipeline(model)
        contexts = head_overlap.context_ids(pipe, data_dir, args.overlap_contexts)
        overlap_text = head_overlap.report(head_overlap.overlap_table(pipe.model, contexts), model, data_dir,
                                           len(contexts))
    report = write_report(plan, docs, overlap_text)
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
