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


def cli_error(main, argv, capsys) -> str:
    """The one-line error ``main(argv)`` exits with (never a traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err + (exit_info.value.code if isinstance(exit_info.value.code, str) else "")


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


