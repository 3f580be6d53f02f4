"""Are a model's KV heads redundant? The overlap of their per-head top-k token sets.

    python -m evaluation.studies.head_overlap --model evaluation/models/retrieval-llama-gqa \
        --data-dir evaluation/data/study-4096 --contexts 3 --out docs/study-4096/head_overlap.md

Composite tokens only matter when the KV heads of a layer want different tokens: with one KV head, or heads
that rank tokens alike, each composite token is one position shared by every head. For every context, each
layer's per-head scores come from ComposePress's default query source (``bidirectional``, without the mean
over heads that the press adds before ranking), and each head's top ``k = (1 - ratio) x n`` tokens are compared
head against head: ``overlap`` is the mean over head pairs of ``|top_k(a) & top_k(b)| / k``. Identical
rankings give 1; independent ones give ``k / n`` (``chance``).
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from kvpress_compose import ComposePress

from ..metrics.fidelity import prefill
from ..runner.run import first_contexts, load_pipeline
from ..tasks.dataset_files import load_rows
from .report import markdown

DEFAULT_RATIOS = (0.5, 0.75, 0.9, 0.95)


def top_k_overlap(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(layers,)`` mean over head pairs of the shared fraction of two heads' top-``k`` positions, from
    ``(layers, kv_heads, n)`` scores; NaN with fewer than two heads."""
    layers, heads, n = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if heads < 2:
        return torch.full((layers,), float("nan"))
    top = torch.zeros(layers, heads, n, dtype=torch.bool)
    top.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    pairs = [(top[:, a] & top[:, b]).sum(-1) / k for a, b in itertools.combinations(range(heads), 2)]
    return torch.stack(pairs).float().mean(dim=0)


def head_scores(model, context_ids: torch.Tensor) -> torch.Tensor:
    """``(layers, kv_heads, n)`` scores of one context (batch 1) from ComposePress's default query source, as
    the press ranks them before it adds the mean over heads."""
    press = ComposePress(compression_ratio=0.5, add_mean_across_heads=False)
    prefill(model, context_ids, press)
    return press.last_scores[:, 0].float()


def overlap_table(model, contexts: list[torch.Tensor], ratios: tuple[float, ...] = DEFAULT_RATIOS) -> pd.DataFrame:
    """One row per (ratio, layer): the mean top-k overlap over ``contexts`` (each ``(1, n)`` ids) and its
    chance level ``k / n``."""
    rows = []
    for context_ids in tqdm(contexts, desc="head overlap", leave=False):
        scores = head_scores(model, context_ids)
        n = scores.shape[-1]
        for ratio in ratios:
            k = max(1, math.floor((1 - ratio) * n))
            for layer, overlap in enumerate(top_k_overlap(scores, k).tolist()):
                rows.append({"ratio": ratio, "layer": layer, "overlap": overlap, "chance": k / n})
    return pd.DataFrame(rows).groupby(["ratio", "layer"], as_index=False).mean()


def context_ids(pipe, data_dir: str | Path, contexts_per_task: int) -> list[torch.Tensor]:
    """The first ``contexts_per_task`` contexts of each task, tokenized as kvpress's pipeline does."""
    rows = first_contexts(load_rows(data_dir), contexts_per_task)
    return [pipe.preprocess(context, [], "", pipe.tokenizer.model_max_length)["context_ids"]
            for context in rows["context"].unique()]


def report(table: pd.DataFrame, model: str, data_dir: str | Path, n_contexts: int) -> str:
    """The overlap table as markdown: one row per layer, one column per ratio (``overlap (chance)``)."""
    cells = table.assign(cell=[f"{o:.2f} ({c:.2f})" for o, c in zip(table["overlap"], table["chance"])])
    wide = cells.pivot(index="layer", columns="ratio", values="cell")
    wide.columns = [f"keep {1 - ratio:.0%}" for ratio in wide.columns]
    return (f"Top-k overlap between KV heads ({ComposePress().query_source} scores; 1 = the heads keep the same tokens, chance in "
            f"brackets), {n_contexts} contexts of `{Path(data_dir).name}`, model `{model}`:\n\n"
            f"{markdown(wide)}\n")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m evaluation.studies.head_overlap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id or local model folder")
    parser.add_argument("--data-dir", required=True, help="folder written by `python -m evaluation.tasks.dataset_files`")
    parser.add_argument("--contexts", type=int, default=3, help="contexts per task")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.contexts < 1:
        parser.error(f"--contexts must be >= 1, got {args.contexts}")
    if not all(0 <= ratio < 1 for ratio in args.ratios):
        parser.error(f"--ratios must be in [0, 1), got {args.ratios}")
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    contexts = context_ids(pipe, args.data_dir, args.contexts)
    text = report(overlap_table(pipe.model, contexts, tuple(args.ratios)), args.model, args.data_dir, len(contexts))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
