"""Which context entries a press keeps, per (layer, KV head), and whether a needle's tokens are among them.

A diagnostic for prose needle-in-a-haystack contexts ("One of the special magic numbers for KEY is: VALUE."):
each context is prefilled once per *scoring source*, and the per-query-head scores are recorded, before any
reduction over a KV group's query heads:

- ``kvzip``: kvpress's :class:`KVzipPress` (its chunked, prompted replay; its softmax over 4 sinks, the chunk and
  the replayed tokens), recorded as ``(layers, kv_heads, group, n)`` max-over-queries probabilities;
- any ComposePress ``query_source`` (``replay``, ``replay_prompted``, ...): its statistics
  ``(layers, kv_heads, group, n)`` as :meth:`QuerySource.layer_scores` receives them.

Allocations are then replayed offline on the recorded scores with the press's own code (so several settings cost
one prefill): ComposePress with any settings (:func:`compose_kept`), KVzip's global per-head top-k
(:func:`kvzip_kept`). A source's scores can go through another's allocation, which separates *what scores the
tokens* from *how the budget is spread*.

Usage (one thread; the recorded scores are cached under ``--cache-dir``)::

    OMP_NUM_THREADS=1 python -m evaluation.studies.kept_tokens --task niah_multikey_1 --contexts 0 1 \\
        --sources kvzip replay --ratio 0.75

prints, per context and needle, the fraction of the needle's value (and key) tokens each variant keeps, averaged
over (layer, head) and per layer.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from kvpress import KVzipPress
from transformers import DynamicCache

from kvpress_compose import ComposePress
from kvpress_compose.attention_scores import finish_scores
from kvpress_compose.compression import (
    compute_n_kept,
    head_budgets,
    post_processed,
    rank_tokens,
    stack_layer_scores,
    with_sinks_kept,
)
from kvpress_compose.query_sources import QuerySource

DATA = Path("/work/wt-study/evaluation/data/ruler-qwen2.5-0.5b-2048")
MODEL = Path.home() / ".cache/kvpress-compose/models/qwen2.5-0.5b"
NEEDLE = re.compile(r"One of the special magic numbers for (?P<key>[\w-]+) is: (?P<value>\d+)\.")


# -- recording scores -----------------------------------------------------------------------------------------


class RecordingKVzip(KVzipPress):
    """KVzipPress that also keeps its scores per query head (``group_scores``: (layers, kv_heads, group, n), max
    over the replay's queries; 0 where KVzip scores nothing: the chat template's opening) and the masks it set
    (``kept``: (layers, kv_heads, n) bool)."""

    def score_kvzip(self, module, hidden_states, keys, values, attentions, kwargs):
        sink = min(self.n_sink, self.start_idx)
        ctx_len = self.end_idx - self.start_idx
        attn = self._compute_cross_attention(module, hidden_states, keys, kwargs)  # (b, h, g, q, keys)
        per_group = attn[..., sink: sink + ctx_len].amax(dim=-2)  # (b, h, g, ctx)
        if getattr(self, "group_scores", None) is None:
            b, h, g, _ = per_group.shape
            self.group_scores = torch.zeros(len(self._layers), b, h, g, self.context_length)
        layer = int(module.layer_idx)
        self.group_scores[layer][..., self.start_idx: self.end_idx] = per_group.float()
        self.score_val[layer][..., self.start_idx: self.end_idx] = per_group.amax(dim=-2)
        return keys[:, :, : self.context_length], values[:, :, : self.context_length]

    def compress_post(self, model):
        self.recorded_scores = self.score_val.clone()
        super().compress_post(model)
        n_layers, _, heads, n = self.recorded_scores.shape
        kept = torch.ones(n_layers, heads, n, dtype=torch.bool)
        for layer in model.model.layers:
            _, head, seq = layer.self_attn.masked_key_indices
            kept[layer.self_attn.layer_idx, head.cpu(), seq.cpu()] = False
            layer.self_attn.masked_key_indices = None  # the next press must see an unmasked model
        self.kept = kept


def record_kvzip(model, context_ids: torch.Tensor, ratio: float = 0.75) -> dict:
    press = RecordingKVzip(compression_ratio=ratio)
    press._layers = model.model.layers
    press.group_scores = None
    with torch.no_grad(), press(model):
        model.model(input_ids=context_ids, past_key_values=DynamicCache())
    return {"stat": press.group_scores[:, 0], "kept": press.kept}


def record_compose(model, context_ids: torch.Tensor, query_source: str, ratio: float = 0.75, **settings) -> dict:
    """The statistics ``(layers, kv_heads, group, n)`` a ComposePress with ``query_source`` scores from, and what
    that press (with ``settings``) kept: ``kept`` (layers, kv_heads, n)."""
    recorded = {}
    original = QuerySource.layer_scores

    def layer_scores(self, run, layer_idx):
        recorded[layer_idx] = run.statistics[layer_idx][0].float().clone()
        return original(self, run, layer_idx)

    press = ComposePress(compression_ratio=ratio, query_source=query_source, **settings)
    QuerySource.layer_scores = layer_scores
    try:
        with torch.no_grad(), press(model):
            model.model(input_ids=context_ids, past_key_values=DynamicCache())
    finally:
        QuerySource.layer_scores = original
    stat = torch.stack([recorded[i] for i in sorted(recorded)])
    return {"stat": stat, "kept": kept_of(press, stat.shape[-1])}


def kept_of(press: ComposePress, n: int) -> torch.Tensor:
    """(layers, kv_heads, n) bool: what ``press`` kept in its last prefill (structured or not, batch row 0)."""
    order = torch.sort(press.last_scores, dim=-1, descending=True, stable=True).indices[:, 0]  # (L, H, n)
    budgets = press.last_budgets
    budgets = budgets[0] if budgets.dim() == 3 else budgets[:, None].expand(order.shape[:2])  # (L, H)
    ranks = torch.arange(n)
    return torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order, ranks < budgets[..., None])


# -- allocations replayed on recorded scores --------------------------------------------------------------------


def compose_kept(stat: torch.Tensor, ratio: float = 0.75, agg_task: str = "max", **settings) -> torch.Tensor:
    """(layers, kv_heads, n) bool: what a ComposePress with ``settings`` keeps given the statistics ``stat``
    (layers, kv_heads, group, n), ``agg_task`` being the one they were recorded with (one batch row, unpadded)."""
    press = ComposePress(compression_ratio=ratio, **settings)
    n_layers, heads, _, n = stat.shape
    valid = torch.ones(1, n, dtype=torch.bool)
    n_queries = torch.tensor([n])
    scores = stack_layer_scores([finish_scores(stat[i][None], n_queries, agg_task, press.agg_group)
                                 for i in range(n_layers)])  # (L, 1, H, n)
    scores = with_sinks_kept(scores, valid, press.n_sink)
    if not press.structured:
        processed = post_processed(list(scores), None, list(range(n_layers)), valid, press.compression_settings())
        sorted_scores, _ = rank_tokens(processed)
        press.last_budgets = head_budgets(sorted_scores, ratio, press.min_tokens_per_layer,
                                          per_layer=press.layer_allocation == "uniform")
        return kept_of(press, n)
    cache = DynamicCache()
    for layer in range(n_layers):
        cache.update(torch.zeros(1, heads, n, 1), torch.zeros(1, heads, n, 1), layer)
    press.compress_scored(cache, scores, compute_n_kept(n_layers * n, ratio))
    return kept_of(press, n)


def kvzip_kept(stat: torch.Tensor, ratio: float = 0.75, n_sink: int = 4, agg_group: str = "max",
               layerwise: bool = False) -> torch.Tensor:
    """(layers, kv_heads, n) bool: KVzip's allocation (sinks, then one top-k over every layer and head's raw
    scores, or per layer) on ``stat`` (layers, kv_heads, group, n) reduced over the group by ``agg_group``."""
    scores = stat.amax(dim=2) if agg_group == "max" else stat.mean(dim=2)
    scores = scores.clone()
    scores[..., :n_sink] = scores.amax() + 1.0
    n_layers, heads, n = scores.shape
    kept = torch.ones_like(scores, dtype=torch.bool)
    if layerwise:
        n_pruned = int(heads * n * ratio)
        for layer in range(n_layers):
            pruned = torch.topk(-scores[layer].reshape(-1), n_pruned).indices
            kept[layer].view(-1)[pruned] = False
        return kept
    pruned = torch.topk(-scores.reshape(-1), int(scores.numel() * ratio)).indices
    kept.view(-1)[pruned] = False
    return kept


# -- needles ------------------------------------------------------------------------------------------------------


@dataclass
class Needle:
    key: str
    value: str
    key_tokens: list[int]  # positions in the tokenized context
    value_tokens: list[int]


def templated_context(tokenizer, context: str) -> str:
    """The context as kvpress's pipeline prefills it (chat template, up to the question's separator)."""
    separator = "#" * (len(context) + 10)
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + separator}],
                                         add_generation_prompt=True, tokenize=False)
    return text.split(separator)[0]


def locate_needles(tokenizer, context: str) -> tuple[torch.Tensor, list[Needle]]:
    """The pipeline's context ids ``(1, n)`` and each needle's key and value token positions."""
    text = templated_context(tokenizer, context)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]

    def tokens(start, end):
        return [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]

    needles = [Needle(m["key"], m["value"], tokens(*m.span("key")), tokens(*m.span("value")))
               for m in NEEDLE.finditer(text)]
    return torch.tensor([encoded["input_ids"]]), needles


def needle_table(kept: torch.Tensor, needle: Needle) -> dict:
    """Fractions of the needle's value and key tokens kept: over every (layer, head), and per layer."""
    value = kept[..., needle.value_tokens].float()  # (L, H, v)
    key = kept[..., needle.key_tokens].float()
    return {
        "value": value.mean().item(),
        "key": key.mean().item(),
        "value_all_heads": (value.mean(dim=-1) == 1).float().mean().item(),  # (layer, head)s keeping every digit
        "value_per_layer": value.mean(dim=(1, 2)).tolist(),
    }


# -- answers under a kept mask (teacher-forced, one prefill for every mask) ----------------------------------------


def masked(model, kept: torch.Tensor | None):
    """Set kvpress's head-wise masks on ``model`` so attention ignores every entry ``kept`` (layers, kv_heads, n)
    leaves out (None: clear them). Masking and removing give the same attention: the kept keys keep their
    positions either way."""
    for layer_idx, layer in enumerate(model.model.layers):
        if kept is None:
            layer.self_attn.masked_key_indices = None
            continue
        head, seq = (~kept[layer_idx]).nonzero(as_tuple=True)
        layer.self_attn.masked_key_indices = (torch.zeros_like(head), head, seq)


def answer_checks(model, pipe, context: str, questions: pd.DataFrame, masks: dict[str, torch.Tensor],
                  max_new_tokens: int = 16) -> list[dict]:
    """Per question and mask: whether the compressed model's greedy tokens reproduce the uncompressed model's
    answer up to its last value digit (``same``; a sufficient condition for a correct answer), and the answer's
    log-probability. One prefill of the whole context serves every mask (each question runs on a copy).
    The uncompressed answer must contain the gold value, else the question is skipped."""
    import copy

    inputs = pipe.preprocess(context, questions["question"].tolist(), questions["answer_prefix"].tolist()
                             if len(questions) > 1 else questions["answer_prefix"].iloc[0],
                             pipe.tokenizer.model_max_length)
    context_ids = inputs["context_ids"]
    n = context_ids.shape[1]
    full = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=context_ids, past_key_values=full)
    results = []
    for question_ids, (_, row) in zip(inputs["questions_ids"], questions.iterrows()):
        value = row["answer"][0]
        cache, ids, generated = copy.deepcopy(full), question_ids, []
        with torch.no_grad():
            for step in range(max_new_tokens):  # the uncompressed greedy answer, up to its value's last digit
                start = n + (question_ids.shape[1] + step - 1 if step else 0)
                positions = torch.arange(start, start + ids.shape[1])[None]
                token = model(input_ids=ids, past_key_values=cache, position_ids=positions).logits[0, -1].argmax()
                generated.append(int(token))
                ids = token.view(1, 1)
                if value in pipe.tokenizer.decode(generated):
                    break
        if value not in pipe.tokenizer.decode(generated):
            continue
        target = torch.tensor([generated])
        full_ids = torch.cat([question_ids, target[:, :-1]], dim=1)
        positions = torch.arange(n, n + full_ids.shape[1])[None]
        for name, kept in masks.items():
            masked(model, kept)
            try:
                with torch.no_grad():
                    logits = model(input_ids=full_ids, past_key_values=copy.deepcopy(full), position_ids=positions).logits
            finally:
                masked(model, None)
            logits = logits[0, -target.shape[1]:].float().log_softmax(-1)
            predicted = logits.argmax(-1)
            results.append({"question": row["question"], "value": value, "mask": name,
                            "same": bool((predicted == target[0]).all()),
                            "logprob": logits.gather(-1, target[0][:, None]).sum().item()})
    return results


# -- CLI ------------------------------------------------------------------------------------------------------------

VARIANTS = {  # name -> (function, settings) applied to every recorded source
    "compose_default": (compose_kept, {}),
    "compose_max_group": (compose_kept, {"agg_group": "max"}),
    "compose_max_group_no_mean": (compose_kept, {"agg_group": "max", "add_mean_across_heads": False}),
    "compose_unstructured_max_no_mean_sink4": (compose_kept, {"agg_group": "max", "add_mean_across_heads": False,
                                                              "structured": False, "n_sink": 4}),
    "kvzip_alloc": (kvzip_kept, {}),
    "kvzip_alloc_mean_group": (kvzip_kept, {"agg_group": "mean"}),
}


def load(model_path: Path = MODEL):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, tokenizer


def recorded(model, tokenizer, task: str, index: int, source: str, ratio: float, cache_dir: Path) -> dict:
    path = cache_dir / f"{task}-{index}-{source}-{ratio}.pt"
    if path.exists():
        return torch.load(path)
    context = pd.read_json(DATA / f"test-{task}.jsonl", lines=True)["context"].unique()[index]
    ids, needles = locate_needles(tokenizer, context)
    result = record_kvzip(model, ids, ratio) if source == "kvzip" else record_compose(model, ids, source, ratio)
    result["needles"] = [vars(n) for n in needles]
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="niah_multikey_1")
    parser.add_argument("--contexts", type=int, nargs="+", default=[0])
    parser.add_argument("--sources", nargs="+", default=["kvzip", "replay"])
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/kept_tokens"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load()
    rows = []
    for index in args.contexts:
        for source in args.sources:
            rec = recorded(model, tokenizer, args.task, index, source, args.ratio, args.cache_dir)
            needles = [Needle(**n) for n in rec["needles"]]
            variants = {"actual": rec["kept"]}
            variants.update({name: fn(rec["stat"], args.ratio, **kw) for name, (fn, kw) in VARIANTS.items()})
            for name, kept in variants.items():
                for needle in needles:
                    table = needle_table(kept, needle)
                    rows.append({"context": index, "source": source, "variant": name, "needle": needle.key,
                                 "value": table["value"], "key": table["key"],
                                 "value_all_heads": table["value_all_heads"]})
    frame = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(frame.groupby(["source", "variant"])[["value", "key", "value_all_heads"]].mean().round(3))


if __name__ == "__main__":
    main()
