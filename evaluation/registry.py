"""Presses by name: kvpress's baselines under kvpress's evaluation names, and ComposePress's variants.

``PRESS_REGISTRY[name](ratio)`` builds a fresh press at ``ratio`` (``None`` for ``no_press``);
:func:`make_press` does the same with a clear error for an unknown name.

Using ComposePress from kvpress's own evaluation
------------------------------------------------
kvpress's ``evaluation/evaluate.py`` (in a checkout of https://github.com/NVIDIA/kvpress; the wheel does not
ship it) looks presses up in ``evaluate_registry.PRESS_REGISTRY``. :func:`register_with_kvpress` adds the
ComposePress variants there. Save this as ``my_evaluate.py`` next to kvpress's ``evaluate.py``::

    import evaluate_registry
    from evaluation.registry import register_with_kvpress

    register_with_kvpress(evaluate_registry)

    from evaluate import CliEntryPoint
    from fire import Fire

    Fire(CliEntryPoint)

and run it from that folder as you would ``evaluate.py``, e.g.
``python my_evaluate.py --dataset ruler --data_dir 4096 --press_name compose_replay --compression_ratio 0.5``
(``evaluate.py`` reads the same ``PRESS_REGISTRY`` dict, so it finds the new names).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from kvpress import (
    AdaKVPress,
    BasePress,
    ExpectedAttentionPress,
    KnormPress,
    KVComposePress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

from kvpress_compose import ComposePress

PressFactory = Callable[[float], BasePress | None]

COMPOSE_PRESSES: dict[str, PressFactory] = {
    "compose": lambda ratio: ComposePress(compression_ratio=ratio),
    "compose_prefill": lambda ratio: ComposePress(compression_ratio=ratio, query_source="prefill"),
    "compose_bidirectional": lambda ratio: ComposePress(compression_ratio=ratio, query_source="bidirectional"),
    "compose_replay": lambda ratio: ComposePress(compression_ratio=ratio, query_source="replay"),
    "compose_snapkv": lambda ratio: ComposePress(compression_ratio=ratio, scorer=SnapKVPress()),
    "compose_expected_attention": lambda ratio: ComposePress(compression_ratio=ratio, scorer=ExpectedAttentionPress()),
    "compose_unstructured": lambda ratio: ComposePress(compression_ratio=ratio, structured=False),
}

PRESS_REGISTRY: dict[str, PressFactory] = {
    "no_press": lambda ratio: None,
    "knorm": lambda ratio: KnormPress(compression_ratio=ratio),
    "snapkv": lambda ratio: SnapKVPress(compression_ratio=ratio),
    "pyramidkv": lambda ratio: PyramidKVPress(compression_ratio=ratio),
    "tova": lambda ratio: TOVAPress(compression_ratio=ratio),
    "streaming_llm": lambda ratio: StreamingLLMPress(compression_ratio=ratio),
    "expected_attention": lambda ratio: ExpectedAttentionPress(compression_ratio=ratio),
    "adakv_snapkv": lambda ratio: AdaKVPress(SnapKVPress(compression_ratio=ratio)),
    "kvcompose": lambda ratio: KVComposePress(compression_ratio=ratio),
    "random": lambda ratio: RandomPress(compression_ratio=ratio),
    **COMPOSE_PRESSES,
}


def check_press_name(name: str) -> None:
    """Raise ValueError naming the known presses when ``name`` is not one of them."""
    if name not in PRESS_REGISTRY:
        raise ValueError(f"unknown press {name!r}; known presses: {', '.join(PRESS_REGISTRY)}")


def make_press(name: str, ratio: float) -> BasePress | None:
    """A fresh press ``name`` removing the fraction ``ratio`` of the KV cache (``None`` for ``no_press``)."""
    check_press_name(name)
    return PRESS_REGISTRY[name](ratio)


def register_with_kvpress(evaluate_registry: ModuleType) -> list[str]:
    """Add the ComposePress variants to kvpress's ``evaluate_registry.PRESS_REGISTRY``; return the added names.

    kvpress's registry holds press instances keyed by name and its ``evaluate.py`` sets
    ``press.compression_ratio`` at run time, so each is registered at ratio 0. Names the registry already
    has are left as they are. See this module's docstring for the full recipe.
    """
    registry = getattr(evaluate_registry, "PRESS_REGISTRY", None)
    if not isinstance(registry, dict):
        raise TypeError(f"{evaluate_registry!r} has no PRESS_REGISTRY dict: pass kvpress's evaluate_registry module")
    added = [name for name in COMPOSE_PRESSES if name not in registry]
    registry.update({name: COMPOSE_PRESSES[name](0.0) for name in added})
    return added


def reset_press_state(model: torch.nn.Module) -> None:
    """Forget the head-wise masks that presses leave on attention modules (``masked_key_indices``).

    Head-wise presses (AdaKV, ComposePress(structured=False)) and some layer-wise ones (PyramidKV, KVCompose)
    store the evicted positions on each attention module for the decoding that follows; a stale set from an
    earlier run, or from a press that crashed midway, must not leak into the next one.
    """
    for module in model.modules():
        if getattr(module, "masked_key_indices", None) is not None:
            module.masked_key_indices = None
