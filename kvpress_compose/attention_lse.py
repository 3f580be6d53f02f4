"""The log-sum-exp of the model's own attention, kept while ComposePress scores, so scoring needs no softmax.

A token's attention probability is ``exp(q . k * scale - lse(q))``. The prefill (and the replay pass) already
compute ``lse`` inside their attention call, and on CPU torch's flash kernel returns it. Taking it from
there leaves scoring one matrix product and a max per key, without the exponentials and second reduction of
a softmax. :func:`install` wraps transformers' ``"sdpa"`` attention function (as kvpress wraps it for its
head-wise masking) when a press is first used on a model. An :class:`LseCapture` is a context over some
attention modules: while it is open, the wrapper runs those modules' attention through that kernel and leaves
the log-sum-exp, with the queries and keys it was taken over, in the capture (:meth:`LseCapture.take`); every
other call goes through as before, and closing the capture forgets everything it held. Scoring uses those
queries and keys, so nothing is recomputed and the three always match, whatever a cache (QuantizedCache) or an
earlier press (ThinK) does to the stored keys. "bidirectional" needs the log-sum-exp over every key:
:func:`bidirectional_lse` adds one causal kernel call over the reversed sequence.
The replay pass attends to the whole context plus the re-fed tokens causally. Without padding, the replay
says so with :meth:`LseCapture.declare_visible_prefix` (the number of keys every query sees), and the call
runs as two unmasked kernel calls, the visible prefix and the square causal rest, merged by their
log-sum-exps: no mask is read or converted, and the kernel's causal skipping applies to the rest. Where every
layer is sure to take that split (:meth:`LseCapture.split_possible`), the replay re-feeds the context in one
pass with a placeholder mask, and any call that would read the placeholder raises instead.
Where the kernel is unavailable (CUDA, eager, flash-attn) nothing is captured and scoring computes the
softmax itself.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

WRAPPED_ATTRIBUTE = "_compose_wraps"  # on our wrapper: the sdpa function it wraps
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


def install() -> None:
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
