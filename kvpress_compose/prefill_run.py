"""One prefill as ComposePress sees it: its inputs, the decoder it runs through, and what its scoring produces.

The decoder's pre-hook reads a fresh prefill's inputs (:func:`prefill_inputs`: the attention hooks see hidden
states, not the context's token ids, padding or positions) and the attachment starts a :class:`PrefillRun`; the
run is dropped when that forward ends, normally or by an exception in any hook, so nothing of one prefill
reaches the next. The run holds what the prefill produces (statistics, scores, its phase); the press's settings
stay on the press, and the query source that scores the run is held beside it by the attachment.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from kvpress_compose.attention_scores import LseCapture

# phases: the prefill's own layers run and are scored; then every layer is scored (compression waits for the
# decoder's end, when the prefill's activations are gone)
PREFILL, SCORED = "prefill", "scored"


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


def fed_tokens(arguments: dict) -> torch.Tensor | None:
    """What a forward feeds, ``(batch, n, ...)``: its ``input_ids``, else its ``inputs_embeds`` (None: neither)."""
    input_ids = arguments.get("input_ids")
    return input_ids if input_ids is not None else arguments.get("inputs_embeds")


def decoder_arguments(decoder: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The decoder call's arguments by name, positional ones included."""
    arguments = inspect.signature(decoder.forward).bind_partial(*args, **kwargs).arguments
    return {**arguments.pop("kwargs", {}), **arguments}


def prefill_inputs(arguments: dict) -> PrefillInputs:
    """The inputs of a prefill call (:func:`decoder_arguments`), the padding mask checked against them."""
    reference = fed_tokens(arguments)
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
    return PrefillInputs(arguments.get("input_ids"), arguments.get("inputs_embeds"), attention_mask, position_ids,
                         valid)


@dataclass(frozen=True)
class Decoder:
    """The decoder stack a press is attached to: its ``language_model``, the layers' ``attention_modules`` and
    ``local_span``, the model's sliding window or attention chunk (None for full attention). The attachment
    holds one; every prefill on that model runs through it."""

    language_model: nn.Module
    attention_modules: list[nn.Module]
    local_span: int | None


@dataclass
class PrefillRun:
    """One prefill, from the decoder's pre-hook to the end of its forward.

    Parameters
    ----------
    inputs : the prefill's inputs (ids or embeddings, padding, positions).
    decoder : the decoder stack it runs through.
    compressed_layers : the layers scored and compressed (windowed layers of a hybrid model are left out).
    captures_lse : whether the prefill's attention should leave its log-sum-exp (the query source says).
    """

    inputs: PrefillInputs
    decoder: Decoder
    compressed_layers: list[int]
    captures_lse: bool = False
    statistics: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, kv_heads, group, n)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, kv_heads, n), a scorer's
    phase: str = PREFILL
    cache: object | None = None  # the prefill's cache (set at its first layer when transformers made it)
    capture: LseCapture | None = None  # open while the prefill's attention leaves its log-sum-exp
    thread: int = field(default_factory=threading.get_ident)  # the thread whose forward this prefill is

    def __post_init__(self):
        if self.captures_lse:
            self.capture = LseCapture([self.attention_modules[i] for i in self.compressed_layers]).__enter__()

    @property
    def language_model(self) -> nn.Module:
        return self.decoder.language_model

    @property
    def attention_modules(self) -> list[nn.Module]:
        return self.decoder.attention_modules

    @property
    def local_span(self) -> int | None:
        return self.decoder.local_span

    @property
    def n_layers(self) -> int:
        return len(self.decoder.attention_modules)

    def close(self) -> None:
        """Close the prefill's capture: once its last layer is scored, or when its forward ends (any way it
        ends); safe to call more than once."""
        if self.capture is not None:
            self.capture.__exit__(None, None, None)
            self.capture = None
