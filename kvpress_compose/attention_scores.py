"""Per-token attention scores from recomputed queries, in bounded memory (step 1 of KVCompose).

The attention module's output does not expose its attention probabilities (sdpa and flash never build them),
so the queries are recomputed from the hook's ``hidden_states`` (projection, q_norm where the model has one,
the model's own RoPE) and softmax statistics are taken against the layer's keys a block of queries at a time:
memory is O(block x n_keys) per layer instead of O(n_queries x n_keys).
"""

from __future__ import annotations

import sys

import torch
from kvpress.utils import get_prerope_query_states
from torch import nn

MIN_BLOCK = 16  # queries per block at least, so that small caches do not mean thousands of tiny steps
AGGREGATIONS = ("max", "mean")


def recompute_queries(module: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The attention module's rotated queries, ``(batch, q_heads, q_len, head_dim)``, in float32."""
    if position_embeddings is None:
        raise ValueError(
            f"{type(module).__name__} received no rotary position_embeddings: ComposePress supports RoPE models "
            "(Llama, Mistral, Qwen2, Qwen3, Phi3)"
        )
    queries = get_prerope_query_states(module, hidden_states)
    cos, sin = position_embeddings
    apply_rotary_pos_emb = sys.modules[type(module).__module__].apply_rotary_pos_emb
    queries, _ = apply_rotary_pos_emb(queries, queries, cos, sin)
    return queries.float()


def aggregate(x: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    return x.amax(dim=dim) if how == "max" else x.mean(dim=dim)


def attention_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor,
    query_valid: torch.Tensor,
    *,
    scaling: float,
    n_scored: int,
    causal_offset: int | None,
    agg_task: str,
    agg_group: str,
    block_bytes: int,
    block_size: int | None = None,
) -> torch.Tensor:
    """Score the first ``n_scored`` keys by the attention the queries pay them.

    ``s[b, h, i] = agg_group over the query heads of KV head h of (agg_task over valid queries q of
    softmax(q . k / sqrt(d))[i])``.

    Parameters
    ----------
    queries : (batch, q_heads, q_len, head_dim), rotated.
    keys : (batch, kv_heads, n_keys, head_dim), rotated, as stored in the cache.
    key_valid, query_valid : (batch, n_keys) and (batch, q_len) booleans; padding is False.
    causal_offset : None for no causal mask; else query q sees key j iff ``j <= q + causal_offset``.
    block_bytes : size of the float32 attention block to aim for; sets the block size when it is None.
    block_size : queries per block (at least ``MIN_BLOCK`` when derived from ``block_bytes``).

    Returns
    -------
    (batch, kv_heads, n_scored) float32 scores.
    """
    batch, q_heads, q_len, head_dim = queries.shape
    kv_heads, n_keys = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    queries = queries.view(batch, kv_heads, group, q_len, head_dim) * scaling
    keys = keys.float()
    block_size = block_size or max(MIN_BLOCK, block_bytes // (4 * batch * q_heads * n_keys))
    stat = torch.zeros(batch, kv_heads, group, n_scored, device=keys.device)
    key_index = torch.arange(n_keys, device=keys.device)
    all_queries_valid = bool(query_valid.all())
    for start in range(0, q_len, block_size):
        end = min(start + block_size, q_len)
        # keys beyond the block's last visible one never matter: skip them (halves causal work)
        n_visible = n_keys if causal_offset is None else min(n_keys, causal_offset + end)
        # one (batch, kv_heads, group, block, n_visible) buffer, turned into probabilities in place
        probs = torch.einsum("bhgqd,bhkd->bhgqk", queries[:, :, :, start:end], keys[:, :, :n_visible])
        hidden = ~key_valid[:, None, None, None, :n_visible]
        if causal_offset is not None:
            query_index = torch.arange(start, end, device=keys.device)[:, None]
            hidden = hidden | (key_index[None, :n_visible] > query_index + causal_offset)
        probs.masked_fill_(hidden, float("-inf"))
        probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
        probs.div_(probs.sum(dim=-1, keepdim=True))
        scored = min(n_scored, n_visible)
        probs = probs[..., :scored]
        if not all_queries_valid:  # padding queries (rows of NaN) take no part
            probs.masked_fill_(~query_valid[:, None, None, start:end, None], 0.0)
        if agg_task == "max":
            stat[..., :scored] = torch.maximum(stat[..., :scored], probs.amax(dim=3))
        else:
            stat[..., :scored] += probs.sum(dim=3)
    if agg_task == "mean":
        stat /= query_valid.sum(dim=-1).clamp(min=1)[:, None, None, None]
    return aggregate(stat, agg_group, dim=2)
