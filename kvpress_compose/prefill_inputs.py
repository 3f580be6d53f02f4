"""The inputs of a fresh prefill, read by ComposePress's pre-hook on the decoder stack.

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


def decoder_arguments(decoder: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The decoder call's arguments by name, positional ones included."""
    arguments = inspect.signature(decoder.forward).bind_partial(*args, **kwargs).arguments
    return {**arguments.pop("kwargs", {}), **arguments}


def prefill_inputs(arguments: dict) -> PrefillInputs:
    """The inputs of a prefill call (:func:`decoder_arguments`), the padding mask checked against them."""
    input_ids = arguments.get("input_ids")
    embeds = arguments.get("inputs_embeds")
    reference = input_ids if input_ids is not None else embeds
    batch, n = reference.shape[:2]
    position_ids = arguments.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(n, device=reference.device)[None]
    position_ids = position_ids.expand(batch, n)  # (1, n) positions are every row's
    attention_mask = arguments.get("attention_mask")
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != n or attention_mask.shape[0] not in (1, batch):
            raise ValueError(
                f"ComposePress needs attention_mask as a 2D (batch, seq_len) = ({batch}, {n}) padding mask (or "
                f"(1, {n}), or None), got shape {tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.expand(batch, n)  # a (1, n) mask is every row's
    if attention_mask is None:
        valid = torch.ones(batch, n, dtype=torch.bool, device=reference.device)
    else:
        valid = attention_mask.bool()
    return PrefillInputs(input_ids, embeds, attention_mask, position_ids, valid)
