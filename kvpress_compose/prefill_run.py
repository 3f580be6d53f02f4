"""One prefill as ComposePress sees it: its inputs, query source, statistics, scores and phase.

ComposePress creates a :class:`PrefillRun` when a fresh prefill enters the decoder and drops it when that
forward ends, normally or by an exception in any hook: everything a prefill needs lives here, so that
resetting is one assignment and nothing of one prefill reaches the next.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvpress_compose.attention_lse import LseCapture
from kvpress_compose.prefill_inputs import PrefillInputs

# phases: the prefill's own layers; every layer run and scored (compression waits for the decoder's end, when the
# prefill's activations are gone); the replay source's second pass, run then
PREFILL, SCORED, REPLAY = "prefill", "scored", "replay"


@dataclass
class PrefillRun:
    """The state of one prefill, from the decoder's pre-hook to the end of its forward.

    Parameters
    ----------
    inputs : the prefill's inputs (ids or embeddings, padding, positions).
    source : the query source scoring this prefill.
    language_model : the decoder stack; ``attention_modules`` its layers' attention modules.
    agg_task, agg_group, score_block_size : the press's settings scoring uses (see ComposePress).
    local_span : the model's sliding window or attention chunk, None for full attention.
    compressed_layers : the layers scored and compressed (windowed layers of a hybrid model are left out).
    """

    inputs: PrefillInputs
    source: Any  # a query_sources.QuerySource; not imported here: the sources import this module
    language_model: nn.Module
    attention_modules: list[nn.Module]
    agg_task: str
    agg_group: str
    score_block_size: int | None
    local_span: int | None
    statistics: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, kv_heads, group, n)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, kv_heads, n), a scorer's
    phase: str = PREFILL
    cache: object | None = None  # the prefill's cache (set at its first layer when transformers made it)
    nested_calls: int = 0  # decoder calls nested in this prefill's (replay passes) not yet ended
    capture: LseCapture | None = None  # open while the prefill's attention leaves its log-sum-exp
    thread: int = field(default_factory=threading.get_ident)  # the thread whose forward this prefill is
    compressed_layers: list[int] | None = None  # None: every layer

    def __post_init__(self):
        if self.compressed_layers is None:
            self.compressed_layers = list(range(self.n_layers))
        if self.source.captures_prefill_lse:
            scored = [self.attention_modules[layer_idx] for layer_idx in self.compressed_layers]
            self.capture = LseCapture(scored).__enter__()

    @property
    def n_layers(self) -> int:
        return len(self.attention_modules)

    def close(self) -> None:
        """Close the prefill's capture: once its last layer is scored, or when its forward ends (any way it
        ends); safe to call more than once."""
        if self.capture is not None:
            self.capture.__exit__(None, None, None)
            self.capture = None
