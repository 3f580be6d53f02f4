"""The full study: paired intervals, the KV heads' top-k overlap, the study's plan and its report."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from evaluation.metrics.accuracy import average, paired_difference, task_scores
from evaluation.runner.presses import PRESS_REGISTRY
from evaluation.runner.run import run
from evaluation.studies import core, head_overlap, toy_study
from evaluation.tasks.dataset_files import write_dataset
from evaluation.tasks.word_tasks import TASKS
from tests.test_evaluation import PNG_MAGIC, one_thread, tiny_model_folder  # noqa: F401 - one_thread: autouse


def answers(predicted):
    return pd.DataFrame({
        "task": ["a", "a", "a", "b", "b"],
        "context": ["c1", "c1", "c2", "c3", "c4"],
        "question": ["q1", "q2", "q3", "q4", "q5"],
        "answer": [["v1"], ["v2"], ["v3"], ["k1"], ["k2"]],
        "predicted_answer": predicted,
    })


def test_paired_difference_resamples_both_presses_with_the_same_contexts():
    right = answers(["v1", "v2", "v3", "k1", "k2"])
    wrong_on_c2 = answers(["v1", "v2", "x", "k1", "k2"])
    assert paired_difference(right, right) == (0.0, 0.0, 0.0)
    difference, low, high = paired_difference(right, wrong_on_c2, n_resamples=4000)
    assert difference == pytest.approx(average(task_scores(right)) - average(task_scores(wrong_on_c2)))
    # task a differs only where c2 is drawn: by 0, 1/3 or 1 (c2 twice) of task a, half that on the average
    assert (low, high) == (0.0, 50.0) and low <= difference <= high
    # unpaired, the same two would overlap far more; paired, one that is never worse is never below 0
    assert paired_difference(wrong_on_c2, right, n_resamples=4000)[1:] == (-50.0, 0.0)


def test_paired_difference_refuses_predictions_of_other_questions():
    with pytest.raises(ValueError, match="do not answer the same questions"):
        paired_difference(answers(["v1"] * 5), answers(["v1"] * 5).iloc[:4])


def test_top_k_overlap_is_one_for_identical_heads_and_zero_for_disjoint_ones():
    ranks = torch.arange(8.0)
    scores = torch.stack([
        torch.stack([ranks, ranks]),  # layer 0: both heads rank alike
        torch.stack([ranks, -ranks]),  # layer 1: opposite rankings, disjoint top 4
    ])  # (layers, kv_heads, n)
    assert head_overlap.top_k_overlap(scores, 4).tolist() == [1.0, 0.0]
    assert head_overlap.top_k_overlap(scores, 8).tolist() == [1.0, 1.0]
    assert head_overlap.top_k_overlap(scores, 6).tolist() == [1.0, pytest.approx(4 / 6)]
    assert math.isnan(head_overlap.top_k_overlap(scores[:, :1], 4)[0])
    with pytest.raises(ValueError, match="k must be in"):
        head_overlap.top_k_overlap(scores, 9)


def test_study_plan_spends_contexts_on_the_leaders_at_the_claim_ratios(tmp_path):
    plan = core.study_plan("m", tmp_path / "study-96", tmp_path, contexts=20, field_contexts=4)
    claims = {(c.press_name, c.compression_ratio) for c in plan["claims"]}
    assert claims == {("no_press", 0.0)} | {(p, r) for p in core.LEADERS[1:] for r in core.CLAIM_RATIOS}
    assert {c.max_contexts for c in plan["claims"]} == {20} and {c.max_contexts for c in plan["field"]} == {4}
    assert {c.press_name for c in plan["field"]} == {name for name in PRESS_REGISTRY if not name.endswith("_full_layers")}
    assert {c.compression_ratio for c in plan["field"]} == {0.0, *core.RATIOS}
    folders = {c.results_dir().parent for tier in plan.values() for c in tier}
    assert folders == {tmp_path / "study__study-96" / "contexts-20", tmp_path / "study__study-96" / "contexts-4"}
    for first, second, _ in core.COMPARISONS:
        assert {first, second} <= set(core.LEADERS)
    with pytest.raises(ValueError, match="must not exceed"):
        core.study_plan("m", tmp_path, tmp_path, contexts=2, field_contexts=3)


def test_study_runs_both_tiers_and_writes_the_report(tmp_path, capsys):
    model = tiny_model_folder(tmp_path / "tiny-llama")
    data_dir = write_dataset(tmp_path / "study-96", n_contexts=2, n_words=96, seed=0, tasks=TASKS)
    docs = tmp_path / "docs"
    argv = ["--model", str(model), "--data-dir", str(data_dir), "--contexts", "2", "--field-contexts", "1",
            "--claim-ratios", "0.9", "--ratios", "0.5", "--field-presses", "no_press", "knorm",
            "--overlap-contexts", "1", "--out", str(tmp_path / "results"), "--docs", str(docs)]
    report = toy_study.main(argv)
    summary = pd.read_csv(docs / "summary.csv")
    assert len(summary) == len(core.LEADERS) + 2 and (summary["status"] == "ok").all()
    assert set(summary.loc[summary["contexts"] == 2, "press"]) == set(core.LEADERS)
    assert set(summary.loc[summary["contexts"] == 1, "press"]) == {"no_press", "knorm"}
    text = report.read_text()
    for comparison in core.COMPARISONS:
        assert f"| {comparison[0]} | {comparison[1]} | 0.90 |" in text
    assert "## Are the KV heads redundant?" in text and "| layer | keep 50% |" in text
    kvzip = summary[(summary["press"] == "kvzip") & (summary["ratio"] == 0.9)].iloc[0]
    kvzip_line = next(line for line in text.splitlines() if line.startswith("| kvzip |"))  # the leaders' table
    assert kvzip_line.endswith(f"| {kvzip['average']:.4g} [{kvzip['ci_low']:.4g}, {kvzip['ci_high']:.4g}] |")
    for png in ("leaders_accuracy_vs_ratio.png", "field_accuracy_vs_ratio.png", "accuracy_vs_memory.png"):
        assert (docs / png).read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()
    toy_study.main(argv)  # every run done: the study resumes by skipping them all
    assert capsys.readouterr().out.count("skip ") == len(core.LEADERS) + 2
    # a checkout without the results folder resumes from the runs archived with the report
    archived = pd.read_csv(next((docs / "runs").glob("contexts-2/*__kvzip__0.90")) / "predictions.csv")
    assert list(archived.columns) == ["task", "context", "question", "answer", "predicted_answer"]
    assert archived["context"].str.fullmatch("[0-9a-f]{12}").all()
    shutil.rmtree(tmp_path / "results")
    shutil.rmtree(next((docs / "runs").glob("contexts-2/*__kvzip__0.90")))  # this one runs again, fresh
    toy_study.main(argv)
    assert capsys.readouterr().out.count("skip ") == len(core.LEADERS) + 1
    assert report.read_text() == text  # restored and fresh runs pair as before


def test_study_refuses_data_with_too_few_contexts(tmp_path, capsys):
    data_dir = write_dataset(tmp_path / "d", n_contexts=1, n_words=96, seed=0, tasks=TASKS)
    with pytest.raises(SystemExit):
        toy_study.main(["--model", "m", "--data-dir", str(data_dir), "--contexts", "2", "--field-contexts", "1"])
    error = capsys.readouterr().err
    assert "at least --contexts 2" in error and f"--words 4096 --seed {core.STUDY_SEED}" in error


def test_a_study_under_way_is_reported_as_far_as_it_got(tmp_path):
    model = tiny_model_folder(tmp_path / "tiny-llama")
    data_dir = write_dataset(tmp_path / "study-96", n_contexts=1, n_words=96, seed=0, tasks=TASKS)
    plan = core.study_plan(str(model), data_dir, tmp_path / "results", contexts=1, field_contexts=1,
                            claim_ratios=(0.9,), ratios=(0.5,), field=["knorm"])
    for config in plan["claims"][:2]:  # no_press and compose_replay only
        run(config)
    text = core.write_report(plan, tmp_path / "docs", None).read_text()
    assert f"**2 of {len(core.LEADERS) + 1} runs done** (claims tier 2 of {len(core.LEADERS)}, field 0 of 1)" in text
    assert "| compose_replay | kvzip |" not in text  # kvzip has not run: nothing to pair
    assert "## Every press" not in text and "## Leaders" in text
    toy_study.main(["--model", str(model), "--data-dir", str(data_dir), "--contexts", "1", "--field-contexts", "1",
                "--claim-ratios", "0.9", "--ratios", "0.5", "--field-presses", "knorm", "--overlap-contexts", "0",
                "--out", str(tmp_path / "results"), "--docs", str(tmp_path / "docs"), "--tier", "field"])
    done = {config.press_name for tier in plan.values() for config in core.done(tier)}
    assert done == {"no_press", "compose_replay", "knorm"}  # the field tier only: its no_press and knorm


def fake_run(folder: Path, predicted: list[str], hashed: bool, press: str = "p", ratio: float = 0.5) -> Path:
    """A finished run's folder: niah_single_1, one question per context, answer '7341' in every context."""
    from evaluation.studies.core import context_hash

    contexts = [f"context number {i} with a needle" for i in range(len(predicted))]
    frame = pd.DataFrame({"task": "niah_single_1", "context": [context_hash(c) if hashed else c for c in contexts],
                          "question": "q", "answer": "['7341']", "predicted_answer": predicted})
    folder.mkdir(parents=True)
    frame.to_csv(folder / "predictions.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps({"status": "ok", "press": press, "compression_ratio": ratio,
                                                     "average": 0.0, "average_ci95": [0.0, 0.0], "rows": len(frame)}))
    return folder


def test_paired_runs_pairs_a_fresh_run_with_an_archived_one(tmp_path):
    from evaluation.studies.paired_runs import paired_rows

    reference = fake_run(tmp_path / "ref", ["7341", "7341", "no", "7341"], hashed=True, press="kvzip")
    fresh = fake_run(tmp_path / "fresh", ["no", "7341", "no", "nothing"], hashed=False, press="compose")
    rows = paired_rows(reference, [fresh])
    assert list(rows["press"]) == ["kvzip", "compose"]
    assert rows.loc[0, "accuracy"].startswith("75.0 [") and rows.loc[1, "accuracy"].startswith("25.0 [")
    # 1 of 4 answered against 3 of 4: -50 points; the interval holds only resampled differences of the 4 contexts
    difference = rows.loc[1, "minus reference (paired)"]
    assert difference.startswith("-50.0 [")
    low, high = (float(x) for x in difference.split("[")[1].rstrip("]").split(","))
    assert -100 <= low <= -50 <= high <= 0


def test_paired_runs_prints_a_markdown_table(tmp_path, capsys):
    from evaluation.studies.paired_runs import main

    reference = fake_run(tmp_path / "ref", ["7341", "7341"], hashed=True, press="kvzip", ratio=0.9)
    run = fake_run(tmp_path / "run", ["7341", "no"], hashed=False, press="compose", ratio=0.9)
    main(["--reference", str(reference), str(run)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| press | ratio | accuracy |") and lines[1].startswith("| --- |")
    assert lines[3].startswith("| compose | 0.9 |") and "| -50.0 [" in lines[3]


def test_paired_runs_refuses_runs_on_other_questions(tmp_path):
    from evaluation.studies.paired_runs import paired_rows

    reference = fake_run(tmp_path / "ref", ["7341", "7341"], hashed=True)
    other = fake_run(tmp_path / "other", ["7341", "7341", "7341"], hashed=False)
    with pytest.raises(ValueError, match="other against the reference: .*do not answer the same questions"):
        paired_rows(reference, [other])


def test_paired_runs_refuses_a_failed_run_and_keeps_hashes(tmp_path):
    from evaluation.studies.core import context_hash
    from evaluation.studies.paired_runs import paired_rows

    assert context_hash("0123456789ab") == "0123456789ab"  # an archived context stays as it is
    assert context_hash("0123456789ab and more") != "0123456789ab and more"
    reference = fake_run(tmp_path / "ref", ["7341"], hashed=True)
    failed = fake_run(tmp_path / "failed", ["7341"], hashed=False)
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "errors": ["out of memory"]}))
    with pytest.raises(ValueError, match="failed: the run failed \\(out of memory\\)"):
        paired_rows(reference, [failed])


def test_archived_predictions_keep_a_hash_of_digits_as_text(tmp_path):
    # a context hash may be all digits (and start with 0): read as a number it would no longer pair with its run
    frame = pd.DataFrame({"task": "niah_single_1", "context": ["012345678901", "123456789012"], "question": "q",
                          "answer": "['7341']", "predicted_answer": "7341"})
    frame.to_csv(tmp_path / "predictions.csv", index=False)
    read = core.read_predictions(tmp_path / "predictions.csv")
    assert list(read["context"]) == ["012345678901", "123456789012"]
    assert read["answer"].tolist() == [["7341"], ["7341"]]
