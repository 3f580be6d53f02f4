"""ComposePress's settings: each checked, and normalised (numpy numbers become Python ones), whenever it is set.

:data:`SETTINGS` maps each documented field of :class:`~kvpress_compose.ComposePress` to its check; a check takes
the setting's name (for the error) and the value, and returns the value to store or raises a ``ValueError`` /
``TypeError`` naming the setting and what was expected.
"""

from __future__ import annotations

import numbers

import torch
from kvpress import ScorerPress

from kvpress_compose.attention_scores import AGGREGATIONS
from kvpress_compose.compression import ALLOCATIONS, AUTO
from kvpress_compose.query_sources import QUERY_SOURCES


def fraction_setting(include_one: bool):
    """A real number in [0, 1) (a compression ratio), or in [0, 1] with ``include_one``."""
    interval = "[0, 1]" if include_one else "[0, 1)"

    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
        if not (0 <= value <= 1 if include_one else 0 <= value < 1):  # NaN fails too
            raise ValueError(f"{name} must be in {interval}, got {value}")
        return value

    return check


ratio_setting = fraction_setting(include_one=False)


def positive_int_setting(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def non_negative_int_setting(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def odd_positive_int_setting(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be an odd int >= 1 (a window centred on each token), got {value!r}")
    return int(value)


def token_ids_setting(name, value):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of token ids (ints) or None, got {type(value).__name__}")
    value = tuple(value)
    if not value or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"{name} must be a non-empty sequence of token ids (ints >= 0), got {value!r}")
    return tuple(int(v) for v in value)


def optional_positive_int_setting(name, value):
    return None if value is None else positive_int_setting(name, value)


def bool_setting(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def choice_setting(choices):
    def check(name, value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
        return value

    return check


def scorer_setting(name, value):
    if value is not None and not isinstance(value, ScorerPress):
        raise TypeError(f"{name} must be a kvpress ScorerPress, got {type(value).__name__}")
    return value


SETTINGS = {
    "compression_ratio": ratio_setting,
    "query_source": choice_setting(QUERY_SOURCES),
    "structured": bool_setting,
    "layer_allocation": choice_setting((AUTO, *ALLOCATIONS)),
    "composite_tokens": bool_setting,
    "scorer": scorer_setting,
    "agg_task": choice_setting(AGGREGATIONS),
    "agg_group": choice_setting(AGGREGATIONS),
    "agg_head": choice_setting(AGGREGATIONS),
    "add_v_norm": bool_setting,
    "add_mean_across_heads": bool_setting,
    "score_pooling": odd_positive_int_setting,
    "min_tokens_per_layer": positive_int_setting,
    "n_sink": non_negative_int_setting,
    "layer_floor": fraction_setting(include_one=True),
    "replay_prompt_ids": token_ids_setting,
    "score_block_size": optional_positive_int_setting,
}


def check_combination(press) -> None:
    """Settings that depend on each other, checked together once ``press`` is constructed and whenever one of
    them changes."""
    allocation = ALLOCATIONS["global" if press.layer_allocation == AUTO else press.layer_allocation]
    if not press.structured and (not allocation.serves_unstructured or not press.composite_tokens
                                 or press.layer_floor > 0):
        raise ValueError(
            "structured=False ranks every head's tokens on their own, against one budget per layer "
            "(layer_allocation='uniform') or one for the whole model ('global'): layer_allocation="
            "'global_normalized' or 'shared', layer_floor and composite_tokens=False apply to the structured press "
            "only"
        )
    if press.query_source == "prefill_seen" and press.agg_task != "mean":
        raise ValueError(
            "query_source='prefill_seen' averages over the queries that saw each key: it needs agg_task='mean', got "
            f"agg_task={press.agg_task!r} (set agg_task='mean' first when changing both after construction)"
        )
    if press.replay_prompt_ids is not None and (press.query_source != "replay_prompted" or press.scorer is not None):
        using = f"a scorer ({type(press.scorer).__name__})" if press.scorer is not None else \
            f"query_source={press.query_source!r}"
        raise ValueError(
            f"replay_prompt_ids are fed only by query_source='replay_prompted' (without a scorer, which replaces the "
            f"query source), and this press scores with {using}: they would be ignored. Leave replay_prompt_ids unset, "
            "or use query_source='replay_prompted'"
        )
