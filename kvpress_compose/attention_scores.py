"""Per-token attention scores from recomputed queries, in bounded memory (step 1 of KVCompose).

The attention module's output does not expose its attention probabilities (sdpa and flash never build them),
so the queries are recomputed from the hook's ``hidden_states`` (projection, q_norm where the model has one,
the model's own RoPE) and scored against the layer's keys a block at a time: memory is O(block x n_keys) per
layer instead of O(n_queries x n_keys). When the model's own attention call left each query's log-sum-exp
with its queries and keys (:mod:`kvpress_compose.attention_lse`), nothing is recomputed and
:func:`statistics_from_lse` needs no softmax: a log-probability is ``q . k - lse``, one matrix product per
cache-sized tile. Otherwise :func:`attention_statistics` takes the softmax of each block itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from kvpress.utils import get_prerope_query_states
from torch import nn

QueryBlocks = Callable[[int, int], torch.Tensor]
MIN_BLOCK = 16  # queries per block at least, so that small caches do not mean thousands of tiny steps
PROJECTION_ROWS = 256  # queries are projected this many at a time (small matmuls are slow), scored per block
TILE_COLUMNS, TILE_KEYS = 256, 512  # (query x head) columns and keys of one tile of the log-sum-exp path
AGGREGATIONS = ("max", "mean")
# model types whose queries kvpress's get_prerope_query_states recomputes exactly (projection, per-head q_norm,
# RoPE); others (OLMo2's full-width q_norm, ...) would be scored with other queries than attention used
EXACT_QUERY_RECOMPUTATION = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")


# the one causal visibility rule, shared by scoring (softmax and log-sum-exp paths) and the per-layer masks
def causally_visible(queries: range, keys: range, causal_offset: int | None, device=None) -> torch.Tensor:
    """``(len(queries), len(keys))`` booleans: query ``q`` sees key ``j`` iff ``j <= q + causal_offset``
    (``causal_offset=None``: every key). Padding is the caller's to add."""
    if causal_offset is None:
        return torch.ones(len(queries), len(keys), dtype=torch.bool, device=device)
    query_index = torch.arange(queries.start, queries.stop, device=device)[:, None]
    key_index = torch.arange(keys.start, keys.stop, device=device)[None, :]
    return key_index <= query_index + causal_offset


def recompute_queries(module: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The attention module's rotated, scaled queries, ``(batch, q_heads, q_len, head_dim)``, in float32."""
    queries = get_prerope_query_states(module, hidden_states)
    cos, sin = position_embeddings
    apply_rotary_pos_emb = sys.modules[type(module).__module__].apply_rotary_pos_emb
    queries, _ = apply_rotary_pos_emb(queries, queries, cos, sin)
    return queries.float() * module.scaling


def query_blocks(module: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> QueryBlocks:
    """Queries of positions ``[start, end)`` on demand, so that only one block of them exists at a time."""
    model_type = getattr(module.config, "model_type", None)
    if model_type not in EXACT_QUERY_RECOMPUTATION:
        raise ValueError(
            f"ComposePress cannot recompute the queries of a {model_type!r} model exactly (it does for "
            f"{', '.join(EXACT_QUERY_RECOMPUTATION)}), and this scoring path needs them: load the model with "
            "attn_implementation='sdpa' on CPU with query_source='prefill' or 'bidirectional' (scores from the "
            "queries attention used), or give a scorer"
        )
    if getattr(module.config, "attn_logit_softcapping", None):
        raise ValueError(
            f"{type(module).__name__} caps its attention logits (attn_logit_softcapping), which recomputed scores "
            "would not: use attn_implementation='sdpa' on CPU with query_source='prefill' or 'bidirectional', or "
            "give a scorer"
        )
    if position_embeddings is None:
        raise ValueError(
            f"{type(module).__name__} received no rotary position_embeddings: ComposePress supports RoPE models "
            "(Llama, Mistral, Qwen2, Qwen3, Phi3)"
        )
    if not (isinstance(position_embeddings, tuple) and len(position_embeddings) == 2):
        raise ValueError(
            f"{type(module).__name__} passes its rotary embedding in another form than (cos, sin), so ComposePress "
            "cannot recompute its queries: use query_source='prefill' or 'bidirectional' with "
            "attn_implementation='sdpa' on CPU (scores from the queries attention saw), or a scorer"
        )
    cos, sin = position_embeddings
    projected = {"start": 0, "end": 0, "queries": None}  # the current chunk of PROJECTION_ROWS queries

    def block(start: int, end: int) -> torch.Tensor:
        if not projected["start"] <= start < end <= projected["end"]:
            chunk_end = max(end, min(start + PROJECTION_ROWS, hidden_states.shape[1]))
            rotary = (cos[:, start:chunk_end], sin[:, start:chunk_end])
            queries = recompute_queries(module, hidden_states[:, start:chunk_end], rotary)
            projected.update(start=start, end=chunk_end, queries=queries)
        offset = projected["start"]
        return projected["queries"][:, :, start - offset : end - offset]

    return block


def aggregate(x: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    return x.amax(dim=dim) if how == "max" else x.mean(dim=dim)


def attention_statistics(
    queries: QueryBlocks,
    q_len: int,
    q_heads: int,
    keys: torch.Tensor,
    key_valid: torch.Tensor,
    query_valid: torch.Tensor,
    *,
    n_scored: int,
    causal_offset: int | None,
    agg_task: str,
    block_bytes: int,
    block_size: int | None = None,
) -> torch.Tensor:
    """Per query head, the attention the valid queries pay each of the first ``n_scored`` keys:
    the max (``agg_task="max"``) or the sum ("mean") over queries of ``softmax(q . k / sqrt(d))[i]``.
    Statistics of several query sets merge with :func:`merge_statistics`; :func:`finish_scores` turns them
    into scores.

    Parameters
    ----------
    queries : ``queries(start, end)`` gives the rotated, scaled queries ``(batch, q_heads, end - start, head_dim)``
        of ``q_len`` query positions.
    keys : (batch, kv_heads, n_keys, head_dim), rotated, as stored in the cache.
    key_valid, query_valid : (batch, n_keys) and (batch, q_len) booleans; padding is False.
    causal_offset : None for no causal mask; else query q sees key j iff ``j <= q + causal_offset``.
    block_bytes : size of the float32 attention block to aim for; sets the block size when it is None.
    block_size : queries per block (at least ``MIN_BLOCK`` when derived from ``block_bytes``).

    Returns
    -------
    (batch, kv_heads, group, n_scored) float32 statistics.
    """
    batch, kv_heads, n_keys, head_dim = keys.shape
    group = q_heads // kv_heads
    keys = keys.float().flatten(0, 1)  # (batch * kv_heads, n_keys, head_dim)
    key_valid = None if bool(key_valid.all()) else key_valid
    all_queries_valid = bool(query_valid.all())
    block_size = block_size or max(MIN_BLOCK, block_bytes // (4 * batch * q_heads * n_keys))
    stat = torch.full((batch, kv_heads, group, n_scored), float("-inf") if agg_task == "max" else 0.0,
                      device=keys.device)
    for start in range(0, q_len, block_size):
        end = min(start + block_size, q_len)
        rows = end - start
        # keys beyond the block's last visible one never matter: skip them (halves causal work)
        n_visible = n_keys if causal_offset is None else min(n_keys, causal_offset + end)
        bias = visibility_bias(start, end, n_visible, causal_offset, key_valid, group, kv_heads, keys.device)
        # log-probabilities of one (batch * kv_heads, group * rows, n_visible) block, in place
        block = queries(start, end).reshape(batch * kv_heads, group * rows, head_dim)
        logits = torch.baddbmm(bias, block, keys[:, :n_visible].transpose(1, 2))
        logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
        log_probs = logits.view(batch, kv_heads, group, rows, n_visible)[..., :n_scored]
        if not all_queries_valid:  # padding queries (rows of NaN) take no part
            log_probs.masked_fill_(~query_valid[:, None, None, start:end, None], float("-inf"))
        scored = log_probs.shape[-1]
        if agg_task == "max":  # max of probabilities = exp of the max log-probability
            stat[..., :scored] = torch.maximum(stat[..., :scored], log_probs.amax(dim=3))
        else:
            stat[..., :scored] += log_probs.exp().sum(dim=3)
    return stat.exp() if agg_task == "max" else stat


def query_columns(queries: QueryBlocks, start: int, end: int, batch_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Queries ``[start, end)`` as ``(batch * kv_heads, head_dim, group * rows)`` columns: ``keys @ columns``
    gives one tile's logits with the key axis first, ready to reduce over queries."""
    return queries(start, end).reshape(batch_kv_heads, -1, head_dim).transpose(1, 2)


def statistics_from_lse(
    queries: QueryBlocks,
    lse: torch.Tensor,
    keys: torch.Tensor,
    query_valid: torch.Tensor,
    *,
    n_scored: int,
    causal_offset: int | None,
    agg_task: str,
) -> torch.Tensor:
    """The statistics of :func:`attention_statistics`, given each query's attention log-sum-exp ``lse``
    ``(batch, q_heads, q_len)`` over the keys it saw (from the model's own attention call): a log-probability
    is then ``q . k - lse``, so each small tile of queries x keys is one matrix product and a reduction, with
    no softmax. Keys the queries never saw (padding) get meaningless statistics: the caller masks them.
    """
    batch, kv_heads, _, head_dim = keys.shape
    q_heads, q_len = lse.shape[1:]
    group = q_heads // kv_heads
    keys = keys[:, :, :n_scored].float().flatten(0, 1)  # (batch * kv_heads, n_scored, head_dim)
    neg_lse = (-lse).masked_fill(~query_valid[:, None].to(lse.device), float("-inf"))  # padding takes no part
    neg_lse = neg_lse.reshape(batch * kv_heads, group, q_len)
    stat = torch.full((batch * kv_heads, n_scored, group), float("-inf") if agg_task == "max" else 0.0,
                      device=keys.device)
    rows = max(1, TILE_COLUMNS // group)
    for start in range(0, q_len, rows):
        end = min(start + rows, q_len)
        block = query_columns(queries, start, end, batch * kv_heads, head_dim)
        bias = neg_lse[:, :, start:end].reshape(batch * kv_heads, 1, group * (end - start))
        n_visible = n_scored if causal_offset is None else min(n_scored, causal_offset + end)
        seen_by_all = n_visible if causal_offset is None else min(n_visible, causal_offset + start + 1)
        # key tiles every query of the block sees, then the few keys on the causal diagonal
        tiles = [(k, min(k + TILE_KEYS, seen_by_all)) for k in range(0, seen_by_all, TILE_KEYS)]
        for key_start, key_end in tiles + ([(seen_by_all, n_visible)] if seen_by_all < n_visible else []):
            # (batch * kv_heads, tile keys, group, rows) log-probabilities
            log_probs = torch.baddbmm(bias, keys[:, key_start:key_end], block)
            log_probs = log_probs.view(-1, key_end - key_start, group, end - start)
            if key_end > seen_by_all:  # (keys, 1, rows): the diagonal tile's hidden (key, query) pairs
                visible = causally_visible(range(start, end), range(key_start, key_end), causal_offset, keys.device)
                log_probs.masked_fill_(~visible.T[:, None, :], float("-inf"))
            tile = stat[:, key_start:key_end]
            if agg_task == "max":
                torch.maximum(tile, log_probs.amax(dim=-1), out=tile)
            else:
                tile += log_probs.exp_().sum(dim=-1)
    stat = stat.view(batch, kv_heads, n_scored, group).transpose(2, 3)
    return stat.exp() if agg_task == "max" else stat


def merge_statistics(a: torch.Tensor | None, b: torch.Tensor, agg_task: str) -> torch.Tensor:
    """Statistics of two query sets combined (max or sum)."""
    if a is None:
        return b
    return torch.maximum(a, b) if agg_task == "max" else a + b


def finish_scores(stat: torch.Tensor, n_queries: torch.Tensor, agg_task: str, agg_group: str) -> torch.Tensor:
    """``s[b, h, i] = agg_group over the query heads of KV head h of (agg_task over queries)``:
    ``(batch, kv_heads, n)`` from ``(batch, kv_heads, group, n)`` statistics of ``n_queries`` (batch,) queries."""
    if agg_task == "mean":
        stat = stat / n_queries.clamp(min=1).to(stat.device)[:, None, None, None]
    return aggregate(stat, agg_group, dim=2)


def visibility_bias(start, end, n_visible, causal_offset, key_valid, group, kv_heads, device) -> torch.Tensor:
    """Additive mask (0 or -inf) of queries ``[start, end)`` repeated over the ``group`` query heads of a KV
    head: ``(group * rows, n_visible)``, or ``(batch * kv_heads, group * rows, n_visible)`` with key padding."""
    hidden = ~causally_visible(range(start, end), range(n_visible), causal_offset, device)
    if key_valid is not None:
        hidden = hidden | ~key_valid[:, None, :n_visible].to(device)  # (batch, rows, n_visible)
    bias = torch.zeros(hidden.shape, device=device).masked_fill_(hidden, float("-inf"))
    bias = bias.repeat(*([1] * (bias.dim() - 2)), group, 1)  # rows follow the (group, rows) query order
    return bias if key_valid is None else bias.repeat_interleave(kv_heads, dim=0)
