"""The paper's query source: the context re-fed after itself, scored against the original keys.

:class:`ReplayCache` stands in for the real cache during the second pass: each layer attends to the
original context entries plus the re-fed tokens seen so far, but nothing is stored, so the real cache never
holds the re-fed tokens and extra memory stays at one layer's keys at a time.
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from kvpress_compose.cache_gather import layer_states


class ReplayCache(DynamicCache):
    """Serves ``source``'s first ``context_length`` entries as the past of a replay pass, storing nothing.

    The keys each layer attended to in the replay are kept in ``attended_keys`` until the scoring hook
    pops them.
    """

    def __init__(self, source: Cache, context_length: int):
        super().__init__()
        self.layers = [DynamicLayer() for _ in source.layers]  # empty: other presses' hooks index them
        self.source = source
        self.context_length = context_length
        self.attended_keys: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        keys, values = layer_states(self.source, layer_idx)
        keys = torch.cat([keys[:, :, : self.context_length], key_states], dim=2)
        values = torch.cat([values[:, :, : self.context_length], value_states], dim=2)
        self.attended_keys[layer_idx] = keys
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.context_length

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:
        return self.context_length + cache_position.shape[0], 0


def replay_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Positions of the re-fed context: each row continues right after its own last position."""
    return position_ids + position_ids.amax(dim=-1, keepdim=True) + 1


def run_replay(language_model, inputs: dict, replay_cache: ReplayCache) -> None:
    """Feed the captured context inputs again, attending to the replay cache's source context."""
    attention_mask = inputs.get("attention_mask")
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask], dim=-1)
    with torch.no_grad():
        language_model(
            input_ids=inputs.get("input_ids"),
            inputs_embeds=inputs.get("inputs_embeds"),
            attention_mask=attention_mask,
            position_ids=replay_position_ids(inputs["position_ids"]),
            past_key_values=replay_cache,
            use_cache=True,
        )
