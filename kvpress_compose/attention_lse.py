"""The log-sum-exp of the model's own attention, kept while ComposePress scores, so scoring needs no softmax.

A token's attention probability is ``exp(q . k * scale - lse(q))``. The prefill (and the replay pass) already
compute ``lse`` inside their attention call, and on CPU torch's flash kernel returns it. Taking it from
there leaves scoring one matrix product and a max per key, without the exponentials and second reduction of
a softmax. :func:`install` wraps transformers' ``"sdpa"`` attention function (as kvpress wraps it for its
head-wise masking): on a module whose ``CAPTURE_ATTRIBUTE`` is set, it runs the same attention through
that kernel and leaves the log-sum-exp, with the queries and keys it was taken over, on
``module.<LSE_ATTRIBUTE>``; every other call goes through as before. Scoring uses those queries and keys, so
nothing is recomputed and the three always match, whatever a cache (QuantizedCache) or an earlier press
(ThinK) does to the stored keys. "bidirectional" needs the log-sum-exp over every key:
:func:`bidirectional_lse` adds one causal kernel call over the reversed sequence.
The replay pass attends to the whole context plus the re-fed tokens causally. Without padding, ComposePress
says so with ``VISIBLE_PREFIX_ATTRIBUTE`` (the number of keys every query sees), and the call runs as two
unmasked kernel calls, the visible prefix and the square causal rest, merged by their log-sum-exps: no mask is
read or converted, and the kernel's causal skipping applies to the rest. Where every layer is sure to take that
split (:func:`split_possible`), the replay re-feeds the context in one pass with a placeholder mask, and
``MASK_IGNORED_ATTRIBUTE`` makes any call that would read the placeholder raise instead.
Where the kernel is unavailable (CUDA, eager, flash-attn) nothing is captured and scoring computes the
softmax itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CAPTURE_ATTRIBUTE = "compose_capture_lse"
LSE_ATTRIBUTE = "compose_lse"  # a Captured
VISIBLE_PREFIX_ATTRIBUTE = "compose_visible_prefix"  # keys every query of the call sees; the rest are causal
MASK_IGNORED_ATTRIBUTE = "compose_mask_ignored"  # the call's mask is a placeholder: only the split is correct
WRAPPED_ATTRIBUTE = "_compose_wraps"
KERNEL_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 9)  # CPU flash GQA: 2.9


class Captured(NamedTuple):
    """One attention call's log-sum-exp, with the queries and keys it was taken over."""

    lse: torch.Tensor  # (batch, q_heads, q_len) float32, natural log
    queries: torch.Tensor  # (batch, q_heads, q_len, head_dim), rotated, not scaled
    keys: torch.Tensor  # (batch, kv_heads, k_len, head_dim)
    scale: float  # the logits' scale the kernel used

    def query_blocks(self):
        """The queries as :func:`kvpress_compose.attention_scores.query_blocks` gives them: float32, scaled."""
        return lambda start, end: self.queries[:, :, start:end].float() * self.scale


def capture_supported(module: nn.Module, query, key, attention_mask, dropout: float, kwargs: dict) -> bool:
    return (
        getattr(module, CAPTURE_ATTRIBUTE, False)
        and query.device.type == "cpu"
        and (attention_mask is not None or query.shape[2] == key.shape[2])  # no mask: causal, square only
        and dropout == 0.0
        and getattr(module, "masked_key_indices", None) is None  # kvpress's head-wise masking is not active
        and not kwargs.get("output_attentions", False)
    )


def split_possible(module: nn.Module) -> bool:
    """Whether the module's next attention call can run as the unmasked split, whatever its mask: the wrapper
    is the module's attention function, it captures, on CPU, without dropout or kvpress's head-wise masking."""
    return (
        getattr(module, CAPTURE_ATTRIBUTE, False)
        and getattr(getattr(module, "config", None), "_attn_implementation", None) == "sdpa"
        and all(parameter.device.type == "cpu" for parameter in module.parameters())
        and not (module.training and getattr(module, "attention_dropout", 0.0) > 0)
        and getattr(module, "masked_key_indices", None) is None
        and getattr(module, "is_causal", True)
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
        supported = capture_supported(module, query, key, attention_mask, dropout, kwargs)
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        n_prefix = getattr(module, VISIBLE_PREFIX_ATTRIBUTE, None)
        split = supported and is_causal and n_prefix is not None and key.shape[2] - n_prefix == query.shape[2]
        if getattr(module, MASK_IGNORED_ATTRIBUTE, False) and not split:
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
        setattr(module, LSE_ATTRIBUTE, Captured(lse.float(), query, key, scale))
        return output.transpose(1, 2).contiguous(), None

    setattr(sdpa_with_lse, WRAPPED_ATTRIBUTE, sdpa_forward)
    return sdpa_with_lse


def install() -> None:
    """Wrap the registered ``"sdpa"`` attention function once per process."""
    if not hasattr(ALL_ATTENTION_FUNCTIONS["sdpa"], WRAPPED_ATTRIBUTE):
        ALL_ATTENTION_FUNCTIONS["sdpa"] = wrap_sdpa(ALL_ATTENTION_FUNCTIONS["sdpa"])


def set_capture(modules: list[nn.Module], enabled: bool) -> None:
    """Start or stop capturing the log-sum-exp on these attention modules, forgetting any left over."""
    for module in modules:
        setattr(module, CAPTURE_ATTRIBUTE, enabled)
        for attribute in (LSE_ATTRIBUTE, VISIBLE_PREFIX_ATTRIBUTE, MASK_IGNORED_ATTRIBUTE):
            module.__dict__.pop(attribute, None)


def set_visible_prefix(modules: list[nn.Module], n_prefix: int | None, mask_ignored: bool = False) -> None:
    """Declare that the next attention call of each module shows every query its first ``n_prefix`` keys and
    the rest causally (None: the mask says what is visible). ``mask_ignored``: the call's mask is a placeholder,
    so any attention other than that split raises instead of reading it."""
    for module in modules:
        setattr(module, VISIBLE_PREFIX_ATTRIBUTE, n_prefix)
        setattr(module, MASK_IGNORED_ATTRIBUTE, mask_ignored)


def take_lse(module: nn.Module, batch: int, q_len: int) -> Captured | None:
    """What the module's last attention call captured, if it covered ``batch x q_len`` queries; removed from
    the module."""
    captured = module.__dict__.pop(LSE_ATTRIBUTE, None)
    if captured is None or captured.lse.shape[0] != batch or captured.lse.shape[2] != q_len:
        return None
    return captured


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
