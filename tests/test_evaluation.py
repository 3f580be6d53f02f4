"""The evaluation CLI: data, registry, metrics, fidelity, single runs and sweeps (tiny random model, no downloads)."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from kvpress import AdaKVPress, BasePress, ExpectedAttentionPress, KnormPress, SnapKVPress, ThinKPress
from transformers import LlamaConfig, LlamaForCausalLM

import evaluation.__main__ as cli
from evaluation.metrics.accuracy import (
    average,
    bootstrap_interval,
    string_match_all,
    string_match_part,
    task_scores,
    whole_word_match_all,
)
from evaluation.metrics.fidelity import fidelity
from evaluation.runner import presses
from evaluation.runner.run import RunConfig, evaluate, load_pipeline
from evaluation.studies.report import (
    MEAN_COLUMN,
    accuracy_by_ratio,
    accuracy_figure,
    coinciding,
    human_title,
    plot,
    plot_lines,
)
from evaluation.tasks.dataset_files import load_rows, write_dataset
from evaluation.tasks.word_tasks import BASE_TASKS as TASKS
from evaluation.tasks.word_tasks import DENSE_TASKS, VALUES, build_tokenizer, vocabulary
from kvpress_compose import ComposePress

KVPRESS_COLUMNS = ["context", "question", "answer_prefix", "answer", "max_new_tokens", "task"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny model gains nothing from more, and loses a lot when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model_folder(path: Path) -> Path:
    """A tiny random Llama over the synthetic vocabulary, saved as a Hugging Face model folder at ``path``."""
    config = LlamaConfig(
        vocab_size=len(vocabulary()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random init attends almost uniformly; sharpen it so that presses change outputs
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "synthetic-96", n_contexts=2, n_words=96, seed=0)


# -- data ---------------------------------------------------------------------------------------------------------


def test_rows_have_kvpress_columns_and_every_task(data_dir):
    rows = load_rows(data_dir)
    assert list(rows.columns) == KVPRESS_COLUMNS
    assert set(rows["task"]) == set(TASKS)
    assert (rows.groupby("task")["context"].nunique() == 2).all()
    assert (rows["answer_prefix"] == "").all() and (rows["max_new_tokens"] >= 2).all()
    assert list(load_rows(data_dir, "niah_single")["task"].unique()) == ["niah_single"]


def test_answers_follow_their_key_in_the_context(data_dir):
    for row in load_rows(data_dir).itertuples():
        key = row.question.split()[-1]
        assert isinstance(row.answer, list) and all(isinstance(item, str) for item in row.answer)
        answer = " ".join(row.answer).split()
        # variable tracking: the asked key points to the next key of the chain, which the answer starts with
        follows = answer[:1] if row.task == "variable_tracking" else answer
        assert f"| {key} {' '.join(follows)}" in row.context, row


def test_generation_is_deterministic_by_seed(tmp_path):
    first = load_rows(write_dataset(tmp_path / "a", 2, 96, seed=3))
    again = load_rows(write_dataset(tmp_path / "b", 2, 96, seed=3))
    other = load_rows(write_dataset(tmp_path / "c", 2, 96, seed=4))
    pd.testing.assert_frame_equal(first, again)
    assert not first["context"].equals(other["context"])


@pytest.mark.parametrize("task", DENSE_TASKS)
def test_dense_tasks_spread_distinct_needles_over_the_context_and_ask_four(task, tmp_path):
    n_words = 512
    rows = load_rows(write_dataset(tmp_path / "dense", 3, n_words, seed=5, tasks=(task,)))
    again = load_rows(write_dataset(tmp_path / "again", 3, n_words, seed=5, tasks=(task,)))
    pd.testing.assert_frame_equal(rows, again)
    for context, questions in rows.groupby("context", sort=False):
        words = context.split()
        needles = [words[i + 1 : i + (3 if task == "dense_kv" else 4)] for i, w in enumerate(words) if w == "|"]
        assert len(needles) == n_words // 8  # one needle per 8 words
        keys, values = [n[0] for n in needles], [n[1:] for n in needles]
        assert len(set(keys)) == len(keys)
        for rank in range(len(values[0])):  # first values all different, and so second ones
            assert len({v[rank] for v in values}) == len(values)
            assert all(v[rank] in VALUES for v in values)
        assert len(questions) == 4 and questions["question"].nunique() == 4
        assert max(words.index(n[0]) for n in needles) > n_words // 2  # spread over the whole context
        for row in questions.itertuples():
            key = row.question.split()[-1]
            assert keys.count(key) == 1
            asked = needles[keys.index(key)]
            assert row.answer == asked[1:]  # the value(s) after the key, each an item
            assert row.max_new_tokens == len(asked)  # the answer's words and the end token


def test_multiquery_rows_share_their_context(data_dir):
    rows = load_rows(data_dir, "niah_multiquery")
    questions_per_context = rows.groupby("context")["question"].count()
    assert len(questions_per_context) == 2 and (questions_per_context > 1).all()


def test_loadable_with_datasets(data_dir, tmp_path):
    everything = datasets.load_dataset(str(data_dir), split="test", cache_dir=str(tmp_path))
    pd.testing.assert_frame_equal(everything.to_pandas(), load_rows(data_dir))
    one_task = datasets.load_dataset(str(data_dir), "variable_tracking", split="test", cache_dir=str(tmp_path))
    assert set(one_task["task"]) == {"variable_tracking"}


def test_write_dataset_rejects_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="niah_nope"):
        write_dataset(tmp_path, 1, 96, tasks=("niah_nope",))


# -- registry -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(presses.PRESS_REGISTRY))
def test_every_press_builds(name):
    press = presses.make_press(name, 0.5)
    if name == "no_press":
        assert press is None
    elif name == "think":  # as kvpress's evaluate.py sets it: ThinK's ratio is over key channels
        assert isinstance(press, ThinKPress) and press.key_channel_compression_ratio == 0.5
    else:
        assert isinstance(press, BasePress) and press.compression_ratio == 0.5


def test_kvpress_names_mean_kvpress_presses_with_kvpress_settings():
    expected_attention = presses.make_press("expected_attention", 0.25)
    assert isinstance(expected_attention, AdaKVPress) and isinstance(expected_attention.press, ExpectedAttentionPress)
    assert expected_attention.press.epsilon == 1e-2 and expected_attention.press.compression_ratio == 0.25
    assert presses.make_press("kvzip_plus", 0.5).kvzip_plus_normalization is True
    assert presses.make_press("block_keydiff", 0.5).block_size == 128
    lukv_left_out = presses.LEFT_OUT["lukv"]
    assert "budget curve" in lukv_left_out and "lukv" not in presses.PRESS_REGISTRY
    assert not set(presses.PRESS_REGISTRY) & {name for names in presses.LEFT_OUT for name in names.split(", ")}


@pytest.mark.parametrize(("name", "source", "option", "value"), [
    ("compose_uniform", "replay", "layer_allocation", "uniform"),
    ("compose_shared_positions", "replay", "composite_tokens", False),
    ("compose_unstructured", "replay", "structured", False),
    ("compose_bidirectional_uniform", "bidirectional", "layer_allocation", "uniform"),
    ("compose_bidirectional_shared_positions", "bidirectional", "composite_tokens", False),
    ("compose_bidirectional_unstructured", "bidirectional", "structured", False),
])
def test_ablations_are_registered(name, source, option, value):
    press = presses.make_press(name, 0.5)
    assert (press.query_source, getattr(press, option)) == (source, value)


def test_expected_attention_with_uniform_allocation_is_registered():
    press = presses.make_press("compose_expected_attention_uniform", 0.5)
    assert isinstance(press.scorer, ExpectedAttentionPress) and press.layer_allocation == "uniform"
    assert press.scorer is not presses.make_press("compose_expected_attention_uniform", 0.5).scorer  # built per press


def test_the_defaults_are_the_ones_the_real_model_chose():
    assert (ComposePress().query_source, ComposePress().layer_allocation) == ("replay", "auto")
    compose = presses.make_press("compose", 0.5)
    assert (compose.query_source, compose.layer_allocation) == ("replay", "auto")
    assert presses.make_press("compose_uniform", 0.5).layer_allocation == "uniform"
    # every other variant names its source and allocation: a change of defaults moves only "compose"
    assert presses.make_press("compose_replay", 0.5).layer_allocation == "global"
    assert presses.make_press("compose_bidirectional", 0.5).query_source == "bidirectional"


def test_unknown_press_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown press 'snapkvv'.*compose_replay"):
        presses.make_press("snapkvv", 0.5)


def test_register_with_kvpress_adds_ours_without_overwriting():
    existing = SnapKVPress()
    stand_in = types.ModuleType("evaluate_registry")
    stand_in.PRESS_REGISTRY = {"snapkv": existing, "compose": existing}
    added = presses.register_with_kvpress(stand_in)
    assert added == [name for name in presses.COMPOSE_PRESSES if name != "compose"]
    assert stand_in.PRESS_REGISTRY["compose"] is existing
    for name in added:
        assert stand_in.PRESS_REGISTRY[name].compression_ratio == 0.0
    with pytest.raises(TypeError, match="PRESS_REGISTRY"):
        presses.register_with_kvpress(types.ModuleType("not_a_registry"))


# -- metrics ------------------------------------------------------------------------------------------------------


# (prediction, answer, kvpress's string_match_all, the whole-word variant)
MATCH_CASES = [
    ("v203", "v203", 1.0, 1.0),
    ("the answer is v203 </s>", "v203", 1.0, 1.0),
    ("v2030", "v203", 1.0, 0.0),  # kvpress: a substring counts; whole words: it does not
    ("v011 v203", "v203 v011 v145", 2 / 3, 2 / 3),
    ("K007 k001", "k007 k001 v042", 2 / 3, 2 / 3),  # case-blind both
    ("", "v203", 0.0, 0.0),
    ("v011 v203", ["v203", "v011", "v145"], 2 / 3, 2 / 3),  # kvpress's RULER format: a list of items
    ("v203 tree", ["v203 tree"], 1.0, 1.0),  # an item of two words counts only as that sequence
    ("tree v203", ["v203 tree"], 0.0, 0.0),
    ("v203 trees", ["v203 tree"], 1.0, 0.0),
    ("The special magic number is 1234567.", ["1234567"], 1.0, 1.0),
    ("ABCDE, FGHIJ and (KLMNO)", ["abcde", "fghij", "klmno"], 1.0, 1.0),
    ("is: 1c2f-77ab.", ["1c2f-77ab"], 1.0, 1.0),  # a uuid keeps its hyphens
    ("1c2f-77abc", ["1c2f-77ab"], 1.0, 0.0),
    ("123\n4567", ["1234567"], 1.0, 0.0),  # kvpress removes control characters (a newline) before matching
    ("  1234567\t ", ["1234567"], 1.0, 1.0),
]


@pytest.mark.parametrize("prediction, answer, kvpress, whole_words", MATCH_CASES)
def test_string_match_all_is_kvpress_and_whole_words_stays_beside_it(prediction, answer, kvpress, whole_words):
    assert string_match_all(prediction, answer) == pytest.approx(kvpress)
    assert whole_word_match_all(prediction, answer) == pytest.approx(whole_words)


def ruler_formula(name: str, predictions: list[str], references: list[list[str]]) -> float:
    """RULER's two scores written from their definition: per prediction, the share (all) or any (part) of its
    reference items that occur in it, case-blind, after removing control characters; mean over rows in percent."""
    total = 0.0
    for prediction, reference in zip(predictions, references):
        text = re.sub(r"[\x00-\x1f]", "", prediction.strip()).strip().lower()
        found = [item.lower() in text for item in reference]
        total += sum(found) / len(found) if name == "all" else max(found)
    return round(100 * total / len(predictions), 2)


def test_task_scores_equal_rulers_formulas_on_hand_made_rows():
    rows = [  # (task, prediction, answer)
        ("niah_multiquery", "are 1234567, 7654321 and\n999", ["1234567", "7654321", "9990000", "5555555"]),
        ("niah_multiquery", "none of them", ["1234567", "7654321"]),
        ("niah_single_1", "The special magic number is 12345678.", ["1234567"]),
        ("qa_1", "It was in Paris, France.", ["Paris", "Lyon"]),
        ("qa_1", "Berlin", ["Paris", "Lyon"]),
        ("qa_1", "LYON, of course", ["Paris", "Lyon"]),
    ]
    df = pd.DataFrame(rows, columns=["task", "predicted_answer", "answer"])
    scores = task_scores(df)
    for task, group in df.groupby("task"):
        name = "part" if task.startswith("qa") else "all"
        expected = ruler_formula(name, group["predicted_answer"].tolist(), group["answer"].tolist())
        assert scores[task] == pytest.approx(expected, abs=0.01), task
    assert scores == pytest.approx({"niah_multiquery": 25.0, "niah_single_1": 100.0, "qa_1": 200 / 3}, abs=0.01)
    assert string_match_part("lyon", ["Paris", "Lyon"]) == 1.0 and string_match_all("lyon", ["Paris", "Lyon"]) == 0.5
    with pytest.raises(ValueError, match="empty item"):
        string_match_all("x", ["a", " "])


def test_task_scores_and_average():
    df = pd.DataFrame(
        {
            "task": ["a", "a", "b"],
            "answer": ["v1", "v2 v3", "k1"],
            "predicted_answer": ["v1", "v3", None],
        }
    )
    scores = task_scores(df)
    assert scores == {"a": pytest.approx(75.0), "b": 0.0}
    assert average(scores) == pytest.approx(37.5)


def test_bootstrap_interval_resamples_whole_contexts_within_tasks():
    df = pd.DataFrame({
        "task": ["a", "a", "a", "b", "b"],
        "context": ["c1", "c1", "c2", "c3", "c4"],
        "answer": ["v1", "v2", "v3", "k1", "k2"],
        "predicted_answer": ["v1", "v2", "x", "k1", "k2"],  # a: context c1 right (2 questions), c2 wrong
    })
    assert bootstrap_interval(df.assign(predicted_answer=df["answer"])) == (100.0, 100.0)
    low, high = bootstrap_interval(df, n_resamples=4000)
    # task a is 0% (c2 twice), 2/3 or 100% (c1 twice); b is always 100%: the average spans 50% to 100%
    assert (low, high) == (50.0, 100.0)
    assert low <= average(task_scores(df)) <= high
    assert bootstrap_interval(df, seed=1, n_resamples=50) == bootstrap_interval(df, seed=1, n_resamples=50)


# -- fidelity -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fidelity_inputs(model_dir, data_dir):
    pipe = load_pipeline(str(model_dir))
    row = load_rows(data_dir, "niah_single").iloc[0]
    inputs = pipe.preprocess(row["context"], [row["question"]], "", 10_000)
    answer_ids = pipe.tokenizer.encode(" ".join(row["answer"]), add_special_tokens=False, return_tensors="pt")
    return pipe.model, inputs["context_ids"], inputs["questions_ids"][0], answer_ids


@pytest.mark.parametrize("press", [None, SnapKVPress(compression_ratio=0.0)], ids=["no_press", "ratio_0"])
def test_fidelity_is_exact_without_compression(fidelity_inputs, press):
    result = fidelity(*fidelity_inputs, press=press, n_greedy=6)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.first_divergence is None


def test_fidelity_sees_compression(fidelity_inputs):
    result = fidelity(*fidelity_inputs, press=KnormPress(compression_ratio=0.9), n_greedy=6)
    assert result.kl > 1e-4
    assert result.first_divergence is None or 0 <= result.first_divergence < 6


# -- runs and sweeps ----------------------------------------------------------------------------------------------


def test_cli_sweep_writes_runs_table_and_plot(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["--model", str(model_dir), "--dataset-dir", str(data_dir), "--out", str(out), "--max-contexts", "1",
            "--presses", "no_press", "snapkv", "compose_prefill", "--ratios", "0.5",
            "--fidelity", "--fidelity-rows", "2"]
    cli.main(argv)
    printed = capsys.readouterr().out
    title = next(line for line in printed.splitlines() if line.startswith("# "))
    assert title.endswith(f"· 1 context per task ({len(TASKS)} contexts, 8 questions)")
    model_name = model_dir.name  # a folder outside the checkout: by its own name
    expected = [f"synthetic__synthetic-96__{model_name}__{press}" for press in
                ("no_press__0.00", "snapkv__0.50", "compose_prefill__0.50")]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("sweep__")) == sorted(expected)
    for name in expected:
        run_dir = out / name
        predictions = pd.read_csv(run_dir / "predictions.csv", keep_default_na=False)
        assert list(predictions.columns) == KVPRESS_COLUMNS + ["predicted_answer"]
        assert (predictions.groupby("task")["context"].nunique() == 1).all() and len(predictions) >= len(TASKS)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "ok" and metrics["errors"] == []
        assert set(metrics["scores"]) == set(TASKS)
        assert all(0 <= score <= 100 for score in [*metrics["scores"].values(), metrics["average"]])
        assert metrics["fidelity"]["rows"] == 2 and metrics["fidelity"]["kl"] >= 0 and metrics["seconds"] > 0
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"] == str(model_dir) and config["max_contexts"] == 1 and config["fidelity"] is True
    no_press = json.loads((out / expected[0] / "metrics.json").read_text())
    assert no_press["fidelity"]["kl"] == 0 and no_press["fidelity"]["diverged"] == 0
    memory = {name.split("__")[-2]: json.loads((out / name / "metrics.json").read_text())["memory"]
              for name in expected}
    # read on the caches: 96-word contexts (+ <s>) at ratio 0.5 keep half of the entries, within rounding
    assert memory["no_press"] == 1.0 and memory["snapkv"] == pytest.approx(0.5, abs=0.01)
    assert memory["compose_prefill"] == pytest.approx(0.5, abs=0.01)
    for name in expected:
        metrics = json.loads((out / name / "metrics.json").read_text())
        low, high = metrics["average_ci95"]
        assert 0 <= low <= metrics["average"] <= high <= 100
    sweep_dir = out / f"sweep__synthetic__synthetic-96__{model_name}"
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["press"]) == ["no_press", "snapkv", "compose_prefill"]
    assert {"average", *TASKS, "fidelity_kl"} <= set(summary.columns)
    assert {"ci_low", "ci_high", "memory"} <= set(summary.columns)
    summary_md = (sweep_dir / "summary.md").read_text()
    assert "| press | 0.00 | 0.50 | mean over ratios |" in summary_md and "95% bootstrap intervals" in summary_md
    assert "`mean over ratios`: a press's average accuracy averaged over the compression ratios it ran" in summary_md
    assert summary_md.startswith(f"# {model_name} · synthetic-96 ({len(TASKS)} tasks) · 1 context per task (")
    no_press_row = summary.iloc[0]
    assert f"| no_press | {no_press_row['average']:.4g} [{no_press_row['ci_low']:.4g}, " in summary_md
    assert (sweep_dir / "accuracy_vs_ratio.png").read_bytes().startswith(PNG_MAGIC)
    assert str(sweep_dir / "accuracy_vs_ratio.png") in printed and "## Average accuracy" in printed

    cli.main(argv)  # every run is done: all skipped
    assert capsys.readouterr().out.count("skip ") == 3


def test_a_press_that_only_masks_holds_the_whole_cache(model_dir, data_dir, tmp_path):
    run_dir = evaluate(str(model_dir), "synthetic", data_dir, "adakv_snapkv", 0.5, tmp_path, max_contexts=1)
    assert json.loads((run_dir / "metrics.json").read_text())["memory"] == 1.0


def test_failing_press_is_recorded_not_raised(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    class BrokenPress(KnormPress):
        def score(self, *args, **kwargs):
            raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(presses.PRESS_REGISTRY, "broken", BrokenPress)
    run_dir = evaluate(str(model_dir), "synthetic", data_dir, "broken", 0.5, tmp_path, max_contexts=1)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["errors"] == ["RuntimeError: boom"]
    assert not (run_dir / "predictions.csv").exists() and (run_dir / "config.yaml").exists()
    assert "warning: broken@0.50 failed: RuntimeError: boom" in capsys.readouterr().out


def test_no_press_runs_at_ratio_zero():
    config = RunConfig("org/m", "d/synthetic-96", "no_press", 0.5)
    assert config.results_dir().name == "synthetic__synthetic-96__org--m__no_press__0.00"


def test_cli_errors_name_the_bad_argument(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--model", "m", "--presses", "snapkvv", "--dataset-dir", str(tmp_path)])
    assert "unknown press 'snapkvv'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--model", "m", "--ratios", "1.5", "--dataset-dir", str(tmp_path)])
    assert "compression_ratio must be in [0, 1), got 1.5" in capsys.readouterr().err
    monkeypatch.setattr(cli, "SHIPPED_MODEL", tmp_path / "missing")
    with pytest.raises(SystemExit, match="python -m evaluation.model_zoo.train_model"):
        cli.main(["--model", "shipped"])


def test_main_job_runs_ruler_on_the_real_model_and_word_tasks_on_toy_models(tmp_path, capsys):
    args = cli.build_parser().parse_args([])
    assert args.model == "smollm2-135m" and args.tasks == cli.QUICK_TASKS and args.tokens == 1024
    assert {"no_press", "compose", "kvzip", "snapkv"} <= set(args.presses)
    assert cli.is_toy_model(str(cli.SHIPPED_MODEL)) and not cli.is_toy_model("smollm2-135m")
    assert not cli.is_toy_model(str(tmp_path))
    folder = cli.ruler_data_dir("org/model", 2048, 3, ["niah_multiquery", "niah_single_1"])
    assert folder.name == "ruler-org--model-2048-c3-niah_multiquery+niah_single_1"
    with pytest.raises(SystemExit):
        cli.main(["--tasks", "niah_single_9", "--dataset-dir", str(tmp_path)])
    assert "--tasks: unknown ['niah_single_9']" in capsys.readouterr().err


def test_a_real_models_dataset_dir_gets_rulers_tasks_and_a_word_level_one_is_read(tmp_path, data_dir, monkeypatch):
    written = []

    def fake_ensure(model, folder, n_tokens, n_contexts, tasks):
        written.append((model, folder, n_tokens, n_contexts, tuple(tasks)))
        raise SystemExit("stop")

    monkeypatch.setattr(cli, "ensure_ruler_data", fake_ensure)
    with pytest.raises(SystemExit, match="stop"):  # an empty folder: RULER's tasks are written there
        cli.main(["--model", "org/model", "--dataset-dir", str(tmp_path / "new"), "--tokens", "512"])
    assert written == [("org/model", tmp_path / "new", 512, 2, tuple(cli.QUICK_TASKS))]
    assert not cli.holds_other_tasks(tmp_path / "new") and cli.holds_other_tasks(data_dir)
    cli.main(["data", "--out", str(tmp_path / "words"), "--contexts", "1", "--words", "64", "--tasks",
              "niah_multiquery"])  # a word-level task that shares its name with one of RULER's
    assert cli.holds_other_tasks(tmp_path / "words")


def test_cli_data_subcommand(tmp_path):
    cli.main(["data", "--out", str(tmp_path / "d"), "--contexts", "1", "--words", "64", "--tasks", "niah_single"])
    assert len(load_rows(tmp_path / "d")) == 1


def sweep_table() -> pd.DataFrame:
    return pd.DataFrame({
        "press": ["no_press", "snapkv", "snapkv", "knorm", "knorm", "compose", "compose"],
        "ratio": [0.0, 0.5, 0.75, 0.5, 0.75, 0.5, 0.75],
        "status": ["ok"] * 7,
        "average": [80.0, 60.0, 40.0, 60.0, 40.0, 70.0, 65.0],
    })


def test_mean_over_ratios_weighs_each_measured_ratio_once():
    wide = accuracy_by_ratio(sweep_table())
    assert list(wide.columns) == ["0.00", "0.50", "0.75", MEAN_COLUMN]
    assert wide.loc["snapkv", MEAN_COLUMN] == pytest.approx(50.0)
    assert wide.loc["compose", MEAN_COLUMN] == pytest.approx(67.5)
    assert wide.loc["no_press", MEAN_COLUMN] == pytest.approx(80.0)
    failed = sweep_table().assign(average=[80.0, 60.0, float("nan"), 60.0, 40.0, 70.0, 65.0])
    assert pd.isna(accuracy_by_ratio(failed).loc["snapkv", MEAN_COLUMN])


def test_plot_draws_every_press_with_its_own_style_and_names_equal_curves(tmp_path):
    lines = {line.press: line for line in plot_lines(sweep_table())}
    assert set(lines) == {"no_press", "snapkv", "knorm", "compose"}
    assert lines["no_press"].ratios == [0.0, 0.5, 0.75] and lines["no_press"].accuracies == [80.0] * 3  # flat
    assert lines["snapkv"].ratios == [0.0, 0.5, 0.75] and lines["snapkv"].accuracies == [80.0, 60.0, 40.0]
    assert lines["compose"].accuracies == [80.0, 70.0, 65.0]
    pressed = [lines[press] for press in ("snapkv", "knorm", "compose")]
    assert len({line.marker for line in pressed}) == 3 and len({str(line.linestyle) for line in pressed}) == 3
    offsets = [line.offset for line in pressed]
    assert len(set(offsets)) == 3 and max(map(abs, offsets)) < 0.25 * 0.25  # apart, within a quarter of the gap
    assert lines["no_press"].offset == 0
    assert coinciding(list(lines.values())) == [["snapkv", "knorm"]]  # the same points: named on the plot
    path = plot(sweep_table(), tmp_path / "p.png", "a title")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_the_plot_draws_accuracy_against_memory_held_and_keeps_a_long_title_inside():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    table = sweep_table().assign(memory=lambda t: np.where(t["press"] == "knorm", 1.0, 1 - t["ratio"]))
    title = human_title("smollm2-135m", "ruler-smollm2-135m-1024-c2-niah_multikey_1+niah_multiquery", 2, 2,
                        sample="4 contexts, 10 questions")
    figure = accuracy_figure(table, title)
    renderer = FigureCanvasAgg(figure).get_renderer()
    ratio_axes, memory_axes = figure.axes
    assert ratio_axes.get_xlabel().startswith("compression ratio") and memory_axes.get_xlabel().startswith("cache memory")
    points = {tuple(np.round(xy, 3)) for line in memory_axes.get_lines() for xy in line.get_xydata()}
    assert (0.5, 70.0) in points and (1.0, 60.0) in points  # compose at half the memory; knorm masks: holds it all
    box, frame = figure._suptitle.get_window_extent(renderer), figure.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1  # the whole title is on the figure
    without_memory = accuracy_figure(sweep_table(), title)
    assert len(without_memory.axes) == 1


def test_human_title_names_model_tasks_and_sample():
    title = human_title("/somewhere/smollm2-135m", "ruler-niah", 3, 2)
    assert title == "SmolLM2-135M-Instruct · ruler-niah (3 tasks) · 2 contexts per task"
    assert human_title("smollm2-135m", "ruler-smollm2-135m-2048-eligible", 3, 10, "leaders") == (
        "SmolLM2-135M-Instruct · RULER at 2048 tokens (3 tasks) · 10 contexts per task · leaders")
    assert human_title("smollm2-135m", "ruler-smollm2-135m-1024-c2-niah_multikey_1+niah_multiquery", 2, None) == (
        "SmolLM2-135M-Instruct · RULER at 1024 tokens (2 tasks) · every context")  # the main job's data
    assert human_title("org/model", "d", 5, None, "leaders") == "org/model · d (5 tasks) · every context · leaders"
    assert human_title("org/model", "d", 2, None, sample="4 contexts, 16 questions") == (
        "org/model · d (2 tasks) · 4 contexts, 16 questions")



def test_benchmark_plots_earlier_figures_and_needs_a_plot_path(tmp_path):
    from evaluation.bench import speed as bench_speed

    rows = [{"method": method, "tokens": tokens, "time_vs_prefill": ratio * tokens / 4096, "extra_peak_vs_kv_cache": 0.1}
            for method, ratio in [("plain prefill", 1.0), ("compose[prefill]", 1.3)] for tokens in (4096, 8192)]
    (tmp_path / "bench.json").write_text(json.dumps({"model": "tiny", "device": "CPU", "dtype": "float32", "rows": rows}))
    bench_speed.main(["--from-json", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png")])
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit):
        bench_speed.main(["--from-json", str(tmp_path / "bench.json")])


def test_benchmark_flop_floors_follow_the_model_dimensions():
    from evaluation.bench.speed import MODELS, flop_floors

    eight_b = {n: flop_floors(MODELS["8b-dims"], n) for n in (2048, 8192)}
    # replay skips the last layer's MLP: on the 2-layer preset that is nearly half of its second forward
    assert eight_b[2048]["compose[replay]"] == pytest.approx(1.72, abs=0.01)
    assert eight_b[8192]["compose[replay]"] == pytest.approx(2.05, abs=0.01)
    # with all 32 of Llama-3.1-8B's layers it is 1/32 of one: close to the speed issue's 2.1x at 2k, 2.4x at 8k
    full_depth = dict(MODELS["8b-dims"], num_hidden_layers=32)
    assert flop_floors(full_depth, 2048)["compose[replay]"] == pytest.approx(2.09, abs=0.01)
    assert flop_floors(full_depth, 8192)["compose[replay]"] == pytest.approx(2.38, abs=0.01)
    # attention's share grows with length, and with it every floor
    assert all(eight_b[8192][mode] > eight_b[2048][mode] > 1 for mode in eight_b[2048])
    # local replay saves re-fed pairs once the context is replayed in several chunks
    for floors in (flop_floors(MODELS["tiny"], 8192), eight_b[8192]):
        assert floors["compose[replay_local]"] < floors["compose[replay]"]

def test_benchmark_names_an_unknown_method(capsys):
    from evaluation.bench import speed as bench_speed

    with pytest.raises(SystemExit):
        bench_speed.main(["--methods", "compose[replay]", "replay"])
    assert "--methods: unknown ['replay']" in capsys.readouterr().err


def test_interval_tables_mark_failed_runs():
    from evaluation.studies.report import intervals_by_ratio

    table = pd.DataFrame({"press": ["a", "b"], "ratio": [0.5, 0.5], "status": ["ok", "failed"],
                          "average": [50.0, float("nan")], "ci_low": [40.0, float("nan")],
                          "ci_high": [60.0, float("nan")]})
    assert intervals_by_ratio(table)["0.50"].tolist() == ["50 [40, 60]", "failed"]


def test_ratio_columns_are_in_ratio_order_whatever_order_the_runs_finished_in():
    from evaluation.studies.report import by_ratio, intervals_by_ratio

    table = pd.DataFrame({"press": ["no_press", "a", "a", "a"], "ratio": [0.0, 0.75, 0.9, 0.5],
                          "status": ["ok"] * 4, "average": [80.0, 70.0, 50.0, 75.0], "ci_low": [75.0, 65, 45, 70],
                          "ci_high": [85.0, 75, 55, 80], "memory": [1.0, 0.25, 0.1, 0.5]})
    assert list(intervals_by_ratio(table).columns) == ["0.00", "0.50", "0.75", "0.90"]
    memory = by_ratio(table, "memory")
    assert list(memory.columns) == ["0.00", "0.50", "0.75", "0.90"]
    assert memory.loc["a"].tolist()[1:] == [0.5, 0.25, 0.1] and list(memory.index) == ["no_press", "a"]

    from evaluation.studies.report import curves

    curve = curves(table)["a"]
    assert curve.index.tolist() == [0.0, 0.5, 0.75, 0.9] and curve.tolist() == [80.0, 75.0, 70.0, 50.0]
