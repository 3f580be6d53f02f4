"""Faults found by the third reliability round (issue 31), evaluation side: items 6-12 and 14's two processes on
one run folder. Each test failed before its fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import evaluation.__main__ as cli
import evaluation.runner.run as run_module
from evaluation.model_zoo import train_model
from evaluation.runner import kvpress_evaluate
from evaluation.runner.run import RunConfig, evaluate
from evaluation.runner.sweep import plan, run_sweep
from evaluation.studies import core
from evaluation.tasks import dataset_files
from evaluation.tasks.dataset_files import write_dataset
from tests.test_evaluation import one_thread, tiny_model_folder  # noqa: F401 - one_thread: autouse

TASKS = ("niah_single", "niah_multikey")
REAL_LOAD_PIPELINE = run_module.load_pipeline  # before any fixture patches it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def data_dir(tmp_path):
    return write_dataset(tmp_path / "data" / "synthetic-64", n_contexts=2, n_words=64, seed=0, tasks=TASKS)


@pytest.fixture
def no_model(monkeypatch):
    def load_pipeline(*args, **kwargs):
        raise AssertionError("a model was loaded: a run was started")

    monkeypatch.setattr(run_module, "load_pipeline", load_pipeline)


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def run_knorm(model_dir, data_dir, out, **options) -> Path:
    return evaluate(str(model_dir), "synthetic", data_dir, "knorm", 0.5, out, **options)


def run_knorm_loaded(model, data_dir, out) -> Path:
    """:func:`run_knorm` with the real pipeline loader, whatever ``no_model`` patched."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "load_pipeline", REAL_LOAD_PIPELINE)
        return run_knorm(model, data_dir, out, max_contexts=1)


def cli_error(main, argv, capsys) -> str:
    """The one-line error ``main(argv)`` exits with (never a traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err + (exit_info.value.code if isinstance(exit_info.value.code, str) else "")


# 6: two ratios that round to the same two decimals ------------------------------------------------------------


def test_two_ratios_that_round_alike_get_their_own_folders_and_summary_columns(model_dir, data_dir, tmp_path):
    configs = plan(str(model_dir), ["knorm"], [0.5, 0.501], data_dir, output_dir=tmp_path / "out", max_contexts=1)
    run_module.preflight(configs)  # as the main job does, before its sweep
    outputs = run_sweep(configs)
    assert [run.name.rsplit("__", 1)[1] for run in outputs.runs] == ["0.50", "0.501"]
    assert [metrics_of(run)["compression_ratio"] for run in outputs.runs] == [0.5, 0.501]
    assert pd.read_csv(outputs.summary_csv)["ratio"].tolist() == [0.5, 0.501]
    text = outputs.summary_md.read_text()
    assert text.count("| press | 0.50 | 0.501 |") == 3  # accuracy, intervals, memory: a column per ratio
    assert "| knorm | 0.50 | ok |" in text and "| knorm | 0.501 | ok |" in text  # the runs' table


# 7: two models (or datasets) whose folders share a name ---------------------------------------------------------


def test_a_second_model_whose_folder_shares_the_first_ones_name_is_refused_not_skipped(model_dir, data_dir, tmp_path,
                                                                                        capsys, no_model):
    first, second = tmp_path / "ckpt-1" / "model", tmp_path / "ckpt-2" / "model"
    shutil.copytree(model_dir, first)
    shutil.copytree(model_dir, second)
    out = tmp_path / "out"
    run_dir = run_knorm_loaded(first, data_dir, out)
    before = (run_dir / "metrics.json").read_bytes(), (run_dir / "config.yaml").read_bytes()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model_location"] == str(first.resolve())
    with pytest.raises(ValueError, match=rf"holds a run of the model {first.resolve()}, not {second.resolve()}"):
        run_knorm(second, data_dir, out)
    error = cli_error(cli.main, ["--model", str(second), "--dataset-dir", str(data_dir), "--out", str(out),
                                 "--presses", "knorm", "--ratios", "0.5", "--max-contexts", "1"], capsys)
    assert str(first.resolve()) in error and "--out" in error
    assert ((run_dir / "metrics.json").read_bytes(), (run_dir / "config.yaml").read_bytes()) == before


def test_a_dataset_of_other_bytes_whose_folder_shares_the_name_is_refused_and_one_of_the_same_bytes_is_done(
        model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_dir = run_knorm(model_dir, data_dir, out, max_contexts=1)
    other = write_dataset(tmp_path / "elsewhere" / "synthetic-64", 2, 64, seed=7, tasks=TASKS)
    with pytest.raises(ValueError, match=rf"holds a run of the dataset {data_dir.resolve()}, not {other.resolve()}"):
        run_knorm(model_dir, other, out, max_contexts=1)
    same = write_dataset(tmp_path / "copy" / "synthetic-64", 2, 64, seed=0, tasks=TASKS)  # the same bytes
    capsys.readouterr()
    assert run_knorm(model_dir, same, out, max_contexts=1) == run_dir
    assert f"skip {run_dir}" in capsys.readouterr().out


# 8: a run whose predictions are gone -------------------------------------------------------------------------


def test_a_run_whose_predictions_were_deleted_is_run_again(model_dir, data_dir, tmp_path, capsys):
    run_dir = run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1)
    answers = pd.read_csv(run_dir / "predictions.csv")
    (run_dir / "predictions.csv").unlink()
    capsys.readouterr()
    run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1)
    assert f"rerun {run_dir}: no predictions.csv" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "predictions.csv"), answers)


def test_a_run_restored_from_the_archive_keeps_its_predictions_and_stays_done(model_dir, data_dir, tmp_path, no_model):
    config = RunConfig(str(model_dir), str(data_dir), "knorm", 0.5, output_dir=str(tmp_path / "out"), max_contexts=1)
    run_knorm_loaded(model_dir, data_dir, tmp_path / "out")
    core.archive_run(config, tmp_path / "docs")
    shutil.rmtree(config.results_dir())
    core.restore_run(config, tmp_path / "docs")
    assert (config.results_dir() / "predictions.csv").is_file() and core.done([config]) == [config]


# 9: links and folders outside the output folder -----------------------------------------------------------------


def test_archiving_a_run_never_writes_through_a_linked_file(model_dir, data_dir, tmp_path):
    config = RunConfig(str(model_dir), str(data_dir), "knorm", 0.5, output_dir=str(tmp_path / "out"), max_contexts=1)
    run_module.run(config)
    docs, outside = tmp_path / "docs", tmp_path / "outside"
    target = core.archived(config, docs)
    target.mkdir(parents=True)
    outside.mkdir()
    for name in ("config.yaml", "predictions.csv", "metrics.json"):
        (outside / name).write_text("precious")
        (target / name).symlink_to(outside / name)
    core.archive_run(config, docs)
    for name in ("config.yaml", "predictions.csv", "metrics.json"):
        assert (outside / name).read_text() == "precious" and not (target / name).is_symlink()
    assert (target / "config.yaml").read_bytes() == (config.results_dir() / "config.yaml").read_bytes()
    assert len(pd.read_csv(target / "predictions.csv")) == len(pd.read_csv(config.results_dir() / "predictions.csv"))


def test_archiving_into_a_linked_folder_that_leads_outside_the_docs_is_refused(model_dir, data_dir, tmp_path):
    config = RunConfig(str(model_dir), str(data_dir), "knorm", 0.5, output_dir=str(tmp_path / "out"), max_contexts=1)
    run_module.run(config)
    docs, outside = tmp_path / "docs", tmp_path / "outside"
    outside.mkdir()
    tier = core.archived(config, docs).parent
    tier.parent.mkdir(parents=True)
    tier.symlink_to(outside, target_is_directory=True)
    with pytest.raises(OSError, match="outside"):
        core.archive_run(config, docs)
    assert [path.name for path in outside.rglob("*") if path.is_file()] == []


def test_a_dataset_card_and_task_file_that_are_links_are_replaced_not_written_through(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    for name in ("README.md", "test-niah_single.jsonl"):
        (tmp_path / f"precious-{name}").write_text("precious")
        (out / name).symlink_to(tmp_path / f"precious-{name}")
    write_dataset(out, 1, 64, seed=0, tasks=("niah_single",), overwrite=True)
    for name in ("README.md", "test-niah_single.jsonl"):
        assert (tmp_path / f"precious-{name}").read_text() == "precious" and not (out / name).is_symlink()
    assert dataset_files.recorded_parameters(out)["contexts"] == 1 and len(dataset_files.load_rows(out)) == 1


@pytest.mark.parametrize("dataset", ["../escaped", "/tmp/anywhere", "a/b", "..", ""])
def test_a_dataset_name_that_would_leave_the_output_folder_is_refused_by_name(tmp_path, data_dir, no_model, capsys,
                                                                               dataset):
    out = tmp_path / "out"
    error = cli_error(run_module.main, ["--model", "m", "--data-dir", str(data_dir), "--press", "knorm", "--ratio",
                                        "0.5", "--dataset", dataset, "--out", str(out)], capsys)
    assert "--dataset" in error and repr(dataset) in error
    assert not out.exists() and not list(tmp_path.glob("escaped*")) and not list(Path("/tmp").glob("anywhere__*"))


# 10: a crafted training checkpoint -------------------------------------------------------------------------------


def test_a_crafted_training_checkpoint_runs_no_code_when_training_resumes(tmp_path):
    marker = tmp_path / "code-ran"

    class Crafted:
        def __reduce__(self):
            return open, (str(marker), "w")  # would create the marker when unpickled

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save({"model": {}, "optimizer": {}, "state": {"step": 0, "stage": 0, "best": {}}, "extra": Crafted()},
               checkpoints / "last.pt")
    with pytest.raises(SystemExit, match=rf"checkpoint {checkpoints / 'last.pt'} holds more than tensors"):
        train_model.main(["--out", str(tmp_path / "model"), "--checkpoint-dir", str(checkpoints), "--max-steps", "1"])
    assert not marker.exists() and not (tmp_path / "model").exists()


# 11: dataset rows checked before any run ------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("answer", "v1", "answer must be a non-empty list of texts"),
    ("answer", [], "answer must be a non-empty list of texts"),
    ("max_new_tokens", "8", "max_new_tokens must be an int >= 1"),
    ("max_new_tokens", 2.5, "max_new_tokens must be an int >= 1"),
    ("max_new_tokens", 0, "max_new_tokens must be an int >= 1"),
    ("context", None, "context must be a non-empty text"),
    ("question", None, "question must be a text"),
])
def test_a_bad_dataset_row_is_named_with_its_file_row_and_field_before_any_run(tmp_path, data_dir, no_model, capsys,
                                                                                field, value, expected):
    path = dataset_files.task_file(data_dir, "niah_single")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1][field] = value
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    error = cli_error(cli.main, ["--model", "m", "--dataset-dir", str(data_dir), "--out", str(tmp_path / "out"),
                                 "--presses", "knorm", "--ratios", "0.5"], capsys)
    assert f"dataset file {path}, row 2: {expected}" in error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# 12: clear errors at the door -------------------------------------------------------------------------------------


def test_a_dataset_dir_that_is_a_file_is_named(tmp_path, no_model, capsys):
    (tmp_path / "file").write_text("not a folder")
    error = cli_error(cli.main, ["--model", "m", "--dataset-dir", str(tmp_path / "file"), "--out",
                                 str(tmp_path / "out")], capsys)
    assert f"--dataset-dir {tmp_path / 'file'}: a file, not a folder" in error


@pytest.mark.parametrize(("option", "value"), [("--contexts", "-1"), ("--words", "0")])
def test_the_data_command_names_a_count_below_one(tmp_path, capsys, option, value):
    error = cli_error(cli.main, ["data", "--out", str(tmp_path / "d"), option, value], capsys)
    assert f"({option}) must be an int >= 1, got {value}" in error and not (tmp_path / "d").exists()


def test_the_data_command_bounds_what_it_writes_and_says_what_it_would_cost(tmp_path, capsys):
    error = cli_error(cli.main, ["data", "--out", str(tmp_path / "d"), "--contexts", "100000000"], capsys)
    assert "--contexts 100000000 x --words 1024 x 5 tasks" in error and "GB" in error
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("model", ["/nonexistent", "./no/such/model", "~/no-such-model-here"])
def test_a_model_path_that_is_not_there_is_named(tmp_path, no_model, capsys, model):
    error = cli_error(cli.main, ["--model", model, "--out", str(tmp_path / "out")], capsys)
    assert f"--model {model}: no such folder" in error
    error = cli_error(run_module.main, ["--model", model, "--data-dir", str(tmp_path), "--press", "knorm", "--ratio",
                                        "0.5", "--out", str(tmp_path / "out")], capsys)
    assert f"--model {model}: no such folder" in error


def test_a_kvpress_dir_that_is_not_there_is_named(tmp_path, capsys):
    error = cli_error(kvpress_evaluate.main, ["--kvpress-dir", str(tmp_path / "nonexistent"), "--", "--dataset", "x"],
                      capsys)
    assert f"--kvpress-dir {tmp_path / 'nonexistent'}: no evaluate.py" in error


# 14: two processes on one run folder ------------------------------------------------------------------------------

HOLDER = """
import fcntl, os, shutil, sys, time
lock, backup, run_dir = sys.argv[1:]
handle = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o644)
fcntl.flock(handle, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(1.5)
for name in os.listdir(backup):  # the run this process was computing is done: its files are there
    shutil.copyfile(os.path.join(backup, name), os.path.join(run_dir, name))
os.unlink(lock)
"""


def test_a_second_process_on_a_run_folder_waits_for_the_first_and_computes_nothing(model_dir, data_dir, tmp_path,
                                                                                      capsys, no_model):
    pytest.importorskip("fcntl")
    run_dir = run_knorm_loaded(model_dir, data_dir, tmp_path / "out")
    finished = metrics_of(run_dir)
    backup = tmp_path / "backup"
    shutil.move(run_dir, backup)
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir / ".lock"), str(backup), str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert run_knorm(model_dir, data_dir, tmp_path / "out", max_contexts=1) == run_dir  # no model loaded
        printed = capsys.readouterr().out
    finally:
        holder.wait(30)
    assert f"waiting: another process is running {run_dir}" in printed and f"skip {run_dir}" in printed
    assert metrics_of(run_dir) == finished and not (run_dir / ".lock").exists()
