"""The log-sum-exp of the model's own attention, kept while ComposePress scores, so scoring needs no softmax.

A token's attention probability is ``exp(q . k * scale - lse(q))``. The prefill (and the replay pass) already
compute ``lse`` inside their attention call, and on CPU torch's flash kernel returns it. Taking it from
there leaves scoring one matrix product and a max per key, without the exponentials and second reduction of
a softmax. :func:`install` wraps transformers' ``"sdpa"`` attention function (as kvpress wraps it for its
head-wise masking): on a module whose ``CAPTURE_ATTRIBUTE`` is set, it runs the same attention through
that kernel and leaves the log-sum-exp, with the keys it was taken over, on ``module.<LSE_ATTRIBUTE>``;
every other call goes through as before. Scoring uses those keys, so the two always match, whatever a cache
(QuantizedCache) or an earlier press (ThinK) does to the stored keys.
Where the kernel is unavailable (CUDA, eager, flash-attn) nothing is captured and scoring computes the
softmax itself.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CAPTURE_ATTRIBUTE = "compose_capture_lse"
LSE_ATTRIBUTE = "compose_lse"  # ((batch, q_heads, q_len) float32 natural-log lse, (batch, kv_heads, k_len, d) keys)
WRAPPED_ATTRIBUTE = "_compose_wraps"
KERNEL_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 9)  # CPU flash GQA: 2.9


def capture_supported(module: nn.Module, query, key, attention_mask, dropout: float, kwargs: dict) -> bool:
    return (
        getattr(module, CAPTURE_ATTRIBUTE, False)
        and query.device.type == "cpu"
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
        return torch.zeros(attention_mask.shape, dtype=dtype).masked_fill_(~attention_mask, float("-inf"))
    return attention_mask.to(dtype)


def wrap_sdpa(sdpa_forward):
    def sdpa_with_lse(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
        if not capture_supported(module, query, key, attention_mask, dropout, kwargs):
            return sdpa_forward(module, query, key, value, attention_mask, dropout, **kwargs)
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        attended_keys, group = key, query.shape[1] // key.shape[1]
        if group > 1 and not KERNEL_HAS_GQA:
            key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query,
            key,  # (batch, kv_heads, k_len, head_dim): from torch 2.9 the kernel handles GQA itself
            value,
            0.0,
            attention_mask is None and is_causal,
            attn_mask=additive_mask(attention_mask, key.shape[2], query.dtype),
            scale=kwargs.get("scaling"),
        )
        setattr(module, LSE_ATTRIBUTE, (lse.float(), attended_keys))
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
        module.__dict__.pop(LSE_ATTRIBUTE, None)


def take_lse(module: nn.Module, batch: int, q_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(lse, keys)`` of the module's last attention call, if it covered ``batch x q_len`` queries; removed
    from the module."""
    captured = module.__dict__.pop(LSE_ATTRIBUTE, None)
    if captured is None or captured[0].shape[0] != batch or captured[0].shape[2] != q_len:
        return None
    return captured
