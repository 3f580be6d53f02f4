"""The real-model study's planning: screening, the eligible tasks' dataset, run order and claims between processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from evaluation.runner.run import RunConfig
from evaluation.studies import core, real_study
from evaluation.tasks import dataset_files
from evaluation.tasks.word_tasks import BASE_TASKS


@pytest.fixture
def dataset(tmp_path):
    return dataset_files.write_dataset(tmp_path / "ruler-m-64", n_contexts=2, n_words=64, seed=0, tasks=BASE_TASKS[:3])


def test_screening_keeps_the_tasks_the_uncompressed_model_can_do(tmp_path, dataset):
    config = real_study.screening_config("m", dataset, tmp_path / "out", 2)
    assert config.press_name == "no_press" and config.max_contexts == 2 and config.dataset == "ruler"
    config.results_dir().mkdir(parents=True)
    scores = {"niah_single": 100.0, "niah_multikey": 39.9, "niah_multivalue": 40.0}
    (config.results_dir() / "metrics.json").write_text(json.dumps({"status": "ok", "scores": scores}))
    assert real_study.screening(config, 40.0) == (scores, ["niah_single", "niah_multivalue"])
    section = real_study.screening_section(scores, ["niah_single", "niah_multivalue"], 2, 40.0)
    assert "| niah_multikey | 39.9 | no |" in section and "Left out of every average (under 40): niah_multikey" \
        in section


def test_the_eligible_dataset_holds_exactly_the_eligible_tasks_byte_for_byte(dataset):
    target = real_study.eligible_dataset(dataset, ["niah_single", "niah_multikey"])
    assert target.name == "ruler-m-64-eligible"
    assert sorted(p.name for p in target.glob("test-*.jsonl")) == ["test-niah_multikey.jsonl",
                                                                   "test-niah_single.jsonl"]
    assert dataset_files.task_file(target, "niah_single").read_bytes() == dataset_files.task_file(dataset, "niah_single").read_bytes()
    real_study.eligible_dataset(dataset, ["niah_single"])  # a later screening with fewer tasks drops the others
    assert [p.name for p in target.glob("test-*.jsonl")] == ["test-niah_single.jsonl"]
    assert set(dataset_files.load_rows(target)["task"]) == {"niah_single"}


def test_runs_go_baseline_first_then_by_ratio_priority_then_leader_order(tmp_path):
    configs = [RunConfig("m", "d", press, ratio, output_dir=str(tmp_path))
               for press in ("snapkv", "kvzip", "compose_replay") for ratio in (0.5, 0.9, 0.75)]
    configs.append(RunConfig("m", "d", "no_press", 0.0, output_dir=str(tmp_path)))
    order = [(c.press_name, c.compression_ratio) for c in real_study.priority(configs)]
    assert order[0] == ("no_press", 0.0)
    assert order[1:4] == [("compose_replay", 0.75), ("kvzip", 0.75), ("snapkv", 0.75)]
    assert [ratio for _, ratio in order[1:]] == [0.75] * 3 + [0.9] * 3 + [0.5] * 3


def test_a_run_claimed_by_a_live_process_is_skipped_and_a_dead_claim_is_taken_over(tmp_path):
    config = RunConfig("m", "d", "kvzip", 0.75, output_dir=str(tmp_path))
    assert real_study.claim(config)
    assert (config.results_dir() / ".claimed").read_text().split()[0] == str(os.getpid())
    assert real_study.claim(config)  # our own claim
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (config.results_dir() / ".claimed").write_text(str(sleeper.pid))
        assert not real_study.claim(config)  # a live process holds it
    finally:
        sleeper.kill()
        sleeper.wait()
    assert real_study.claim(config)  # its holder died: taken over


def test_a_claim_whose_process_id_was_reused_is_taken_over(tmp_path):
    config = RunConfig("m", "d", "kvzip", 0.75, output_dir=str(tmp_path))
    config.results_dir().mkdir(parents=True)
    parent = os.getppid()  # alive, but not the process that wrote the claim: its start time differs
    start = real_study.process_claim(parent).split()[1]
    (config.results_dir() / ".claimed").write_text(f"{parent} {int(start) + 1}")
    assert real_study.claim(config)
    (config.results_dir() / ".claimed").write_text(real_study.process_claim(parent))  # its own claim holds
    assert not real_study.claim(config)
    (config.results_dir() / ".claimed").write_text(str(parent))  # an id alone (an earlier version): alive
    assert not real_study.claim(config)
    (config.results_dir() / ".claimed").write_text(str(os.getpid()))  # our id, left by an earlier process
    assert real_study.claim(config)


def test_a_failed_screening_is_named_and_a_partial_dataset_refused(tmp_path, dataset):
    config = real_study.screening_config("m", dataset, tmp_path / "out", 2)
    assert config.retry_failed  # it runs again when the study resumes
    config.results_dir().mkdir(parents=True)
    (config.results_dir() / "metrics.json").write_text(json.dumps({"status": "failed", "errors": ["OOM"]}))
    with pytest.raises(SystemExit, match="screening run failed \\(OOM\\)"):
        real_study.screening(config, 40.0)
    from evaluation.tasks.ruler import RULER_FORMAT

    card = dataset / "README.md"  # a RULER dataset of this format, some of its tasks written: an interrupted generation
    card.write_text(card.read_text() + f"\nruler-format: {RULER_FORMAT}\n")
    with pytest.raises(SystemExit, match="lacks the tasks .*'vt'.*remove the folder"):
        real_study.write_data("m", dataset, 64, 1)


def test_a_failed_run_is_named_with_its_error_in_the_report(tmp_path):
    configs = [RunConfig("m", "d", press, 0.75, output_dir=str(tmp_path)) for press in ("kvzip", "snapkv", "tova")]
    for config, metrics in zip(configs, ({"status": "failed", "errors": ["ValueError: not supported"]},
                                         {"status": "ok", "average": 1.0})):
        config.results_dir().mkdir(parents=True)
        (config.results_dir() / "metrics.json").write_text(json.dumps(metrics))
    section = real_study.failed_section(configs + configs[:1])  # tova has not run: not a failure; a run in
    # both tiers (the same contexts) is named once
    assert section.startswith("## Runs that failed") and section.count("\n- ") == 1
    assert "- `kvzip` at 0.75: ValueError: not supported" in section
    assert real_study.failed_section(configs[1:]) == ""


def test_a_leader_wholly_below_another_at_the_first_ratio_is_not_run_at_the_others(tmp_path, monkeypatch):
    presses = ("no_press", "compose_replay", "kvzip", "compose_uniform", "snapkv", "compose_bidirectional")
    configs = [RunConfig("m", "d", press, ratio, output_dir=str(tmp_path)) for press in presses
               for ratio in ((0.0,) if press == "no_press" else (0.5, 0.75, 0.9))]
    finished = {  # press -> (average, ci_low, ci_high) at 0.75; compose_bidirectional has not finished
        "compose_replay": (68.3, 62.5, 74.2), "kvzip": (74.2, 67.5, 80.4),
        "compose_uniform": (27.5, 22.1, 32.9), "snapkv": (2.9, 0.4, 6.7)}

    def run_table(runs):
        rows = [{"press": c.press_name, "ratio": c.compression_ratio, "average": finished[c.press_name][0],
                 "ci_low": finished[c.press_name][1], "ci_high": finished[c.press_name][2]}
                for c in runs if c.press_name in finished and c.compression_ratio == 0.75]
        return pd.DataFrame(rows)

    monkeypatch.setattr(real_study, "run_table", run_table)
    assert real_study.first_ratio(configs) == 0.75
    out = real_study.eliminated(configs)
    assert list(out) == ["compose_uniform"]  # snapkv is a floor; compose_replay's interval overlaps kvzip's
    assert "wholly below kvzip's [67.5, 80.4]" in out["compose_uniform"]
    assert [(c.press_name, c.compression_ratio) for c in real_study.runs_left_out(configs)] == \
        [("compose_uniform", 0.5), ("compose_uniform", 0.9)]
    assert "`compose_uniform`: 27.5 [22.1, 32.9] at 0.75" in real_study.elimination_section(configs)
    finished["compose_uniform"] = (60.0, 55.0, 68.0)  # overlapping now: nothing is eliminated
    assert real_study.eliminated(configs) == {} and real_study.elimination_section(configs) == ""
    assert real_study.eliminated([c for c in configs if c.press_name == "no_press"]) == {}
    compose_uniform_at_09 = [c for c in configs if (c.press_name, c.compression_ratio) == ("compose_uniform", 0.9)]
    finished["compose_uniform"] = (27.5, 22.1, 32.9)
    monkeypatch.setattr(real_study, "done", lambda runs: [c for c in runs if c in compose_uniform_at_09])
    assert [(c.press_name, c.compression_ratio) for c in real_study.runs_left_out(configs)] == \
        [("compose_uniform", 0.5)]  # a run that finished anyway (another process, an earlier version) is reported


def test_claim_ratios_outside_the_priority_list_run_lowest_first_and_the_lowest_eliminates(tmp_path):
    configs = [RunConfig("m", "d", press, ratio, output_dir=str(tmp_path))
               for press in ("compose_replay", "kvzip") for ratio in (0.8, 0.6)]
    assert real_study.first_ratio(configs) == 0.6
    assert [(c.press_name, c.compression_ratio) for c in real_study.priority(configs)] == \
        [("compose_replay", 0.6), ("kvzip", 0.6), ("compose_replay", 0.8), ("kvzip", 0.8)]


def test_the_default_section_sets_the_default_beside_the_best_other_compose_setting(tmp_path, monkeypatch):
    presses = {  # press -> (average, ci_low, ci_high) at 0.75, and whether each question is answered
        "compose_replay": ((70.0, 60.0, 80.0), [1, 1, 1, 0]), "compose_uniform": ((50.0, 40.0, 60.0), [1, 1, 0, 0]),
        "compose_replay_shared": ((60.0, 55.0, 72.0), [1, 0, 1, 0]), "kvzip": ((90.0, 85.0, 95.0), [1, 1, 1, 1])}
    configs = [RunConfig("m", "d", press, 0.75, output_dir=str(tmp_path)) for press in presses]
    table = pd.DataFrame([{"press": press, "ratio": 0.75, "average": average, "ci_low": low, "ci_high": high,
                           "memory": 1.0 if press == "compose_replay_shared" else 0.25}
                          for press, ((average, low, high), _) in presses.items()])
    monkeypatch.setattr(real_study, "done", lambda runs: list(runs))
    monkeypatch.setattr(real_study, "run_table", lambda runs: table[table["press"].isin({c.press_name for c in runs})])

    def predictions(config, docs):
        answered = presses[config.press_name][1]
        return pd.DataFrame({"task": "t", "context": range(4), "question": "q", "answer": [["x"]] * 4,
                             "predicted_answer": ["x" if hit else "y" for hit in answered]})

    monkeypatch.setattr(core, "predictions", predictions)  # what paired_result reads
    section = real_study.default_section(configs, tmp_path, "compose_replay")
    # kvzip scores highest but is not a ComposePress setting; shared is the best other one
    row = next(line for line in section.splitlines() if line.startswith("| 0.75"))
    assert row.split(" | ")[1:6] == ["70.0 [60.0, 80.0], memory 0.25", "`compose_replay_shared` 60.0 [55.0, 72.0], memory 1.00",
                                     "+25.0 [+0.0, +75.0]", "tie (interval holds 0)", "yes"]
    assert real_study.default_section(configs, tmp_path, None) == ""
    assert real_study.default_section(configs[1:], tmp_path, "compose_replay") == ""  # the default has not run


def test_the_default_is_named_from_the_model_config_as_the_press_reads_it(tmp_path, monkeypatch):
    from transformers import Gemma3TextConfig, LlamaConfig

    monkeypatch.setattr(real_study, "cache_root", lambda: tmp_path)
    LlamaConfig(num_hidden_layers=2).save_pretrained(tmp_path / "llama")
    Gemma3TextConfig(num_hidden_layers=6, sliding_window=512).save_pretrained(tmp_path / "gemma")
    assert real_study.default_press_name("llama") == "compose_replay"
    assert real_study.default_press_name("gemma") == "compose_replay_shared"
    assert real_study.default_press_name("absent") is None


@pytest.mark.parametrize("hybrid", [False, True])
def test_the_press_run_for_the_default_has_the_default_settings_as_auto_resolves_them(hybrid):
    from dataclasses import fields

    from evaluation.runner.presses import make_press
    from kvpress_compose import ComposePress
    from kvpress_compose.compression import AUTO, resolved_allocation

    default = ComposePress(compression_ratio=0.75)
    allocation, pooling = resolved_allocation(AUTO, default.score_pooling, hybrid)
    run = make_press(real_study.DEFAULT_AS_RUN[allocation], 0.75)
    expected = {field.name: getattr(default, field.name) for field in fields(ComposePress)}
    expected.update(layer_allocation=allocation, score_pooling=pooling)
    assert {name: getattr(run, name) for name in expected} == expected
