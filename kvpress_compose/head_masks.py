"""Unstructured masks (``structured=False``) kept with the cache they were computed for.

kvpress's head-wise masking reads ``masked_key_indices`` from each attention module, and its attention patch
resets that attribute at every prefill, whichever cache the prefill fills: a question on an earlier masked cache
would then see every entry. ComposePress records each masked cache's indices here (a weak map: they go with the
cache), and a forward pre-hook on every attention module puts them back on the module before a forward into that
cache. Caches cropped below their masked context (or reset) drop their record.
"""

from __future__ import annotations

import weakref

from torch import nn

HOOK_ATTRIBUTE = "_compose_head_mask_hook"
MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> (context length, {layer: indices})


def remember_masks(cache, attention_modules: list[nn.Module]) -> None:
    """Record the ``masked_key_indices`` just set on ``attention_modules`` as those of ``cache``."""
    masks = {module.layer_idx: module.masked_key_indices for module in attention_modules}
    MASKS[cache] = (cache.get_seq_length(), masks)


def install_head_mask_hooks(attention_modules: list[nn.Module]) -> None:
    """Register the restoring pre-hook once per module (it stays: questions run after the press's block)."""
    for module in attention_modules:
        if getattr(module, HOOK_ATTRIBUTE, None) is None:
            setattr(module, HOOK_ATTRIBUTE, module.register_forward_pre_hook(restore_masks, with_kwargs=True))


def restore_masks(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    try:
        record = MASKS.get(cache)
    except TypeError:  # not weak-referenceable: never recorded
        return
    if record is None:
        return
    context_length, masks = record
    if cache.get_seq_length(module.layer_idx) < context_length:  # cropped or reset: the masked context is gone
        del MASKS[cache]
        return
    module.masked_key_indices = masks.get(module.layer_idx)
    return
