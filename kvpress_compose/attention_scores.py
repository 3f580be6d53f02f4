"""Per-token attention statistics for scoring (step 1 of KVCompose), and the log-sum-exp capture that makes
them cheap.

The attention module's output does not expose its attention probabilities (sdpa and flash never build them).
There are two ways to get them, both in bounded memory:

- **From the model's own log-sum-exp** (the fast path). A token's attention probability is
  ``exp(q . k * scale - lse(q))``; the prefill (and the replay pass) already compute ``lse`` inside their
  attention call, and on CPU torch's flash kernel returns it. :func:`install_lse_capture` wraps transformers'
  ``"sdpa"`` attention function (as kvpress wraps it for its head-wise masking) when a press is first used on a
  model. An
  :class:`LseCapture` is a context over some attention modules: while it is open, the wrapper runs those
  modules' attention through that kernel and leaves the log-sum-exp, with the queries and keys it was taken
  over, in the capture (:meth:`LseCapture.take`); every other call goes through as before, and closing the
  capture forgets everything it held. :func:`statistics_from_lse` then needs no softmax: a log-probability is
  ``q . k - lse``, one matrix product per cache-sized tile, over the very queries and keys attention used
  (whatever a cache (QuantizedCache) or an earlier press (ThinK) does to the stored keys). "bidirectional"
  needs the log-sum-exp over every key: :func:`bidirectional_lse` adds one causal kernel call over the reversed
  sequence. The replay pass attends to the whole context plus the re-fed tokens causally; without padding it
  says so with :meth:`LseCapture.declare_visible_prefix` (the number of keys every query sees), and the call
  runs as two unmasked kernel calls, the visible prefix and the square causal rest, merged by their
  log-sum-exps. Where every layer is sure to take that split (:meth:`LseCapture.split_possible`), the replay
  re-feeds the context in one pass with a placeholder mask, and any call that would read the placeholder
  raises instead.
- **From recomputed queries** (where the kernel is unavailable: CUDA, eager, flash-attn). The queries are
  recomputed from the hook's ``hidden_states`` (projection, q_norm where the model has one, the model's own
  RoPE) and scored against the layer's keys a block at a time, memory O(block x n_keys) per layer instead of
  O(n_queries x n_keys): :func:`attention_statistics` takes the softmax of each block itself.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from kvpress.utils import get_prerope_query_states
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

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


# -- the log-sum-exp of the model's own attention, captured while ComposePress scores --------------------------

WRAPPED_ATTRIBUTE = "_compose_wraps"  # on our wrapper: the sdpa function it wraps
KERNEL_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 9)  # CPU flash GQA: 2.9


class Captured(NamedTuple):
    """One attention call's log-sum-exp, with the queries and keys it was taken over."""

    lse: torch.Tensor  # (batch, q_heads, q_len) float32, natural log
    queries: torch.Tensor  # (batch, q_heads, q_len, head_dim), rotated, not scaled
    keys: torch.Tensor  # (batch, kv_heads, k_len, head_dim)
    scale: float  # the logits' scale the kernel used

    def query_blocks(self):
        """The queries as :func:`query_blocks` gives them: float32, scaled."""
        return lambda start, end: self.queries[:, :, start:end].float() * self.scale


class LseCapture:
    """While open (``with LseCapture(modules):``), the wrapped sdpa leaves the log-sum-exp of these attention
    modules' calls here, for :meth:`take`; on exit it forgets everything it held and the modules attend as
    before. ``visible_prefix`` and ``mask_ignored`` describe the next calls (see :meth:`declare_visible_prefix`).
    """

    def __init__(self, modules: list[nn.Module]):
        self.modules = [weakref.ref(module) for module in modules]  # a capture never keeps a model alive
        self.captured: weakref.WeakKeyDictionary[nn.Module, Captured] = weakref.WeakKeyDictionary()
        self.visible_prefix: int | None = None
        self.mask_ignored = False

    def __enter__(self) -> LseCapture:  # noqa: PYI034 - typing.Self needs Python 3.11
        for module in map(weakref.ref.__call__, self.modules):
            if module is not None:
                ACTIVE_CAPTURES[module] = self
        return self

    def __exit__(self, *exc_info) -> None:
        for module in map(weakref.ref.__call__, self.modules):
            if module is not None and ACTIVE_CAPTURES.get(module) is self:
                del ACTIVE_CAPTURES[module]
        self.captured.clear()

    def declare_visible_prefix(self, n_prefix: int | None, mask_ignored: bool = False) -> None:
        """The next attention call of each module shows every query its first ``n_prefix`` keys and the rest
        causally (None: the mask says what is visible). ``mask_ignored``: the call's mask is a placeholder, so
        any attention other than that split raises instead of reading it."""
        self.visible_prefix, self.mask_ignored = n_prefix, mask_ignored

    def take(self, module: nn.Module, batch: int, q_len: int) -> Captured | None:
        """What the module's last attention call captured, if it covered ``batch x q_len`` queries; forgotten
        here once taken."""
        captured = self.captured.pop(module, None)
        if captured is None or captured.lse.shape[0] != batch or captured.lse.shape[2] != q_len:
            return None
        return captured

    def split_possible(self, module: nn.Module) -> bool:
        """Whether the module's next attention call can run as the unmasked split, whatever its mask: the
        wrapper is the module's attention function, this capture is open on it, on CPU, without dropout or
        kvpress's head-wise masking."""
        return (
            ACTIVE_CAPTURES.get(module) is self
            and getattr(getattr(module, "config", None), "_attn_implementation", None) == "sdpa"
            and hasattr(ALL_ATTENTION_FUNCTIONS["sdpa"], WRAPPED_ATTRIBUTE)
            and all(parameter.device.type == "cpu" for parameter in module.parameters())
            and not (module.training and getattr(module, "attention_dropout", 0.0) > 0)
            and getattr(module, "masked_key_indices", None) is None
            and getattr(module, "is_causal", True)
        )


# attention module -> the capture open on it; weak, so a capture never keeps a model alive
ACTIVE_CAPTURES: weakref.WeakKeyDictionary[nn.Module, LseCapture] = weakref.WeakKeyDictionary()


def capture_supported(module: nn.Module, query, key, attention_mask, dropout: float, kwargs: dict) -> bool:
    return (
        query.device.type == "cpu"
        and (attention_mask is not None or query.shape[2] == key.shape[2])  # no mask: causal, square only
        and dropout == 0.0
        and getattr(module, "masked_key_indices", None) is None  # kvpress's head-wise masking is not active
        and not kwargs.get("output_attentions", False)
    )


def additive_mask(attention_mask: torch.Tensor | None, key_length: int, dtype: torch.dtype) -> torch.Tensor | None:
    """transformers' 4D mask (boolean: True = visible, or additive) as the additive mask the kernel takes."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, :, :, :key_length]
    if attention_mask.dtype == torch.bool:
        visible, hidden = torch.zeros((), dtype=dtype), torch.full((), float("-inf"), dtype=dtype)
        return torch.where(attention_mask, visible, hidden)
    return attention_mask.to(dtype)


def flash_attention(query, key, value, is_causal: bool, attention_mask=None, scale=None):
    """``(output (batch, q_heads, q_len, head_dim), lse (batch, q_heads, q_len))`` from torch's CPU kernel."""
    group = query.shape[1] // key.shape[1]
    if group > 1 and not KERNEL_HAS_GQA:  # from torch 2.9 the kernel takes (batch, kv_heads, ...) keys itself
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=additive_mask(attention_mask, key.shape[2], query.dtype),
        scale=scale,
    )


def prefix_and_causal_attention(query, key, value, n_prefix: int, scale=None):
    """Attention where every query sees the first ``n_prefix`` keys and the rest (as many as the queries)
    causally: two unmasked kernel calls merged by their log-sum-exps."""
    prefix_output, prefix_lse = flash_attention(query, key[:, :, :n_prefix], value[:, :, :n_prefix], False, None, scale)
    rest_output, rest_lse = flash_attention(query, key[:, :, n_prefix:], value[:, :, n_prefix:], True, None, scale)
    lse = torch.logaddexp(prefix_lse, rest_lse)  # (batch, q_heads, q_len)
    output = prefix_output * (prefix_lse - lse).exp()[..., None] + rest_output * (rest_lse - lse).exp()[..., None]
    return output.to(query.dtype), lse  # the kernel's log-sum-exp is float32 whatever the inputs


def wrap_sdpa(sdpa_forward):
    def sdpa_with_lse(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
        capture = ACTIVE_CAPTURES.get(module)
        if capture is None:
            return sdpa_forward(module, query, key, value, attention_mask, dropout, **kwargs)
        supported = capture_supported(module, query, key, attention_mask, dropout, kwargs)
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        n_prefix = capture.visible_prefix
        split = supported and is_causal and n_prefix is not None and key.shape[2] - n_prefix == query.shape[2]
        if capture.mask_ignored and not split:
            raise RuntimeError(f"{type(module).__name__}: the replay's placeholder mask reached attention "
                               "that reads it (please report this)")
        if not supported:
            return sdpa_forward(module, query, key, value, attention_mask, dropout, **kwargs)
        scale = kwargs.get("scaling")
        scale = query.shape[-1] ** -0.5 if scale is None else scale  # the kernel's default, made explicit
        if split:
            output, lse = prefix_and_causal_attention(query, key, value, n_prefix, scale)
        else:
            output, lse = flash_attention(query, key, value, attention_mask is None and is_causal, attention_mask,
                                          scale)
        capture.captured[module] = Captured(lse.float(), query, key, scale)
        return output.transpose(1, 2).contiguous(), None

    setattr(sdpa_with_lse, WRAPPED_ATTRIBUTE, sdpa_forward)
    return sdpa_with_lse


def install_lse_capture() -> None:
    """Wrap the registered ``"sdpa"`` attention function once per process (called when a press is first used on
    a model); the wrapper passes every call through unless an :class:`LseCapture` is open on the module."""
    if not hasattr(ALL_ATTENTION_FUNCTIONS["sdpa"], WRAPPED_ATTRIBUTE):
        ALL_ATTENTION_FUNCTIONS["sdpa"] = wrap_sdpa(ALL_ATTENTION_FUNCTIONS["sdpa"])


def bidirectional_lse(captured: Captured, key_valid: torch.Tensor) -> torch.Tensor:
    """``(batch, q_heads, n)`` log-sum-exp of each query of a causal self-attention call over every valid key.

    One causal kernel call over the reversed sequence gives each query's log-sum-exp over its own key and the
    later ones; with the causal one, which also counts its own key, the total is
    ``exp(causal) + exp(reversed) - exp(own logit)``. The subtraction loses no precision: the total is at
    least the larger of the two sums. Rows of padding queries come out meaningless (the caller masks them)."""
    queries, keys = captured.queries, captured.keys
    batch, kv_heads, n, head_dim = keys.shape
    key_mask = None if bool(key_valid.all()) else key_valid.flip(1)[:, None, None, :].to(keys.device)
    reversed_keys = keys.flip(2)
    reversed_lse = flash_attention(queries.flip(2), reversed_keys, reversed_keys, True, key_mask, captured.scale)[1]
    del reversed_keys
    reversed_lse = reversed_lse.flip(2).float()
    grouped_queries = queries.view(batch, kv_heads, -1, n, head_dim)  # (batch, kv_heads, group, n, head_dim)
    own_logit = torch.einsum("bkgnd,bknd->bkgn", grouped_queries.float(), keys.float()).flatten(1, 2) * captured.scale
    causal_lse = captured.lse
    top = torch.maximum(causal_lse, reversed_lse)
    total = (causal_lse - top).exp() + (reversed_lse - top).exp() - (own_logit - top).exp()
    return top + total.log()
