"""Decode-time compression side by side: ComposeDecodingPress against kvpress's DecodingPress(SnapKV / Knorm).

    python -m evaluation.bench_decoding                   # shipped model, 1024-word context, 2048 decoded tokens
    python -m evaluation.bench_decoding --target-size 256 --interval 128 --json docs/bench_decoding.json

After a context, every method decodes the same ``--tokens`` long continuation (another synthetic context, fed one
token per forward as generation does), so their next-token distributions can be compared position by position
with the uncompressed model's: the mean KL(uncompressed || compressed) and the share of positions whose top
token agrees. Also per method: the peak number of cached entries per layer and KV head (averaged over layers)
and decoded tokens per second. Every press compresses every ``--interval`` tokens to ``--target-size`` entries
(ComposeDecodingPress: ``n_layers x target_size`` over all layers). The prefill itself is kept whole.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from kvpress import DecodingPress, KnormPress, SnapKVPress
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvpress_compose import ComposeDecodingPress, ComposePress

from .real_models import resolve_model
from .synthetic_tasks import make_sample

SHIPPED_MODEL = Path(__file__).parent / "models" / "retrieval-llama"


def methods(interval: int, target_size: int, buffer: int) -> dict:
    settings = dict(compression_interval=interval, target_size=target_size, hidden_states_buffer_size=buffer)
    return {
        "none": None,
        "compose_decoding": ComposeDecodingPress(ComposePress(), **settings),
        "decoding_snapkv": DecodingPress(base_press=SnapKVPress(), **settings),
        "decoding_knorm": DecodingPress(base_press=KnormPress(), **settings),
    }


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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--context-words", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048, help="decoded (teacher-forced) tokens")
    parser.add_argument("--interval", type=int, default=256, help="compression_interval")
    parser.add_argument("--target-size", type=int, default=512)
    parser.add_argument("--buffer", type=int, default=128, help="hidden_states_buffer_size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)  # a real model's short name (evaluation.real_models) or a folder / hub id
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rng = random.Random(0)
    def encode(text: str) -> torch.Tensor:
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids

    context_ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), encode(
        make_sample("niah_multikey", args.context_words, rng).context)], dim=1)
    continuation_ids = encode(make_sample("niah_multivalue", args.tokens, rng).context)[:, : args.tokens]
    results, reference = {}, None
    for name, press in methods(args.interval, args.target_size, args.buffer).items():
        log_probs, peak, speed = decode(model, context_ids, continuation_ids, press, name)
        if reference is None:
            reference = log_probs
        kl = (reference.exp() * (reference - log_probs)).sum(-1)
        agree = (reference.argmax(-1) == log_probs.argmax(-1)).float()
        results[name] = {"kl": round(kl.mean().item(), 5), "top1_agreement": round(agree.mean().item(), 4),
                         "peak_entries_per_layer_head": round(peak, 1), "tokens_per_s": round(speed, 1)}
    print(f"context {context_ids.shape[1]} tokens, {args.tokens} decoded; every {args.interval} tokens to "
          f"{args.target_size} entries per layer and head")
    print(f"{'method':<18}{'KL':>10}{'top-1 agree':>13}{'peak entries':>14}{'tokens/s':>10}")
    for name, row in results.items():
        print(f"{name:<18}{row['kl']:>10.4f}{row['top1_agreement']:>13.3f}{row['peak_entries_per_layer_head']:>14.1f}"
              f"{row['tokens_per_s']:>10.1f}")
    figures = {"settings": vars(args), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
