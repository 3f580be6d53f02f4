"""The inputs of a fresh prefill, captured by a pre-hook on the decoder stack.

The attention hooks see hidden states, not the context's token ids, padding or positions; the padding mask
keeps padding out of the scores and the cache, and replay feeds the same inputs a second time.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PrefillInputs:
    input_ids: torch.Tensor | None  # (batch, n), or None when inputs_embeds were given
    inputs_embeds: torch.Tensor | None
    attention_mask: torch.Tensor | None  # (batch, n) 2D padding mask as given
    position_ids: torch.Tensor  # (batch, n)
    valid: torch.Tensor  # (batch, n) bool, False on padding

    @property
    def length(self) -> int:
        return self.valid.shape[1]


def capture_prefill_inputs(decoder: nn.Module, args: tuple, kwargs: dict) -> PrefillInputs | None:
    """The decoder call's inputs when it is a fresh prefill (empty or no cache), else None."""
    kwargs = inspect.signature(decoder.forward).bind_partial(*args, **kwargs).arguments
    kwargs = {**kwargs.pop("kwargs", {}), **kwargs}
    cache = kwargs.get("past_key_values")
    if cache is not None and cache.get_seq_length() > 0:
        return None
    input_ids = kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds")
    reference = input_ids if input_ids is not None else embeds
    batch, n = reference.shape[:2]
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(n, device=reference.device)[None].expand(batch, n)
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("ComposePress needs attention_mask as a 2D (batch, seq_len) padding mask, or None")
    if attention_mask is None:
        valid = torch.ones(batch, n, dtype=torch.bool, device=reference.device)
    else:
        valid = attention_mask.bool()
    return PrefillInputs(input_ids, embeds, attention_mask, position_ids, valid)
