"""kvpress's own evaluation through ``python -m evaluation.runner.kvpress_evaluate``, against a stand-in checkout.

The stand-in's ``evaluate.py`` is written here in the shape of kvpress's (``CliEntryPoint`` under Fire, its
registries imported from ``evaluate_registry``, ``load_dataset(registry[dataset], data_dir=..., split="test")``,
``press.compression_ratio`` assigned, kvpress's pipeline per context, kvpress's output folder); the real one was
run once by hand (README, "kvpress's own evaluation").
"""

import json
import re
import sys
import zipfile
from pathlib import Path

import pytest

from evaluation.runner import kvpress_evaluate
from evaluation.tasks.dataset_files import load_rows, write_dataset

STAND_IN_REGISTRY = '''
from kvpress import KnormPress

def ruler_scorer(df):
    return {task: {"string_match": 100.0 * sum(all(a.lower() in p.lower() for a in ans) for ans, p in
                   zip(rows["answer"], rows["predicted_answer"])) / len(rows)} for task, rows in df.groupby("task")}

DATASET_REGISTRY = {"ruler": "simonjegou/ruler"}
SCORER_REGISTRY = {"ruler": ruler_scorer}
PRESS_REGISTRY = {"knorm": KnormPress(), "compose": KnormPress()}
'''

STAND_IN_EVALUATE = '''
import json
from pathlib import Path

import yaml
from datasets import load_dataset
from evaluate_registry import DATASET_REGISTRY, PRESS_REGISTRY, SCORER_REGISTRY
from transformers import pipeline


class CliEntryPoint:
    def __call__(self, dataset="ruler", data_dir=None, model="m", press_name="knorm", compression_ratio=1.0,
                 output_dir="./results", fraction=1.0, device=None):
        press = PRESS_REGISTRY[press_name]
        press.compression_ratio = compression_ratio
        df = load_dataset(DATASET_REGISTRY[dataset], data_dir=str(data_dir), split="test").to_pandas()
        pipe = pipeline("kv-press-text-generation", model=model, device="cpu")
        df["predicted_answer"] = None
        for context, group in df.groupby("context"):
            out = pipe(context, questions=group["question"].tolist(), press=press,
                       max_new_tokens=int(group["max_new_tokens"].max()))
            df.loc[group.index, "predicted_answer"] = out["answers"]
        name = f"{dataset}__{data_dir}__{model.replace('/', '--')}__{press_name}__{compression_ratio:.2f}"
        results = Path(output_dir) / name
        results.mkdir(parents=True)
        df.to_csv(results / "predictions.csv", index=False)
        (results / "metrics.json").write_text(json.dumps(SCORER_REGISTRY[dataset](df)))
        (results / "config.yaml").write_text(yaml.safe_dump({"press_name": press_name, "press": str(press)}))
'''


@pytest.fixture
def kvpress_checkout(tmp_path, monkeypatch):
    folder = tmp_path / "kvpress" / "evaluation"
    folder.mkdir(parents=True)
    (folder / "evaluate_registry.py").write_text(STAND_IN_REGISTRY)
    (folder / "evaluate.py").write_text(STAND_IN_EVALUATE)
    for name in ("evaluate", "evaluate_registry"):  # each test imports its own stand-in
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return folder.parent


@pytest.mark.parametrize("press_name", ["compose_replay", "knorm"])
def test_kvpress_evaluate_runs_our_press_and_theirs_on_local_data(kvpress_checkout, tmp_path, press_name):
    from tests.test_evaluation import tiny_model_folder

    model = tiny_model_folder(tmp_path / "model")
    write_dataset(tmp_path / "data" / "synthetic-64", n_contexts=1, n_words=64, tasks=("niah_single", "dense_kv"))
    out = tmp_path / "results"
    kvpress_evaluate.main(["--kvpress-dir", str(kvpress_checkout), "--data-root", str(tmp_path / "data"), "--",
                           "--dataset", "synthetic", "--data_dir", "synthetic-64", "--model", str(model),
                           "--press_name", press_name, "--compression_ratio", "0.5", "--output_dir", str(out)])
    run = out / f"synthetic__synthetic-64__{str(model).replace('/', '--')}__{press_name}__0.50"
    assert set(json.loads((run / "metrics.json").read_text())) == {"niah_single", "dense_kv"}
    predictions = (run / "predictions.csv").read_text().splitlines()
    assert len(load_rows(tmp_path / "data" / "synthetic-64")) == len(predictions) - 1
    registry = sys.modules["evaluate_registry"]
    assert type(registry.PRESS_REGISTRY["compose"]).__name__ == "KnormPress"  # kvpress's names are kept
    assert registry.PRESS_REGISTRY["compose_replay"].compression_ratio == (0.5 if press_name == "compose_replay" else 0)


def test_a_folder_that_is_not_a_kvpress_checkout_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):  # one line naming the argument, not a traceback (issue 31, item 12)
        kvpress_evaluate.main(["--kvpress-dir", str(tmp_path), "--", "--press_name", "knorm"])
    assert re.search(r"--kvpress-dir .*no evaluate.py, evaluate_registry.py", capsys.readouterr().err)


def test_local_data_may_not_take_a_kvpress_dataset_name(kvpress_checkout, tmp_path):
    with pytest.raises(ValueError, match="'ruler' is one of kvpress's own datasets"):
        kvpress_evaluate.main(["--kvpress-dir", str(kvpress_checkout), "--dataset-name", "ruler", "--"])


def test_the_distribution_installs_only_kvpress_compose(tmp_path):
    import subprocess

    root = Path(__file__).parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("kvpress_compose-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"kvpress_compose", wheel.name.rsplit("-", 3)[0] + ".dist-info"}
    assert "kvpress_compose/evaluation/__main__.py" in names
    for module in ("runner/run.py", "tasks/ruler.py", "metrics/accuracy.py", "studies/real_study.py",
                   "model_zoo/real_models.py", "bench/speed.py"):  # every subpackage is installed
        assert f"kvpress_compose/evaluation/{module}" in names
    assert "kvpress_compose/evaluation/models/retrieval-llama/model.safetensors" in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "kvpress-compose-eval = kvpress_compose.evaluation.__main__:main" in zipfile.ZipFile(wheel).read(
        entry_points).decode()
