"""Decode-time compression side by side: ComposeDecodingPress against kvpress's DecodingPress(SnapKV / Knorm).

    python -m evaluation.bench.decoding                   # shipped toy model, 1024-word context, 2048 decoded tokens
    python -m evaluation.bench.decoding --model smollm2-135m --contexts 10 --context-tokens 256 --tokens 192 \\
        --interval 80 --target-size 128 --buffer 64 --json docs/bench_decoding_smollm2-135m.json

After a context, every method decodes the same ``--tokens`` long continuation, fed one token per forward as
generation does (teacher forcing), so their next-token distributions can be compared position by position with
the uncompressed model's: the mean KL(uncompressed || compressed) and the share of positions whose top token
agrees. Also per method: the peak number of cached entries per layer and KV head (averaged over layers) and
decoded tokens per second. Every press compresses every ``--interval`` tokens to ``--target-size`` entries
(ComposeDecodingPress: ``n_layers x target_size`` over all layers). The prefill itself is kept whole. SnapKV
scores with its last 64 queries, so at least 65 must be buffered at a compression: ``--buffer`` >= 64 and
``--interval`` >= 65.

Texts. A real model reads natural prose, the Lee corpus of news articles (:func:`evaluation.tasks.ruler_prose.load_prose`):
context ``i`` is a window of ``--context-tokens`` tokens at a seeded offset inside the ``i``-th of ``--contexts``
equal stretches of the tokenized corpus (so contexts never overlap), and its continuation is the ``--tokens``
tokens right after it, so the decoded text goes on coherently; the special tokens the tokenizer puts before a
text (``add_special_tokens``) start each context. A trained toy model under ``evaluation/models/`` reads only its
word-level tasks: a ``--context-words`` word niah_multikey context after ``<s>``, then a niah_multivalue context as
the continuation.

Figures are averaged over the ``--contexts`` contexts, each with a 95% percentile bootstrap interval over contexts
(contexts resampled with replacement); the JSON keeps every context's figures too.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from kvpress import DecodingPress, KnormPress, SnapKVPress
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvpress_compose import ComposeDecodingPress, ComposePress

from ..metrics.accuracy import bootstrap_mean_interval
from ..model_zoo.real_models import resolve_model
from ..model_zoo.toy_models import SHIPPED_MODEL, is_toy_model
from ..tasks.word_tasks import make_sample

FIGURES = ("kl", "top1_agreement", "peak_entries_per_layer_head", "tokens_per_s")
DIGITS = {"kl": 5, "top1_agreement": 4, "peak_entries_per_layer_head": 1, "tokens_per_s": 1}


def methods(interval: int, target_size: int, buffer: int) -> dict:
    settings = dict(compression_interval=interval, target_size=target_size, hidden_states_buffer_size=buffer)
    return {
        "none": None,
        # global allocation over the layers, as measured in docs/bench_decoding_smollm2-135m.json
        "compose_decoding": ComposeDecodingPress(ComposePress(layer_allocation="global"), **settings),
        "decoding_snapkv": DecodingPress(base_press=SnapKVPress(), **settings),
        "decoding_knorm": DecodingPress(base_press=KnormPress(), **settings),
    }


def prose_windows(token_ids: list[int], n_contexts: int, context_tokens: int, continuation_tokens: int,
                  seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``n_contexts`` (context, continuation) pairs cut from ``token_ids``: the ``i``-th starts at a seeded
    random offset inside the ``i``-th of ``n_contexts`` equal stretches, takes ``context_tokens`` tokens as the
    context and the ``continuation_tokens`` right after them as the continuation. Pairs never overlap."""
    for name, value in (("n_contexts", n_contexts), ("context_tokens", context_tokens),
                        ("continuation_tokens", continuation_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    window = context_tokens + continuation_tokens
    stretch = len(token_ids) // n_contexts
    if stretch < window:
        raise ValueError(f"the text's {len(token_ids)} tokens hold fewer than n_contexts={n_contexts} windows of "
                         f"context_tokens + continuation_tokens = {window} tokens")
    rng = random.Random(seed)
    pairs = []
    for i in range(n_contexts):
        start = i * stretch + rng.randrange(stretch - window + 1)
        pairs.append((token_ids[start : start + context_tokens], token_ids[start + context_tokens : start + window]))
    return pairs


def leading_special_tokens(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text when ``add_special_tokens`` (e.g. a BOS), possibly none."""
    text = "The"
    with_special = tokenizer(text, add_special_tokens=True).input_ids
    plain = tokenizer(text, add_special_tokens=False).input_ids
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    raise ValueError("cannot find the text among the tokenizer's tokens with special tokens added")


def prose_samples(tokenizer, n_contexts: int, context_tokens: int, continuation_tokens: int,
                  seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(context, continuation) id tensors of shape (1, length) from the Lee corpus (see :func:`prose_windows`);
    each context starts with the tokenizer's leading special tokens."""
    from ..tasks.ruler_prose import load_prose

    ids = tokenizer(load_prose(), add_special_tokens=False).input_ids
    prefix = leading_special_tokens(tokenizer)
    return [(torch.tensor([prefix + context]), torch.tensor([continuation]))
            for context, continuation in prose_windows(ids, n_contexts, context_tokens, continuation_tokens, seed)]


def toy_samples(tokenizer, n_contexts: int, context_words: int, continuation_tokens: int,
                seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(context, continuation) id tensors of the word-level tasks for a toy model: ``<s>`` and a niah_multikey
    context of ``context_words`` words, then the first ``continuation_tokens`` of a niah_multivalue context."""
    rng = random.Random(seed)

    def encode(text: str) -> torch.Tensor:
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids

    samples = []
    for _ in range(n_contexts):
        context = torch.cat([torch.tensor([[tokenizer.bos_token_id]]),
                             encode(make_sample("niah_multikey", context_words, rng).context)], dim=1)
        continuation = encode(make_sample("niah_multivalue", continuation_tokens, rng).context)
        samples.append((context, continuation[:, :continuation_tokens]))
    return samples


@torch.no_grad()
def decode(model, context_ids, continuation_ids, press, name: str):
    """Log-probabilities at every continuation position, peak entries per layer and head, tokens per second."""
    cache, n = DynamicCache(), context_ids.shape[1]
    log_probs, peak = [], 0
    with press(model) if press is not None else torch.no_grad():
        logits = model(input_ids=context_ids, past_key_values=cache).logits[:, -1]
        start = time.perf_counter()
        for step in tqdm(range(continuation_ids.shape[1]), desc=name, leave=False):
            log_probs.append(logits.log_softmax(-1))
            token = continuation_ids[:, step : step + 1]
            position = torch.tensor([[n + step]])
            logits = model(input_ids=token, past_key_values=cache, position_ids=position).logits[:, -1]
            lengths = [cache.get_seq_length(i) for i in range(len(cache.layers))]
            peak = max(peak, sum(lengths) / len(lengths))
        seconds = time.perf_counter() - start
    return torch.cat(log_probs), peak, continuation_ids.shape[1] / seconds


def summarize(per_context: dict[str, list[float]]) -> dict:
    """Per figure: the mean over contexts, its 95% bootstrap interval, and the per-context values."""
    row = {}
    for figure in FIGURES:
        values, digits = per_context[figure], DIGITS[figure]
        low, high = bootstrap_mean_interval(values)
        row[figure] = round(float(np.mean(values)), digits)
        row[f"{figure}_interval"] = [round(low, digits), round(high, digits)]
    row["per_context"] = {figure: [round(v, DIGITS[figure]) for v in per_context[figure]] for figure in FIGURES}
    return row


def print_table(results: dict) -> None:
    print(f"{'method':<18}{'KL [95% CI]':>28}{'top-1 agree [95% CI]':>26}{'peak entries':>14}{'tokens/s':>10}")
    for name, row in results.items():
        kl = f"{row['kl']:.4f} [{row['kl_interval'][0]:.4f}, {row['kl_interval'][1]:.4f}]"
        agree = f"{row['top1_agreement']:.3f} [{row['top1_agreement_interval'][0]:.3f}, " \
                f"{row['top1_agreement_interval'][1]:.3f}]"
        print(f"{name:<18}{kl:>28}{agree:>26}{row['peak_entries_per_layer_head']:>14.1f}{row['tokens_per_s']:>10.1f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHIPPED_MODEL), help="a toy model's folder, a real model's short "
                        "name (evaluation.model_zoo.real_models), or a folder / hub id")
    parser.add_argument("--contexts", type=int, default=1, help="contexts (each with its continuation)")
    parser.add_argument("--context-words", type=int, default=1024, help="words per context, toy models")
    parser.add_argument("--context-tokens", type=int, default=1024, help="tokens per context, real models")
    parser.add_argument("--tokens", type=int, default=2048, help="decoded (teacher-forced) tokens")
    parser.add_argument("--interval", type=int, default=256, help="compression_interval")
    parser.add_argument("--target-size", type=int, default=512)
    parser.add_argument("--buffer", type=int, default=128, help="hidden_states_buffer_size")
    parser.add_argument("--seed", type=int, default=0, help="seeds the contexts' offsets (or toy samples)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.contexts < 1:
        parser.error(f"--contexts must be >= 1, got {args.contexts}")
    snapkv_window = SnapKVPress().window_size
    if min(args.buffer, args.interval - 1) + 1 <= snapkv_window:  # the hidden states buffered at a compression
        parser.error(f"SnapKV scores with the last {snapkv_window} buffered queries and needs more than that at "
                     f"each compression: --buffer must be >= {snapkv_window} and --interval >= {snapkv_window + 1}, "
                     f"got --buffer {args.buffer} --interval {args.interval}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    toy = is_toy_model(args.model)
    path = resolve_model(args.model)  # a real model's short name (evaluation.model_zoo.real_models) or a folder / hub id
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if toy:
        samples = toy_samples(tokenizer, args.contexts, args.context_words, args.tokens, args.seed)
        text = f"word-level tasks (niah_multikey context of {args.context_words} words, niah_multivalue continuation)"
    else:
        samples = prose_samples(tokenizer, args.contexts, args.context_tokens, args.tokens, args.seed)
        text = "Lee corpus prose (gensim:lee_background), consecutive context and continuation windows"
    presses = methods(args.interval, args.target_size, args.buffer)
    per_context = {name: {figure: [] for figure in FIGURES} for name in presses}
    for context_ids, continuation_ids in tqdm(samples, desc="contexts"):
        reference = None
        for name, press in presses.items():
            log_probs, peak, speed = decode(model, context_ids, continuation_ids, press, name)
            if reference is None:
                reference = log_probs
            kl = (reference.exp() * (reference - log_probs)).sum(-1)
            agree = (reference.argmax(-1) == log_probs.argmax(-1)).float()
            for figure, value in zip(FIGURES, (kl.mean().item(), agree.mean().item(), peak, speed)):
                per_context[name][figure].append(value)
    results = {name: summarize(values) for name, values in per_context.items()}
    seconds = time.perf_counter() - started
    context_lengths = sorted({int(context.shape[1]) for context, _ in samples})
    print(f"{args.model}: {len(samples)} contexts of {'/'.join(map(str, context_lengths))} tokens, "
          f"{samples[0][1].shape[1]} decoded each; every {args.interval} tokens to {args.target_size} entries per "
          f"layer and head; {text}; means over contexts with 95% bootstrap intervals; {seconds:.0f} s")
    print_table(results)
    figures = {"settings": vars(args), "model_path": str(path), "text": text, "context_lengths": context_lengths,
               "seconds": round(seconds, 1), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
