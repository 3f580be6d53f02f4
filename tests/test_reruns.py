"""The evaluation never shows stale or mixed results: what a run records, when it reruns, how its files are
written, how bad data and bad output folders are refused, and how result folders are named."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

import evaluation.__main__ as cli
import evaluation.runner.run as run_module
from evaluation.runner import kvpress_evaluate, presses
from evaluation.runner.run import RunConfig, evaluate
from evaluation.studies import core, toy_study
from evaluation.tasks import dataset_files
from evaluation.tasks.dataset_files import load_rows, write_dataset
from evaluation.tasks.word_tasks import TASKS
from tests.test_evaluation import one_thread, tiny_model_folder  # noqa: F401 - one_thread: autouse

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def data_dir(tmp_path):
    return write_dataset(tmp_path / "data" / "synthetic-64", n_contexts=2, n_words=64, seed=0,
                         tasks=("niah_single", "niah_multikey"))


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def run_knorm(model_dir, data_dir, out, **options) -> Path:
    return evaluate(str(model_dir), "synthetic", data_dir, "knorm", 0.5, out, **options)


# -- 11: a run records what produced it, and one whose record differs is rerun -----------------------------------


def test_config_records_the_data_the_press_and_the_versions(model_dir, data_dir, tmp_path):
    record = yaml.safe_load((run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1) /
                             "config.yaml").read_text())
    assert record["max_contexts"] == 1 and record["press_name"] == "knorm"
    assert record["press"] == {"class": "KnormPress", "compression_ratio": "0.5"}
    assert record["data_fingerprint"] == dataset_files.fingerprint(data_dir) and len(record["data_fingerprint"]) == 64
    assert set(record["versions"]) == {"kvpress", "transformers", "torch", "kvpress-compose"}
    again = write_dataset(tmp_path / "again" / "synthetic-64", 2, 64, seed=0, tasks=("niah_single", "niah_multikey"))
    assert dataset_files.fingerprint(again) == record["data_fingerprint"]  # same generator and seed: same bytes


@pytest.mark.parametrize(("option", "first", "second"), [("max_contexts", 1, 2), ("seed", 0, 1),
                                                         ("fidelity", False, True)])
def test_a_run_with_other_options_is_rerun_and_says_which(model_dir, data_dir, tmp_path, capsys, option, first,
                                                          second):
    out = tmp_path / "out"
    run_dir = run_knorm(model_dir, data_dir, out, **{"max_contexts": 1, option: first})
    before = metrics_of(run_dir)
    capsys.readouterr()
    assert run_knorm(model_dir, data_dir, out, **{"max_contexts": 1, option: second}) == run_dir
    printed = capsys.readouterr().out
    assert f"rerun {run_dir}" in printed and f"{option}: {first!r} recorded, now {second!r}" in printed
    after, record = metrics_of(run_dir), yaml.safe_load((run_dir / "config.yaml").read_text())
    assert record[option] == second
    if option == "max_contexts":
        assert (before["contexts"], after["contexts"]) == (2, 4)
    if option == "fidelity":
        assert "fidelity" not in before and after["fidelity"]["rows"] == 2  # one row per task


def test_a_regenerated_dataset_reruns_the_same_one_does_not(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_dir = run_knorm(model_dir, data_dir, out, max_contexts=1)
    write_dataset(data_dir, 2, 64, seed=0, tasks=("niah_single", "niah_multikey"), overwrite=True)  # same bytes
    capsys.readouterr()
    run_knorm(model_dir, data_dir, out, max_contexts=1)
    assert f"skip {run_dir}" in capsys.readouterr().out
    write_dataset(data_dir, 2, 64, seed=7, tasks=("niah_single", "niah_multikey"), overwrite=True)
    run_knorm(model_dir, data_dir, out, max_contexts=1)
    assert "data_fingerprint:" in capsys.readouterr().out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data_fingerprint"] == dataset_files.fingerprint(data_dir)


def test_other_package_versions_warn_but_do_not_rerun(model_dir, data_dir, tmp_path, capsys):
    run_dir = run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1)
    record = yaml.safe_load((run_dir / "config.yaml").read_text())
    record["versions"]["transformers"] = "4.0.0"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    capsys.readouterr()
    run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1)
    printed = capsys.readouterr().out
    assert f"skip {run_dir}" in printed and "transformers 4.0.0" in printed and "warning" in printed


def test_a_record_without_the_new_fields_counts_as_done(model_dir, data_dir, tmp_path, capsys):
    """Runs archived before the record existed (docs/study-4096/runs) carry none of its fields: unknown, kept."""
    run_dir = run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1)
    record = yaml.safe_load((run_dir / "config.yaml").read_text())
    old = {key: value for key, value in record.items() if key not in ("data_fingerprint", "press", "versions")}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old | {"data_dir": "/elsewhere/synthetic-64"}))
    capsys.readouterr()
    run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1)
    assert f"skip {run_dir}" in capsys.readouterr().out


def test_the_archived_4096_study_is_still_done_and_its_report_rebuilds(tmp_path):
    """Every run archived in docs/study-4096 (records without fingerprints, data_dir of another checkout) is
    restored into a fresh results folder as done, but the field's ``compose`` runs, made when ``compose`` meant
    other defaults; and the leaders' table rebuilds as committed."""
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs" / "study-4096", docs)
    plan = core.study_plan("evaluation/models/retrieval-llama-gqa", tmp_path / "data" / "study-4096",
                            tmp_path / "results", contexts=20, field_contexts=4)
    every_run = plan["claims"] + plan["field"]
    for config in every_run:
        core.restore_run(config, docs)
    archived = {path.parent.name + "/" + path.name for path in (docs / "runs").glob("*/*")}
    done = {f"{c.results_dir().parent.name}/{c.results_dir().name}" for c in core.done(every_run)}
    redefined = {name for name in archived if "__compose__" in name}
    assert len(redefined) == 5  # the field's ratios
    assert len(archived) > 200 and done == (archived - redefined) & {
        f"{c.results_dir().parent.name}/{c.results_dir().name}" for c in every_run}
    assert len(done) >= 225
    committed = (REPO / "docs" / "study-4096" / "summary.md").read_text()
    text = core.write_report(plan, docs, None).read_text()
    leaders = text.split("## Leaders")[1].split("##")[0]
    assert leaders in committed and "| kvzip |" in leaders


# -- 12: the data command refuses to overwrite a dataset of other parameters -------------------------------------


def test_data_command_refuses_a_folder_of_other_parameters(tmp_path, capsys):
    out = tmp_path / "d"
    base = ["data", "--out", str(out), "--words", "64", "--tasks", "niah_single", "niah_multikey"]
    cli.main(base + ["--contexts", "1"])
    first = (out / "test-niah_single.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    cli.main(base + ["--contexts", "1"])  # same parameters: left as it is
    assert "exists" in capsys.readouterr().out and (out / "test-niah_single.jsonl").stat().st_mtime_ns == first
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base + ["--contexts", "2"])
    assert exit_info.value.code != 0
    assert "contexts" in capsys.readouterr().err and len(load_rows(out)) == 2
    cli.main(["data", "--out", str(out), "--words", "64", "--tasks", "niah_single", "--contexts", "2",
              "--overwrite"])
    rows = load_rows(out)  # the task left out is gone, not mixed in
    assert set(rows["task"]) == {"niah_single"} and rows["context"].nunique() == 2


def test_the_main_job_says_when_its_data_has_other_parameters(data_dir, tmp_path, capsys):
    assert cli.ensure_data(data_dir, 2, 64) == data_dir
    assert "warning" not in capsys.readouterr().out
    cli.ensure_data(data_dir, 6, 64)
    assert f"warning: {data_dir} holds {{'contexts': 2}}, not --contexts 6" in capsys.readouterr().out
    assert load_rows(data_dir)["context"].nunique() == 4  # left as it was


def test_readme_examples_write_different_folders():
    readme = "\n".join(path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    outs = [line.split("--out ")[1].split()[0] for line in readme.splitlines()
            if "-m evaluation data --out" in line]
    assert outs and "evaluation/data/synthetic-1024" not in outs  # the main job's folder (6 contexts)
    assert "--data_dir synthetic-1024 " not in readme


# -- 13: failed, truncated and half-written runs -----------------------------------------------------------------


@pytest.fixture
def broken_press(monkeypatch):
    from kvpress import KnormPress

    class BrokenPress(KnormPress):
        broken = True  # not a field: fixing it leaves the press's settings (its repr) as they were

        def score(self, *args, **kwargs):
            if self.broken:
                raise RuntimeError("boom")
            return super().score(*args, **kwargs)

    monkeypatch.setitem(presses.PRESS_REGISTRY, "broken", BrokenPress)
    return BrokenPress


def test_retry_failed_reruns_a_failed_run(model_dir, data_dir, tmp_path, broken_press, monkeypatch, capsys):
    out = tmp_path / "out"
    run_dir = evaluate(str(model_dir), "synthetic", data_dir, "broken", 0.5, out, max_contexts=1)
    assert metrics_of(run_dir)["status"] == "failed"
    broken_press.broken = False  # fixed, the record unchanged
    evaluate(str(model_dir), "synthetic", data_dir, "broken", 0.5, out, max_contexts=1)
    assert metrics_of(run_dir)["status"] == "failed"  # the same record: kept, unless asked
    evaluate(str(model_dir), "synthetic", data_dir, "broken", 0.5, out, max_contexts=1, retry_failed=True)
    assert metrics_of(run_dir)["status"] == "ok"
    assert "--retry-failed" in cli.build_parser().format_help()


@pytest.mark.parametrize("content", ["", '{"press": "knorm", "compr'])
def test_an_unreadable_metrics_file_is_rerun_with_a_warning(model_dir, data_dir, tmp_path, capsys, content):
    run_dir = run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1)
    (run_dir / "metrics.json").write_text(content)
    capsys.readouterr()
    run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1)
    assert "warning" in capsys.readouterr().out and metrics_of(run_dir)["status"] == "ok"


def test_a_run_without_config_is_not_done(model_dir, data_dir, tmp_path, capsys):
    run_dir = run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1)
    (run_dir / "config.yaml").unlink()
    capsys.readouterr()
    run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1)
    assert f"rerun {run_dir}" in capsys.readouterr().out and (run_dir / "config.yaml").is_file()


def test_result_files_are_replaced_whole(model_dir, data_dir, tmp_path, monkeypatch):
    """A kill while the files are written leaves no half file and no metrics.json (the run is not done)."""
    def killed(*args):
        raise KeyboardInterrupt

    import evaluation.safe_files

    monkeypatch.setattr(evaluation.safe_files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1)
    run_dirs = list((tmp_path / "out").iterdir())
    assert len(run_dirs) == 1 and sorted(p.name for p in run_dirs[0].iterdir()) == []


# -- 14: bad data and unwritable output folders fail before anything runs ----------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    def load_pipeline(*args, **kwargs):
        raise AssertionError("a model was loaded: a run was started")

    monkeypatch.setattr(run_module, "load_pipeline", load_pipeline)


@pytest.mark.parametrize(("content", "expected"), [
    ("", "empty"),
    ("{not json\n", "not JSON lines"),
    ('{"context": "c", "answer": ["v"], "task": "niah_single"}\n', "missing column(s) ['question'"),
])
def test_a_bad_dataset_is_named_before_any_run(tmp_path, data_dir, no_model, capsys, content, expected):
    bad = dataset_files.task_file(data_dir, "niah_single")
    bad.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", "m", "--dataset-dir", str(data_dir), "--out", str(tmp_path / "out"),
                  "--presses", "knorm", "--ratios", "0.5"])
    assert exit_info.value.code not in (0, None)
    error = capsys.readouterr().err
    assert str(bad) in error and expected in error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_unwritable_output_folder_fails_before_any_run(tmp_path, data_dir, no_model, capsys):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", "m", "--dataset-dir", str(data_dir), "--out", str(tmp_path / "file" / "out"),
                  "--presses", "knorm", "--ratios", "0.5"])
    assert exit_info.value.code not in (0, None)
    assert f"output folder {tmp_path / 'file' / 'out'} (--out): cannot write there" in capsys.readouterr().err


def test_the_study_checks_its_output_folder_before_any_run(tmp_path, no_model, capsys):
    data_dir = write_dataset(tmp_path / "study-64", n_contexts=1, n_words=64, seed=0, tasks=TASKS)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit):
        toy_study.main(["--model", "m", "--data-dir", str(data_dir), "--contexts", "1", "--field-contexts", "1",
                    "--out", str(tmp_path / "file" / "out"), "--docs", str(tmp_path / "docs")])
    assert "cannot write there" in capsys.readouterr().err


# -- 15: our sweep and kvpress's evaluate.py have their own result roots -----------------------------------------


def test_sweep_and_kvpress_evaluate_default_to_their_own_roots(tmp_path, monkeypatch, model_dir):
    from tests.test_kvpress_evaluate import STAND_IN_EVALUATE, STAND_IN_REGISTRY

    assert cli.build_parser().parse_args([]).out == Path("results/sweep")
    assert RunConfig("m", "d", "knorm", 0.5).output_dir == "results/sweep"
    assert kvpress_evaluate.DEFAULT_OUTPUT_DIR == "results/kvpress"
    folder = tmp_path / "kvpress" / "evaluation"
    folder.mkdir(parents=True)
    (folder / "evaluate_registry.py").write_text(STAND_IN_REGISTRY)
    (folder / "evaluate.py").write_text(STAND_IN_EVALUATE)
    for name in ("evaluate", "evaluate_registry"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    write_dataset(tmp_path / "data" / "synthetic-64", n_contexts=1, n_words=64, tasks=("niah_single",))
    monkeypatch.chdir(tmp_path)
    kvpress_evaluate.main(["--kvpress-dir", str(folder.parent), "--data-root", "data", "--", "--dataset",
                           "synthetic", "--data_dir", "synthetic-64", "--model", str(model_dir), "--press_name",
                           "knorm", "--compression_ratio", "0.5"])
    (run_dir,) = (tmp_path / "results" / "kvpress").iterdir()
    assert run_dir.name.startswith("synthetic__synthetic-64__") and (run_dir / "metrics.json").is_file()
    for module in (cli, run_module, kvpress_evaluate):
        assert ("results/kvpress" if module is kvpress_evaluate else "results/sweep") in module.__doc__


# -- 16: result folders are named from the dataset and the model, not from the working directory -----------------


def test_result_folders_do_not_depend_on_the_working_directory(tmp_path, monkeypatch, data_dir):
    shutil.copytree(REPO / "evaluation" / "models" / "retrieval-llama", tmp_path / "copy" / "retrieval-llama",
                    ignore=shutil.ignore_patterns("*.safetensors"))
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    shipped = os.path.relpath(REPO / "evaluation" / "models" / "retrieval-llama")  # ../../..-ish from here
    assert shipped.startswith("..")
    names = {
        RunConfig(shipped, os.path.relpath(data_dir), "knorm", 0.5).setting,
        RunConfig(str(REPO / "evaluation" / "models" / "retrieval-llama"), str(data_dir), "knorm", 0.5).setting,
    }
    assert names == {"synthetic__synthetic-64__evaluation--models--retrieval-llama"}
    monkeypatch.chdir(data_dir)
    outside = os.path.relpath(tmp_path / "copy" / "retrieval-llama")
    assert RunConfig(outside, ".", "knorm", 0.5).setting == "synthetic__synthetic-64__retrieval-llama"
    assert RunConfig("org/model", ".", "knorm", 0.5).setting == "synthetic__synthetic-64__org--model"


def test_a_press_field_added_later_at_its_default_keeps_the_run_and_a_changed_setting_reruns(model_dir, data_dir):
    from evaluation.runner.run import RunConfig, press_differences

    config = RunConfig(str(model_dir), str(data_dir), "compose_replay", 0.5)
    recorded = run_module.press_settings(config)
    assert recorded["class"] == "ComposePress" and recorded["query_source"] == "'replay'"
    assert press_differences(recorded, config) == []
    older = {name: value for name, value in recorded.items() if name != "add_v_norm"}  # made before the field
    assert press_differences(older, config) == []
    assert press_differences(older | {"query_source": "'bidirectional'"}, config) == [
        "press.query_source: 'bidirectional' recorded, now 'replay'"]

    assert press_differences(recorded | {"add_v_norm": "True"}, config) == [
        "press.add_v_norm: True recorded, now False"]


def test_a_compose_run_recorded_before_press_records_is_stale_since_its_defaults_changed(tmp_path):
    from evaluation.runner.run import RunConfig, record_differences

    old_record = {"max_contexts": 4, "seed": 0}  # the 4096 study's archive: no press recorded
    compose = RunConfig("m", str(tmp_path), "compose", 0.75, max_contexts=4)
    assert record_differences(old_record, compose)[0].startswith("press: not recorded, and 'compose' is")
    assert record_differences(old_record, RunConfig("m", str(tmp_path), "compose_replay", 0.75, max_contexts=4)) == []


def test_archiving_a_failed_rerun_drops_the_answers_of_the_run_before(model_dir, data_dir, tmp_path):
    from evaluation.studies.core import archive_run

    run_dir = run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    from evaluation.runner.run import RunConfig

    run_config = RunConfig(str(model_dir), str(data_dir), "knorm", 0.5, output_dir=str(tmp_path / "out"),
                           max_contexts=config["max_contexts"])
    docs = tmp_path / "docs"
    archive_run(run_config, docs)
    target = next(docs.rglob("predictions.csv")).parent
    (run_dir / "predictions.csv").unlink()  # the rerun failed: no answers
    metrics = json.loads((run_dir / "metrics.json").read_text()) | {"status": "failed"}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    archive_run(run_config, docs)
    assert not (target / "predictions.csv").exists()
    assert json.loads((target / "metrics.json").read_text())["status"] == "failed"


def test_result_files_written_whole_are_as_readable_as_any_other(tmp_path):
    from evaluation.safe_files import write_atomic

    write_atomic(tmp_path / "metrics.json", "{}")
    (tmp_path / "plain.json").write_text("{}")
    assert (tmp_path / "metrics.json").stat().st_mode == (tmp_path / "plain.json").stat().st_mode  # not 0600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
