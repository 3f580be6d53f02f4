"""Speed and memory of ComposePress next to a plain prefill, SnapKV and kvpress's KVComposePress.

    python -m evaluation.bench.speed                       # tiny model, 4k-32k tokens
    python -m evaluation.bench.speed --model medium --lengths 4096 32768 --json bench.json --plot bench.png
    python -m evaluation.bench.speed --from-json bench.json --plot bench.png   # plot figures measured earlier

Models are built from configs (random weights: speed does not depend on them). For every context length the
methods run interleaved (one round = every method once) after a warm-up round, and the table reports medians
as ratios to the plain prefill measured in the same rounds. Peak extra memory is measured per method in a fresh
process (peak resident memory during the run minus the resident memory just before it, with glibc told to give
every block of 64 KiB or more its own mapping, so that freed tensors leave the resident set at once; on CUDA,
the allocator's peak in the same process) and shown, minus the plain prefill's, as a fraction of the full KV cache.
kvpress's KVComposePress is skipped at a length where its time, extrapolated quadratically from the previous
length, would pass ``--kvcompose-limit-s``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
from kvpress import KVComposePress, KVzipPress, SnapKVPress
from matplotlib.figure import Figure
from transformers import LlamaConfig, LlamaForCausalLM

from kvpress_compose import QUERY_SOURCES, ComposePress
from kvpress_compose.replay import activation_values_per_token, replay_chunk_size

from ..metrics.fidelity import prefill
from ..model_zoo.toy_models import SHIPPED_MODEL

MODELS = {
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
    "medium": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=64),
    # a token's KV cache over all layers is 1.5x one layer's MLP activations, as in Llama-3.1-8B (65536 vs
    # 3 x 14336 values): the shape where replay's stored re-fed keys and values would show in the peak
    "kv-heavy": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=16, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=32),
    # two layers with Llama-3.1-8B's dimensions (the small vocabulary keeps it in memory): where MLPs dominate
    "8b-dims": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128),
}

TIME_TARGETS = {"compose[prefill]": 1.3, "compose[bidirectional]": 1.3, "compose[replay]": 2.5}  # x plain prefill
# on the realistic shape: x plain prefill, and replay within this factor of its arithmetic floor
TIME_TARGETS_8B = {"compose[prefill]": 1.05, "compose[bidirectional]": 1.10}
REPLAY_FLOOR_TOLERANCE = 1.05
REPLAYS = ("compose[replay]", "compose[replay_local]")  # each checked against KVzipPress, which also re-feeds
TARGETED = (*TIME_TARGETS, "compose[replay_local]")
KVZIP_TOKENIZER = SHIPPED_MODEL  # KVzipPress loads one from name_or_path
MMAP_THRESHOLD_BYTES = 64 * 1024  # glibc: blocks this large get their own mapping, returned to the system when freed
EXTRA_MEMORY_TARGET = 0.25  # peak extra memory over the plain prefill's, as a fraction of the full KV cache
SPEEDUP_TARGET = 20.0  # against kvpress's KVComposePress at 8k tokens
SLOW_RUN_S = 10.0


def build_model(name: str, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, max_position_embeddings=65536, rope_theta=1e6,
                         attn_implementation="sdpa", **MODELS[name])
    config.name_or_path = str(KVZIP_TOKENIZER)  # a word-level tokenizer whose ids fit the vocabulary
    return LlamaForCausalLM(config).eval().to(device=device, dtype=dtype)


def flop_floors(config: dict, n: int, bytes_per_value: int = 4) -> dict[str, float]:
    """Each ComposePress mode's arithmetic floor as a ratio of FLOPs to the plain prefill's, from the model's
    dimensions: per layer, the projections and MLP (``2 x params x tokens``) and causal attention (QK and AV over
    n^2 / 2 pairs). ``prefill`` adds one product over the n^2 / 2 scored pairs; ``bidirectional`` a causal
    attention call over the reversed sequence and a product over n^2 pairs; ``replay`` one more forward over the
    re-fed context but the last layer's MLP, which it never reads (its attention over n context keys plus n^2 / 2
    re-fed pairs), and a product over n^2 pairs; ``replay_local`` the same with each re-fed chunk of c tokens
    attending to the context and itself only (n^2 + n c / 2 pairs)."""
    h, inter, q_heads, kv_heads, d, layers = (config[key] for key in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "num_hidden_layers"))
    mlp = 6 * n * h * inter  # the gated MLP
    linear = 2 * n * h * d * (2 * q_heads + 2 * kv_heads) + mlp  # q, k, v, o and the MLP
    pair = 2 * q_heads * d  # one (query, key) product over every query head
    plain = linear + 2 * pair * n * n / 2  # QK and AV over the causal pairs
    replay_forward = linear - mlp / layers  # per layer, on average: the last layer's MLP is skipped
    # the chunks the replay takes on CPU, where no mask is built: bounded by one layer's activations
    activation_bytes = activation_values_per_token(SimpleNamespace(**config)) * bytes_per_value
    chunk = replay_chunk_size(layers * 2 * kv_heads * n * d * bytes_per_value, n, activation_bytes)
    extra = {
        "compose[prefill]": pair * n * n / 2,
        "compose[bidirectional]": 2 * pair * n * n / 2 + pair * n * n,
        "compose[replay]": replay_forward + 2 * pair * 1.5 * n * n + pair * n * n,
        "compose[replay_local]": replay_forward + 2 * pair * (n * n + n * min(chunk, n) / 2) + pair * n * n,
    }
    return {mode: (plain + flops) / plain for mode, flops in extra.items()}


def methods(ratio: float) -> dict:
    presses = {"plain prefill": None}
    presses.update({f"compose[{qs}]": ComposePress(compression_ratio=ratio, query_source=qs,
                                                   agg_task="mean" if qs == "prefill_seen" else "max")
                    for qs in QUERY_SOURCES})  # prefill_seen averages over the queries that saw each key
    presses["snapkv"] = SnapKVPress(compression_ratio=ratio)
    presses["kvpress KVzipPress"] = KVzipPress(compression_ratio=ratio)  # re-feeds the context, as replay does
    presses["kvpress KVComposePress"] = KVComposePress(compression_ratio=ratio)
    return presses


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def probe_peak_memory(args, method: str, length: int) -> int:
    """Peak extra bytes of one run of ``method``, measured in a fresh process (CPU: peak resident memory
    above the level just before the run). A fixed mmap threshold keeps glibc from holding freed tensors in
    its heap (its default threshold rises after the first large free), so the peak follows the bytes of live
    tensors: repeated probes agree within about 0.5 MB, where the default allocator varied by 50 MB."""
    command = [sys.executable, "-m", "evaluation.bench.speed", "--memory-probe", method, "--model", args.model,
               "--lengths", str(length), "--ratio", str(args.ratio), "--device", args.device,
               "--threads", str(torch.get_num_threads())]
    if args.dtype:
        command += ["--dtype", args.dtype]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
    return int(output.strip().splitlines()[-1])


def run_memory_probe(args, dtype) -> None:
    """The child side of :func:`probe_peak_memory`: prints the peak extra bytes."""
    model = build_model(args.model, args.device, dtype)
    press = methods(args.ratio)[args.memory_probe]
    timed_prefill(model, torch.zeros(1, 256, dtype=torch.long), press, args.device)  # load kernels, warm up
    ids = torch.randint(0, 1024, (1, args.lengths[0]), generator=torch.Generator().manual_seed(0))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak resident memory (VmHWM) to the current level
    before = rss_bytes()
    timed_prefill(model, ids, press, args.device)
    print(peak_rss_bytes() - before)


@torch.no_grad()
def timed_prefill(model, ids, press, device):
    """(seconds, CUDA peak extra bytes or None on CPU, cache) of one prefill (and compression) of ``ids``."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    cache = prefill(model, ids, press)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    return seconds, peak, cache


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def decode_tokens_per_s(model, cache, n_context: int, steps: int, device: str) -> float:
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    start = time.perf_counter()
    for step in range(steps):
        position = torch.full((1, 1), n_context + step, device=device)
        token = model(input_ids=token, past_key_values=cache, position_ids=position).logits[:, -1:].argmax(-1)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def bench_length(model, length, args, kvcompose_estimate):
    ids = torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(length)).to(args.device)
    presses = {name: press for name, press in methods(args.ratio).items() if name in args.methods}
    if kvcompose_estimate is not None and kvcompose_estimate > args.kvcompose_limit_s:
        print(f"  skipping kvpress KVComposePress at {length} tokens: estimated {kvcompose_estimate:.0f} s per run")
        presses.pop("kvpress KVComposePress", None)
    times = {name: [] for name in presses}
    peaks = {name: [] for name in presses}
    full_bytes, kept_fraction = None, float("nan")  # kept: measured on compose[replay]'s cache where it runs
    timed_once = set()  # methods too slow to repeat: their warm-up run is their timing
    for round_index in range(args.repeats + 1):  # round 0 is the warm-up
        for name, press in presses.items():
            if name in timed_once:
                continue
            seconds, peak, cache = timed_prefill(model, ids, press, args.device)
            if name == "plain prefill":
                full_bytes = cache_bytes(cache)
            if name == "compose[replay]":
                kept_fraction = cache_bytes(cache) / full_bytes
            del cache
            if round_index == 0 and seconds > SLOW_RUN_S:
                timed_once.add(name)
            if round_index > 0 or name in timed_once:
                times[name].append(seconds)
                if peak is not None:
                    peaks[name].append(peak)
    if args.device != "cuda":
        peaks = {name: [probe_peak_memory(args, name, length)] for name in presses}
    base_time = statistics.median(times["plain prefill"])
    base_peak = statistics.median(peaks["plain prefill"])
    floors = flop_floors(MODELS[args.model], length)
    rows = []
    for name in presses:
        median_time = statistics.median(times[name])
        rows.append({
            "method": name, "tokens": length, "seconds": median_time, "time_vs_prefill": median_time / base_time,
            "flop_floor": floors.get(name, float("nan")),
            "peak_extra_mb": statistics.median(peaks[name]) / 2**20,
            "extra_peak_vs_kv_cache": (statistics.median(peaks[name]) - base_peak) / full_bytes,
        })
    cache_check = {"tokens": length, "ratio": args.ratio, "kept_bytes_fraction": kept_fraction,
                   "target_fraction": 1 - args.ratio}
    kvcompose_time = statistics.median(times.get("kvpress KVComposePress", [float("nan")]))
    return rows, cache_check, kvcompose_time


def decode_speeds(model, length, args):
    """Decode tokens/s after a ``length``-token context at r = 0, 0.5 and 0.75: medians over ``--repeats``
    interleaved rounds of ``--decode-steps`` steps, each on a copy of the same prefilled cache."""
    ids = torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(1)).to(args.device)
    ratios = (0.0, 0.5, 0.75)
    caches = {}
    for ratio in ratios:
        press = ComposePress(compression_ratio=ratio, query_source="prefill") if ratio else None
        caches[ratio] = timed_prefill(model, ids, press, args.device)[2]
        decode_tokens_per_s(model, copy.deepcopy(caches[ratio]), length, 4, args.device)  # warm-up
    speeds = {ratio: [] for ratio in ratios}
    for _ in range(args.repeats):
        for ratio in ratios:
            cache = copy.deepcopy(caches[ratio])
            speeds[ratio].append(decode_tokens_per_s(model, cache, length, args.decode_steps, args.device))
    return {ratio: statistics.median(values) for ratio, values in speeds.items()}


def print_table(rows):
    print(f"{'method':<26}{'tokens':>8}{'seconds':>10}{'x prefill':>11}{'FLOP floor':>12}{'peak MB':>10}"
          f"{'extra/KV':>10}")
    for row in rows:
        floor = "" if math.isnan(row.get("flop_floor", float("nan"))) else f"{row['flop_floor']:.2f}"
        print(f"{row['method']:<26}{row['tokens']:>8}{row['seconds']:>10.3f}{row['time_vs_prefill']:>11.2f}"
              f"{floor:>12}{row['peak_extra_mb']:>10.1f}{row['extra_peak_vs_kv_cache']:>10.2f}")


def time_target(model: str, method: str, row: dict) -> float:
    """The time target (x plain prefill) of a ComposePress mode on this preset: the issues' fixed targets, or
    within :data:`REPLAY_FLOOR_TOLERANCE` of the mode's floor (replay on the realistic shape, local replay)."""
    fixed = TIME_TARGETS_8B if model == "8b-dims" else TIME_TARGETS
    if method in fixed and not (model == "8b-dims" and method == "compose[replay]"):
        return fixed[method]
    return REPLAY_FLOOR_TOLERANCE * row["flop_floor"]


def print_targets(rows, model: str = "tiny") -> None:
    """Each ComposePress mode against the issue's targets, replay against KVzipPress, and the speed-up over
    kvpress's KVComposePress."""
    by_method = {(row["method"], row["tokens"]): row for row in rows}
    print("\nagainst the targets (time and extra memory vs plain prefill; speed-up vs KVComposePress):")
    for (method, tokens), row in by_method.items():
        if method not in TARGETED:
            continue
        target = time_target(model, method, row)
        time_ok = row["time_vs_prefill"] <= target
        memory_ok = row["extra_peak_vs_kv_cache"] <= EXTRA_MEMORY_TARGET
        line = (f"  {method:<24}{tokens:>7} tokens: {row['time_vs_prefill']:.2f}x (<= {target:.2f}x: "
                f"{'met' if time_ok else 'NOT met'}), extra {row['extra_peak_vs_kv_cache']:.2f} of KV (<= "
                f"{EXTRA_MEMORY_TARGET}: {'met' if memory_ok else 'NOT met'})")
        kvzip = by_method.get(("kvpress KVzipPress", tokens))
        if method in REPLAYS and kvzip is not None:
            faster = row["seconds"] < kvzip["seconds"]
            line += f", {kvzip['seconds'] / row['seconds']:.2f}x KVzipPress's speed ({'met' if faster else 'NOT met'})"
        kvcompose = by_method.get(("kvpress KVComposePress", tokens))
        if kvcompose is not None:
            speedup = kvcompose["seconds"] / row["seconds"]
            line += f", {speedup:.1f}x faster than KVComposePress"
            if tokens == 8192:
                line += f" (>= {SPEEDUP_TARGET:.0f}x: {'met' if speedup >= SPEEDUP_TARGET else 'NOT met'})"
        print(line)


def plot(figures: dict, path: str) -> None:
    """Time against plain prefill and peak extra memory against the KV cache, per method over context length;
    each ComposePress mode's target dashed in its colour."""
    figure = Figure(figsize=(11, 4.5))
    time_axes, memory_axes = figure.subplots(1, 2)
    methods_in_order = list(dict.fromkeys(row["method"] for row in figures["rows"]))
    for index, method in enumerate(methods_in_order):
        rows = [row for row in figures["rows"] if row["method"] == method]
        tokens = [row["tokens"] for row in rows]
        color = f"C{index}"
        time_axes.plot(tokens, [row["time_vs_prefill"] for row in rows], "o-", color=color, label=method)
        memory_axes.plot(tokens, [row["extra_peak_vs_kv_cache"] for row in rows], "o-", color=color, label=method)
        if method in TIME_TARGETS:
            time_axes.axhline(TIME_TARGETS[method], color=color, linestyle="--", linewidth=0.8)
        floors = [row.get("flop_floor", float("nan")) for row in rows]
        if not all(math.isnan(floor) for floor in floors):  # the mode's arithmetic floor, dotted
            time_axes.plot(tokens, floors, ":", color=color, linewidth=1.2)
    memory_axes.axhline(EXTRA_MEMORY_TARGET, color="black", linestyle="--", linewidth=0.8, label="target")
    time_axes.set(yscale="log", ylabel="time / plain prefill",
                  title="prefill + compression time (dashed: targets, dotted: FLOP floors)")
    memory_axes.set_yscale("symlog", linthresh=1)  # KVComposePress's O(n^2) peak is orders of magnitude above
    memory_axes.set(ylabel="(peak - plain prefill's peak) / full KV cache", title="peak extra memory")
    for axes in (time_axes, memory_axes):
        axes.set_xscale("log", base=2)
        axes.set_xticks(sorted({row["tokens"] for row in figures["rows"]}), minor=False)
        axes.set_xticks([], minor=True)
        axes.get_xaxis().set_major_formatter(lambda value, _: f"{value / 1024:g}k")
        axes.set_xlabel("context tokens")
        axes.grid(alpha=0.3)
    memory_axes.legend(fontsize="small", loc="upper right")
    figure.suptitle(f"model {figures['model']}, {figures['device']}, {figures['dtype']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=None, help="methods to run (default: all; the plain "
                        "prefill always runs, as the reference)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--kvcompose-limit-s", type=float, default=120.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--plot", help="draw time and memory ratios against context length into this PNG")
    parser.add_argument("--from-json", help="measure nothing: plot (--plot) the figures of an earlier --json run")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one run in a fresh process
    args = parser.parse_args(argv)
    if any(length < 16 for length in args.lengths):
        parser.error("--lengths must be at least 16 tokens")
    if not 0 < args.ratio < 1:
        parser.error("--ratio must be in (0, 1)")
    known = list(methods(0.5))
    unknown = sorted(set(args.methods or []) - set(known))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known methods: {known}")
    args.methods = ["plain prefill", *(args.methods or known)]
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        return run_memory_probe(args, dtype)
    if args.from_json:
        if not args.plot:
            parser.error("--from-json needs --plot PATH")
        with open(args.from_json) as f:
            return plot(json.load(f), args.plot)
    model = build_model(args.model, args.device, dtype)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model} ({dtype}), {device_name}, compression ratio {args.ratio}")
    rows, cache_checks, previous = [], [], None
    for length in sorted(args.lengths):
        estimate = None if previous is None else previous[1] * (length / previous[0]) ** 2
        length_rows, cache_check, kvcompose_time = bench_length(model, length, args, estimate)
        rows += length_rows
        cache_checks.append(cache_check)
        if not math.isnan(kvcompose_time):  # it ran at this length
            previous = (length, kvcompose_time)
        print_table(length_rows)
    print_targets(rows, args.model)
    print("\nkept cache bytes after compose[replay]:")
    for check in cache_checks if "compose[replay]" in args.methods else []:
        kept, target = check["kept_bytes_fraction"], check["target_fraction"]
        print(f"  {check['tokens']:>6} tokens: {kept:.4f} of full (target {target:.4f})")
    speeds = decode_speeds(model, min(args.lengths), args)
    print(f"\ndecode tokens/s after a {min(args.lengths)}-token context: "
          + ", ".join(f"r={ratio}: {speed:.1f}" for ratio, speed in speeds.items()))
    figures = {"model": args.model, "device": device_name, "dtype": str(dtype), "rows": rows,
               "cache": cache_checks, "decode_tokens_per_s": speeds}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(figures, args.plot)


if __name__ == "__main__":
    main()
