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
import evaluation.run as run_module
from evaluation import data, kvpress_evaluate, study, train_model
from evaluation.data import write_dataset
from evaluation.run import RunConfig, evaluate
from evaluation.sweep import sweep
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
    outputs = sweep(str(model_dir), ["knorm"], [0.5, 0.501], data_dir, output_dir=tmp_path / "out", max_contexts=1)
    assert [run.name.rsplit("__", 1)[1] for run in outputs.runs] == ["0.50", "0.501"]
    assert [metrics_of(run)["compression_ratio"] for run in outputs.runs] == [0.5, 0.501]
    assert pd.read_csv(outputs.summary_csv)["ratio"].tolist() == [0.5, 0.501]
    text = outputs.summary_md.read_text()
    assert text.count("| press | 0.50 | 0.501 |") == 3  # accuracy, intervals, memory: a column per ratio
    assert "| knorm | 0.50 | ok |" in text and "| knorm | 0.501 | ok |" in text  # the runs' table


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
    study.archive_run(config, tmp_path / "docs")
    shutil.rmtree(config.results_dir())
    study.restore_run(config, tmp_path / "docs")
    assert (config.results_dir() / "predictions.csv").is_file() and study.done([config]) == [config]


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
    path = data.task_file(data_dir, "niah_single")
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


