"""The trainer's batches: every loss target is the next token, and the answer follows the asked key."""

import json
import random
from pathlib import Path

import pytest
import torch

from evaluation.model_zoo.train_model import (
    build_model,
    encode_recall,
    encode_sample,
    learning_rate,
    make_batch,
    reproduction_arguments,
)
from evaluation.tasks.word_tasks import TASKS, make_sample, vocabulary

TOKEN_IDS = {token: i for i, token in enumerate(vocabulary())}
WORDS = vocabulary()


@pytest.mark.parametrize("task", TASKS)
def test_answer_targets_sit_on_the_key_and_are_the_next_tokens(task):
    sample = make_sample(task, 80, random.Random(4))
    ids, targets = encode_sample(sample, TOKEN_IDS)
    assert len(ids) == len(targets)
    for position, target in enumerate(targets):
        if target != -100:
            assert target == ids[position + 1]
    # the first answer token is predicted at the asked key (the last question token), never at "?"
    first_answer = [WORDS[ids[p]] for p, t in enumerate(targets) if t != -100 and WORDS[ids[p]].startswith("k")]
    asked = [question.split()[-1] for question in sample.questions]
    assert first_answer[: len(asked)] == asked if task != "variable_tracking" else first_answer[0] == asked[0]
    assert all(WORDS[ids[p]] != "?" for p, t in enumerate(targets) if t != -100)


def test_recall_rows_target_the_next_token_inside_repeated_spans():
    ids, targets = encode_recall(64, random.Random(2), TOKEN_IDS)
    assert len(ids) == len(targets)
    supervised = [p for p, t in enumerate(targets) if t != -100]
    assert len(supervised) > 10
    assert all(targets[p] == ids[p + 1] for p in supervised)


def test_a_training_step_runs_and_the_model_matches_the_tokenizer():
    model = build_model("qwen3", seed=0)
    input_ids, targets = make_batch(64, 2, random.Random(0), TOKEN_IDS)
    logits = model(input_ids=input_ids).logits
    assert logits.shape == (*input_ids.shape, len(WORDS))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    assert torch.isfinite(loss)


def test_learning_rate_warms_up_decays_to_a_tenth_and_halves_for_long_contexts():
    assert learning_rate(0, 1000, 1.0, 128) == 1 / 200
    assert learning_rate(200, 1000, 1.0, 1024) == 1.0
    assert learning_rate(1000, 1000, 1.0, 1024) == pytest.approx(0.1)
    assert learning_rate(600, 1000, 1.0, 2048) == learning_rate(600, 1000, 1.0, 1024) / 2


def test_training_stops_where_asked_and_resuming_reproduces_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from evaluation.model_zoo.train_model import main

    def run(name, stop_after):
        main(["--out", str(tmp_path / name), "--checkpoint-dir", str(tmp_path / f"{name}-checkpoints"),
              "--stop-after", str(stop_after), "--max-steps", "10", "--log-every", "1", "--eval-every", "1000"])
        return load_file(tmp_path / name / "model.safetensors")

    run("resumed", 1)
    resumed = run("resumed", 2)
    uninterrupted = run("uninterrupted", 2)
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)
    assert json.loads((tmp_path / "resumed-checkpoints" / "log.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_saved_model_folder_loads_with_auto_classes_on_either_transformers_major(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.model_zoo.train_model import save_final

    save_final(build_model("llama", seed=0), tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.57 cannot load 5.x's TokenizersBackend
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer("k001 v002").input_ids == [TOKEN_IDS["k001"], TOKEN_IDS["v002"]]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.vocab_size == len(WORDS)
    # the trained RoPE base on either major (4.57 reads only a top-level rope_theta, else uses 10000)
    head_dim = loaded.config.head_dim
    expected = 1.0 / 100000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, expected)


def test_rope_base_written_where_transformers_4_reads_it(tmp_path):
    """5.x saves the RoPE base only in ``rope_parameters``; 4.57 reads ``rope_theta`` and would fall back to
    10000. The shipped model, saved by 5.x, keeps its base on the running version."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from evaluation.model_zoo.train_model import portable_rope_theta

    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}))
    portable_rope_theta(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["rope_theta"] == 5e5

    shipped = Path(__file__).parents[1] / "evaluation" / "models" / "retrieval-llama"
    config = AutoConfig.from_pretrained(shipped)
    model = AutoModelForCausalLM.from_config(config)
    expected = 1.0 / 100000.0 ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)


def test_the_model_card_reproduction_command_keeps_what_shapes_the_model():
    argv = ["--out", "evaluation/models/x", "--heads", "4", "--checkpoint-dir", "/tmp/c", "--threads=2",
            "--until-trained", "--tasks", "dense_kv", "niah_single", "--stop-after", "300"]
    assert reproduction_arguments(argv) == "--out evaluation/models/x --heads 4 --tasks dense_kv niah_single "
    assert reproduction_arguments([]) == ""


def test_training_batches_draw_only_the_given_tasks():
    token_ids = {word: i for i, word in enumerate(vocabulary())}
    rng = random.Random(0)
    input_ids, _ = make_batch(128, 64, rng, token_ids, tasks=("dense_multivalue",))
    rows_with_questions = [row for row in input_ids.tolist() if token_ids["?"] in row]
    assert rows_with_questions  # the rest are recall rows
    # dense_multivalue asks four questions per context; no base task asks four
    assert all(row.count(token_ids["?"]) == 4 for row in rows_with_questions)


def test_until_trained_stops_at_the_first_evaluation_passing_every_task_at_the_last_length(tmp_path, monkeypatch):
    from evaluation.model_zoo import train_model

    monkeypatch.setattr(train_model, "CURRICULUM", [64])  # one stage: it is the last
    scores = iter([0.5, 1.0, 1.0])  # the first evaluation fails one task, the second passes all
    monkeypatch.setattr(train_model, "answer_accuracy",
                        lambda *args: {"niah_single": next(scores), "niah_multikey": 1.0})
    out, checkpoints = tmp_path / "model", tmp_path / "checkpoints"
    train_model.main(["--out", str(out), "--checkpoint-dir", str(checkpoints), "--max-steps", "10",
                      "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "100", "--until-trained"])
    log = [json.loads(line) for line in (checkpoints / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3, 4] and log[-1]["trained"] is True
    assert "trained" not in log[1]  # step 2: a task under 95%
    card = (out / "README.md").read_text()
    assert "Trained: every task reached 95% at 64 words at step 4." in card
    assert "--until-trained" not in card and "--stop-after 4" in card
    assert torch.load(checkpoints / "last.pt", weights_only=False)["state"]["step"] == 4
