"""Train the small long-context retrieval model that the evaluation ships (deterministic, seeded, resumable).

    nohup python -m evaluation.model_zoo.train_model > train.log &      # writes evaluation/models/retrieval-llama

A Llama-architecture causal LM (4 layers, hidden 128, GQA with 2 query heads of 64 dims over 1 KV head, RoPE,
attention biases) -- or with ``--arch qwen3`` the Qwen3 layout (q_norm/k_norm) -- is trained from scratch on
the tasks of :mod:`evaluation.tasks.word_tasks`. A task sequence is ``<s> context ? key answer </s> ...``
(several questions per context), with the loss on answer tokens; half of the rows are an auxiliary span-recall
text (random words whose earlier spans reappear) with the loss on every recalled word, which is what makes
the model form the induction heads retrieval needs. Context length follows a curriculum (128 to 4096 words,
from 2048 on at half the learning rate) that moves to the next length once every task is answered at 95%.
Checkpoints are written every ``--checkpoint-every`` steps to ``evaluation/checkpoints/<arch>`` and the run
resumes from the newest one; the model folder (config, safetensors, tokenizer, and a README stating how far
training got) is refreshed at each checkpoint. The defaults reproduce the shipped model exactly (one thread:
float results depend on the thread count).
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from ..tasks.word_tasks import (
    BASE_TASKS,
    FILLER_WORDS,
    KEYS,
    TASKS,
    VALUES,
    build_tokenizer,
    make_sample,
    vocabulary,
)

RECALL_WORDS = FILLER_WORDS + KEYS + VALUES

CURRICULUM = (128, 256, 512, 1024, 2048, 4096)  # context lengths in words (= tokens)
TOKENS_PER_STEP = 8192
RECALL_FRACTION = 0.5
EVAL_SAMPLES_PER_TASK = 32  # per task at each evaluation during training; the model card reports the last
# from 2048-token contexts on, a step holds 4 rows or fewer: half the learning rate keeps accuracy from
# oscillating around the 95% bar (at the full rate, 800 steps at 2048 swung between 47% and 100% per task)
LONG_CONTEXT, LONG_CONTEXT_LR_FACTOR = 2048, 0.5


def build_model(
    arch: str, seed: int, attention_bias: bool = True, heads: int = 2, kv_heads: int = 1
) -> torch.nn.Module:
    """A fresh model of the given architecture, with its token ids matching :func:`build_tokenizer`."""
    torch.manual_seed(seed)
    common = dict(
        attention_bias=attention_bias,
        vocab_size=len(vocabulary()),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=128 // heads,
        max_position_embeddings=32768,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, use_sliding_window=False))
    raise ValueError(f"--arch must be 'llama' or 'qwen3', got {arch!r}")


def encode_sample(sample, token_ids: dict[str, int]) -> tuple[list[int], list[int]]:
    """Token ids of ``<s> context (question answer </s>)*`` and the loss targets (-100 outside answers)."""
    ids = [token_ids["<s>"]] + [token_ids[w] for w in sample.context.split()]
    targets = [-100] * len(ids)
    for question, answer in zip(sample.questions, sample.answers):
        question_ids = [token_ids[w] for w in question.split()]
        answer_ids = [token_ids[w] for w in answer.split()] + [token_ids["</s>"]]
        ids += question_ids + answer_ids
        # targets[t] is what position t predicts (token t+1): the last question token predicts the first answer
        # token, each answer token the next, the final </s> nothing
        targets += [-100] * (len(question_ids) - 1) + answer_ids + [-100]
    return ids, targets


def encode_recall(length: int, rng: random.Random, token_ids: dict[str, int]) -> tuple[list[int], list[int]]:
    """Auxiliary task: random words in which earlier spans reappear at random places; the loss is on every word
    of a reappearing span after its first.

    It gives hundreds of retrieval targets per row (answers give a handful), and since spans come from random
    earlier places, continuing one needs content-based lookup (an induction head), not a positional offset."""
    words = [rng.choice(RECALL_WORDS) for _ in range(length)]
    targets = [-100] * (length + 1)
    position = length // 4
    while position < length - 2:
        span = rng.randint(3, 12)
        source = rng.randrange(0, position - span + 1) if position > span else 0
        end = min(position + span, length)
        words[position:end] = words[source : source + end - position]
        for t in range(position, end - 1):  # ids are shifted by <s>: id t+1 predicts id t+2 (word t+1)
            targets[t + 1] = token_ids[words[t + 1]]
        position = end + rng.randint(0, 6)
    return [token_ids["<s>"]] + [token_ids[w] for w in words], targets


def make_batch(
    length: int, batch_size: int, rng: random.Random, token_ids: dict[str, int], task=None, tasks=BASE_TASKS
):
    """A right-padded batch whose contexts have ``length`` words: one ``task``, or (training) a random task of
    ``tasks`` per row with a ``RECALL_FRACTION`` of recall rows."""
    encoded = [
        encode_recall(length, rng, token_ids)
        if task is None and rng.random() < RECALL_FRACTION
        else encode_sample(make_sample(task or rng.choice(tasks), length, rng), token_ids)
        for _ in range(batch_size)
    ]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((batch_size, width), token_ids["<pad>"])
    targets = torch.full((batch_size, width), -100)
    for row, (ids, tgt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(tgt)] = torch.tensor(tgt)
    return input_ids, targets


@torch.no_grad()
def answer_accuracy(
    model, length: int, n_per_task: int, seed: int, token_ids: dict[str, int], tasks=BASE_TASKS
) -> dict[str, float]:
    """Per task, the fraction of contexts whose every answer is the greedy (teacher-forced) prediction."""
    model.eval()
    accuracy = {}
    for task in tasks:
        rng = random.Random(f"eval-{task}-{length}-{seed}")
        input_ids, targets = make_batch(length, n_per_task, rng, token_ids, task)
        predictions = model(input_ids=input_ids).logits.argmax(-1)
        answered = targets != -100
        correct = ((predictions == targets) | ~answered).all(dim=1)
        accuracy[task] = correct.float().mean().item()
    model.train()
    return accuracy


def learning_rate(step: int, max_steps: int, peak: float, length: int, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 10% of ``peak``; scaled down for long contexts."""
    if length >= LONG_CONTEXT:
        peak *= LONG_CONTEXT_LR_FACTOR
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def write_model_card(out: Path, log_path: Path, reproduce: str) -> None:
    """A README for the model folder stating how far training got, from the training log's last evaluation."""
    evaluations = [json.loads(line) for line in log_path.read_text().splitlines() if '"accuracy"' in line]
    last = evaluations[-1] if evaluations else {"step": 0, "length": CURRICULUM[0], "accuracy": {}}
    rows = "\n".join(f"| {task} | {100 * acc:.0f}% |" for task, acc in last["accuracy"].items())
    status = (f"Trained: every task reached 95% at {last['length']} words at step {last['step']}.\n\n"
              if last.get("trained") else "")
    out.joinpath("README.md").write_text(
        f"""# {out.name}

A {CURRICULUM[-1]}-token-curriculum retrieval model trained from scratch by `python -m evaluation.model_zoo.train_model`
(deterministic, seeded; see that module). Snapshot at step {last["step"]}, training on {last["length"]}-word
contexts. Teacher-forced answer accuracy at that step (the trainer's own evaluation: {EVAL_SAMPLES_PER_TASK} fresh
samples per task of that length):

| task | accuracy |
|---|---|
{rows}

{status}The curriculum moves to the next context length once every task reaches 95%. Reproduce this snapshot with
`python -m evaluation.model_zoo.train_model {reproduce}--stop-after {last["step"]}` (one thread, as the defaults set).
"""
    )


def portable_tokenizer_class(config_path: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both load
    (5.x writes ``TokenizersBackend``, unknown to 4.57)."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def portable_rope_theta(config_path: Path) -> None:
    """Also write ``rope_theta`` at the top level: 5.x keeps it only in ``rope_parameters``, which 4.57 ignores,
    silently falling back to 10000 (the model then fails past about a thousand tokens)."""
    config = json.loads(config_path.read_text())
    if "rope_parameters" in config:
        config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_final(model, out: Path, log_path: Path | None = None, reproduce: str = "") -> None:
    """Write the model folder; ``reproduce`` is the trainer's arguments (before ``--stop-after``) for its card."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out, safe_serialization=True)
    portable_rope_theta(out / "config.json")
    build_tokenizer().save_pretrained(out)
    portable_tokenizer_class(out / "tokenizer_config.json")
    if log_path is not None and log_path.exists():
        write_model_card(out, log_path, reproduce)


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded as weights and plain data only (``weights_only=True``): a crafted file runs
    no code here; one holding anything else is refused naming the file (SystemExit)."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise SystemExit(
            f"error: checkpoint {path} holds more than tensors and plain data, so it is not loaded (weights only: a file "
            f"that runs code when read is refused): remove it to train from the start ({str(error).splitlines()[0]})"
        ) from None


def train(args) -> None:
    torch.set_num_threads(args.threads)
    token_ids = {token: i for i, token in enumerate(vocabulary())}
    model = build_model(args.arch, args.seed, args.attention_bias, args.heads, args.kv_heads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    checkpoint_dir = Path(args.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_dir / "last.pt"
    state = {"step": 0, "stage": 0, "best": {}}
    if checkpoint.exists():
        saved = load_checkpoint(checkpoint)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        print(f"resumed from {checkpoint} at step {state['step']} (stage {state['stage']})", flush=True)
    with open(checkpoint_dir / "log.jsonl", "a") as log:
        model.train()
        start = time.time()
        last_step = min(args.max_steps, args.stop_after or args.max_steps)
        while state["step"] < last_step:
            step, length = state["step"], CURRICULUM[state["stage"]]
            rng = random.Random(f"train-{args.seed}-{step}")
            input_ids, targets = make_batch(length, max(2, TOKENS_PER_STEP // length), rng, token_ids, tasks=args.tasks)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args.max_steps, args.lr, length)
            logits = model(input_ids=input_ids).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            state["step"] += 1
            trained = False  # every task passed at the curriculum's last length, at this step's evaluation
            if state["step"] % args.log_every == 0:
                record = {"step": state["step"], "length": length, "loss": round(loss.item(), 4),
                          "elapsed_s": round(time.time() - start, 1)}
                if state["step"] % args.eval_every == 0:
                    record["accuracy"] = answer_accuracy(
                        model, length, EVAL_SAMPLES_PER_TASK, state["step"], token_ids, args.tasks
                    )
                    passed = min(record["accuracy"].values()) >= args.advance_at
                    if passed and state["stage"] + 1 < len(CURRICULUM):
                        state["stage"] += 1
                        record["advanced_to"] = CURRICULUM[state["stage"]]
                    elif passed:
                        record["trained"] = trained = True
                print(json.dumps(record), flush=True)
                log.write(json.dumps(record) + "\n")
                log.flush()
            stop = trained and args.until_trained
            if state["step"] % args.checkpoint_every == 0 or state["step"] == last_step or stop:
                saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state}
                torch.save(saved, checkpoint_dir / "last.tmp")
                (checkpoint_dir / "last.tmp").replace(checkpoint)
                save_final(model, Path(args.out), checkpoint_dir / "log.jsonl", args.reproduce)
            if stop:
                print(f"trained: every task reached {args.advance_at:.0%} at {length} words at step {state['step']}",
                      flush=True)
                break
    save_final(model, Path(args.out), checkpoint_dir / "log.jsonl", args.reproduce)
    print(f"saved model to {args.out}", flush=True)


def reproduction_arguments(argv: list[str]) -> str:
    """The command-line arguments that shape the model (all but where files go, threads and where it stops),
    as the model card's reproduction command shows them, followed by a space where not empty."""
    dropped = {"--stop-after", "--checkpoint-dir", "--threads"}  # each with a value
    dropped_flags = {"--until-trained"}
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in dropped_flags:
            continue
        elif arg.split("=")[0] in dropped:
            skip = "=" not in arg
        else:
            kept.append(arg)
    return "".join(f"{arg} " for arg in kept)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["llama", "qwen3"], default="llama")
    parser.add_argument("--out", default="evaluation/models/retrieval-llama")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="default: evaluation/checkpoints/<arch> (<model folder>-<arch> for another --out)")
    parser.add_argument("--max-steps", type=int, default=12000)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop at this step (the schedule still spans --max-steps): reproduces a snapshot")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--no-attention-bias", dest="attention_bias", action="store_false",
                        help="no biases on q/k/v/o projections (they make position-based heads easy to learn)")
    parser.add_argument("--heads", type=int, default=2, help="query heads (head_dim = 128 / heads)")
    parser.add_argument("--kv-heads", type=int, default=1, help="key/value heads (GQA when fewer than heads)")
    parser.add_argument("--tasks", nargs="+", default=list(BASE_TASKS), choices=TASKS,
                        help="tasks to train on (default: the five the shipped retrieval-llama learned)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (results are exact for one count)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--advance-at", type=float, default=0.95)
    parser.add_argument("--until-trained", action="store_true", help="stop (saving the model) at the first "
                        "evaluation where every task reaches --advance-at at the curriculum's last length")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    default_out = args.out == parser.get_default("out")
    checkpoint_name = args.arch if default_out else f"{Path(args.out).name}-{args.arch}"
    args.checkpoint_dir = args.checkpoint_dir or f"evaluation/checkpoints/{checkpoint_name}"
    args.reproduce = reproduction_arguments(argv)
    train(args)


if __name__ == "__main__":
    main()
