"""Positions of tokens fed after a compressed context.

A compressed cache holds fewer entries than the positions it processed, so positions counted from its length
(what ``model(...)`` does without ``position_ids``, and what ``model.generate`` does when given the whole
conversation) fall on positions already cached: ``generate`` re-feeds the last cached tokens at those positions.
ComposePress records on each compressed layer how many positions it had processed, so that such a forward is
named, with the positions that would be right.
"""

from __future__ import annotations

import logging
import sys
import weakref

from kvpress_compose.cache_gather import ORIGINAL_LENGTH_ATTRIBUTE, processed_positions

logger = logging.getLogger(__name__)
WARNED: weakref.WeakSet = weakref.WeakSet()  # caches already warned about (once each: every later step repeats it)


def first_position(kwargs: dict, cached: int) -> int:
    """The position of the forward's first token (of its furthest row): from ``position_ids``, else
    ``cache_position``, else counted from the cache's length as transformers does."""
    position_ids, cache_position = kwargs.get("position_ids"), kwargs.get("cache_position")
    if position_ids is not None and position_ids.numel() > 0:
        return int(position_ids[..., 0].max())
    if cache_position is not None and cache_position.numel() > 0:
        return int(cache_position.reshape(-1)[0])
    return cached


def warn_if_positions_repeat(cache, layer0, layer0_context: int, kwargs: dict) -> None:
    """Warn (once per cache) when a forward into a compressed cache starts before the positions it processed."""
    if getattr(layer0, ORIGINAL_LENGTH_ATTRIBUTE, None) is None:
        return
    cached, processed = layer0.get_seq_length(), processed_positions(layer0)
    first = first_position(kwargs, cached)
    if first >= processed:
        return
    try:
        if cache in WARNED:
            return
        WARNED.add(cache)
    except TypeError:  # not weak-referenceable
        pass
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    n_new = inputs.shape[1] if inputs is not None else 0
    logger.warning(
        f"ComposePress: {n_new} tokens at positions from {first} into a compressed cache that has already "
        f"processed {processed} positions (layer 0 holds {cached} entries, {layer0_context} of them its compressed "
        f"context): positions counted from the compressed length repeat cached positions, so cached tokens are "
        f"fed again or new tokens get earlier positions. Feed only the new tokens, with position_ids (or "
        f"cache_position) from {processed}; for model.generate on the whole conversation, pass "
        f"cache_position=torch.arange({processed}, {first + n_new})"
    )


def called_from_assisted_generation() -> bool:
    """Whether this forward runs inside transformers' assisted generation (``model.generate`` with
    ``prompt_lookup_num_tokens`` or ``assistant_model``), read from the call stack: a forward is not told."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_assisted_decoding" and "transformers" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def refuse_assisted_generation(where: str) -> None:
    """Assisted generation verifies candidate tokens in one forward, then crops the rejected ones from the cache
    by position (``cache.crop(positions)``). A compressed cache holds fewer entries than the positions it has
    processed, so that crop removes nothing and the rejected candidates stay, changing every later token: refused,
    before the forward, naming the cause (``where``: on a compressed cache, or inside a press's block)."""
    if called_from_assisted_generation():
        raise ValueError(
            f"model.generate with prompt_lookup_num_tokens or assistant_model (assisted generation) {where}: "
            "transformers verifies the candidate tokens in one forward and then crops the rejected ones from the "
            "cache by position, and a compressed cache holds fewer entries than the positions it has processed, so "
            "that crop removes nothing and the rejected candidates would stay in the cache and change the tokens. "
            "Generate without prompt_lookup_num_tokens and assistant_model (greedy or sampling works)"
        )
