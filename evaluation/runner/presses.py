"""Presses by name: kvpress's baselines under kvpress's evaluation names, and ComposePress's variants.

``PRESS_REGISTRY[name](ratio)`` builds a fresh press at ``ratio`` (``None`` for ``no_press``);
:func:`make_press` does the same with a clear error for an unknown name.

kvpress's own ``evaluation/evaluate.py`` runs these presses through :func:`register_with_kvpress`, which
``python -m evaluation.runner.kvpress_evaluate`` calls (see that module).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from kvpress import (
    AdaKVPress,
    BasePress,
    BlockPress,
    CAMPress,
    ChunkKVPress,
    CompactorPress,
    ComposedPress,
    CriticalAdaKVPress,
    CriticalKVPress,
    CURPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    KVComposePress,
    KVzipPress,
    LagKVPress,
    MergingPress,
    ObservedAttentionPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    ThinKPress,
    TOVAPress,
)

from kvpress_compose import ComposePress

from .full_layers import FullLayersOnly

PressFactory = Callable[[float], BasePress | None]


def at_ratio(press: BasePress, ratio: float) -> BasePress:
    """``press`` with its ratio set as kvpress's ``evaluate.py`` sets it: on each press of a ComposedPress, as
    ``key_channel_compression_ratio`` for ThinK, else as ``compression_ratio`` (through a wrapper to the press it
    wraps)."""
    if isinstance(press, ComposedPress):
        for inner in press.presses:
            at_ratio(inner, ratio)
    elif isinstance(press, ThinKPress):
        press.key_channel_compression_ratio = ratio
    else:
        press.compression_ratio = ratio
    return press


def compose_press(**settings) -> PressFactory:
    """A ComposePress at the given ratio with ``settings`` (plain values only: a scorer must be built per press)."""
    return lambda ratio: ComposePress(compression_ratio=ratio, **settings)


# every variant names its source and allocation, so that a change of ComposePress's defaults changes only "compose"
GLOBAL = dict(layer_allocation="global")
COMPOSE_PRESSES: dict[str, PressFactory] = {
    "compose": compose_press(),  # the defaults: replay, allocation "auto" (from the model's config)
    "compose_prefill": compose_press(query_source="prefill", **GLOBAL),
    "compose_bidirectional": compose_press(query_source="bidirectional", **GLOBAL),
    "compose_replay": compose_press(query_source="replay", **GLOBAL),  # the paper's
    "compose_replay_local": compose_press(query_source="replay_local", **GLOBAL),
    # KVzip's framing of the replay for instruct models, with its sinks, under the allocation that fixes global's
    # scale problem (docs/real-model-sources.md)
    "compose_replay_prompted": compose_press(query_source="replay_prompted", n_sink=4,
                                             layer_allocation="global_normalized"),
    # the same framing and sinks under the default's plain global allocation: separates framing from allocation
    "compose_replay_prompted_global": compose_press(query_source="replay_prompted", n_sink=4, **GLOBAL),
    # one token set for every layer, each token ranked by its best within-layer percentile of its 9-token
    # neighbourhood's best replay score: on Gemma-3-270M's prose haystacks only the first full layer's replay
    # finds the needle (docs/gemma3-default-loss.md)
    "compose_replay_shared": compose_press(query_source="replay", layer_allocation="shared", score_pooling=9),
    # the pooling alone, under the default's global allocation
    "compose_replay_pooled": compose_press(query_source="replay", score_pooling=9, **GLOBAL),
    # KVzip's reduction over a KV group's query heads (the max; the default takes the mean): Qwen2.5's groups are
    # 7 query heads wide, SmolLM2's 3
    "compose_replay_groupmax": compose_press(query_source="replay", agg_group="max", **GLOBAL),
    # a layer keeps as many composite tokens as its head with the most high scores wants (the default: their mean):
    # the nearest a dense layer comes to KVzip's per-head budgets (docs/qwen-kvzip-gap.md)
    "compose_replay_headmax": compose_press(query_source="replay", agg_head="max", **GLOBAL),
    # KVzip's allocation on our replay's scores: per-head masks, the max over a query group, no mean across heads,
    # 4 sinks; keeps 95% of KVzip's entries on Qwen2.5 and frees nothing (an upper bound, not a candidate)
    "compose_unstructured_kvzip_alloc": compose_press(query_source="replay", structured=False, agg_group="max",
                                                      add_mean_across_heads=False, n_sink=4, **GLOBAL),
    # KVzip's scoring details in the dense press: the max over a query group, no mean across heads, 4 sinks
    "compose_replay_kvzip_scoring": compose_press(query_source="replay", agg_group="max",
                                                  add_mean_across_heads=False, n_sink=4, **GLOBAL),
    "compose_snapkv": lambda ratio: ComposePress(compression_ratio=ratio, scorer=SnapKVPress(), **GLOBAL),
    "compose_expected_attention": lambda ratio: ComposePress(compression_ratio=ratio, scorer=ExpectedAttentionPress(),
                                                             **GLOBAL),
    # its sinks' scores (max + 1) dwarf the rest of a layer where expected attention is peaked: global allocation
    # then empties that layer (docs/findings.md); one budget per layer cannot
    "compose_expected_attention_uniform": lambda ratio: ComposePress(
        compression_ratio=ratio, scorer=ExpectedAttentionPress(), layer_allocation="uniform"),
    # the ablations: each part of KVCompose taken away in turn, from the paper's replay and from bidirectional
    "compose_unstructured": compose_press(query_source="replay", structured=False, **GLOBAL),
    "compose_uniform": compose_press(query_source="replay", layer_allocation="uniform"),
    "compose_shared_positions": compose_press(query_source="replay", composite_tokens=False, **GLOBAL),
    "compose_bidirectional_unstructured": compose_press(query_source="bidirectional", structured=False, **GLOBAL),
    "compose_bidirectional_uniform": compose_press(query_source="bidirectional", layer_allocation="uniform"),
    "compose_bidirectional_shared_positions": compose_press(query_source="bidirectional", composite_tokens=False,
                                                            **GLOBAL),
}

# kvpress's presses under the names and with the settings of kvpress's evaluation/evaluate_registry.py
# (NVIDIA/kvpress at 8bb29b9), each built fresh: the README lists the ones left out and why
KVPRESS_PRESSES: dict[str, Callable[[], BasePress]] = {
    "adakv_snapkv": lambda: AdaKVPress(SnapKVPress()),
    "adakv_compactor": lambda: AdaKVPress(CompactorPress()),
    "block_keydiff": lambda: BlockPress(press=KeyDiffPress(), block_size=128),
    "chunkkv": lambda: ChunkKVPress(press=SnapKVPress(), chunk_length=20),
    "compactor": lambda: CompactorPress(),
    "critical_adakv_expected_attention": lambda: CriticalAdaKVPress(ExpectedAttentionPress(use_vnorm=False)),
    "critical_adakv_snapkv": lambda: CriticalAdaKVPress(SnapKVPress()),
    "critical_expected_attention": lambda: CriticalKVPress(ExpectedAttentionPress(use_vnorm=False)),
    "critical_snapkv": lambda: CriticalKVPress(SnapKVPress()),
    "cur": lambda: CURPress(),
    "expected_attention": lambda: AdaKVPress(ExpectedAttentionPress(epsilon=1e-2)),
    "keydiff": lambda: KeyDiffPress(),
    "knorm": lambda: KnormPress(),
    "kvcompose": lambda: KVComposePress(),
    "kvcompose_unstructured": lambda: KVComposePress(structured=False),
    "kvzip": lambda: KVzipPress(),
    "kvzip_plus": lambda: KVzipPress(kvzip_plus_normalization=True),
    "kvzip_layerwise": lambda: KVzipPress(layerwise=True),  # not in kvpress's registry: KVzip's layer-wise form
    "lagkv": lambda: LagKVPress(),
    "observed_attention": lambda: ObservedAttentionPress(),
    "pyramidkv": lambda: PyramidKVPress(),
    "random": lambda: RandomPress(),
    "snapkv": lambda: SnapKVPress(),
    "streaming_llm": lambda: StreamingLLMPress(),
    "think": lambda: ThinKPress(),
    "tova": lambda: TOVAPress(),
    "merging_knorm": lambda: MergingPress(KnormPress()),
    "merging_snapkv": lambda: MergingPress(SnapKVPress()),
    "merging_expected_attention": lambda: MergingPress(ExpectedAttentionPress(epsilon=1e-2)),
    "cam_streaming_llm": lambda: CAMPress(base_press=StreamingLLMPress()),
    "cam_knorm": lambda: CAMPress(base_press=KnormPress()),
    "cam_adakv_snapkv": lambda: CAMPress(base_press=AdaKVPress(SnapKVPress())),
    "cam_tova": lambda: CAMPress(base_press=TOVAPress()),
    # not in kvpress's registry: kvpress's Gemma 3 rule (windowed layers left alone) on every hybrid model
    # (evaluation/runner/full_layers.py); on a model without windowed layers each is the press itself. Not
    # expected_attention: it calls Gemma 3's rotary embedding without the layer type, which transformers 5.2 needs
    "snapkv_full_layers": lambda: FullLayersOnly(SnapKVPress()),
    "knorm_full_layers": lambda: FullLayersOnly(KnormPress()),
    "tova_full_layers": lambda: FullLayersOnly(TOVAPress()),
    "compactor_full_layers": lambda: FullLayersOnly(CompactorPress()),
    "keydiff_full_layers": lambda: FullLayersOnly(KeyDiffPress()),
}

# presses that need eager attention (the model is loaded so for them, as kvpress's evaluate.py does)
EAGER_PRESSES = ("observed_attention",)
# kvpress presses left out, with why (the README lists them)
LEFT_OUT = {
    "duo_attention": "loads its head patterns from the hub",
    "duo_attention_on_the_fly": "scores heads on the kmfoda/booksum dataset, downloaded from the hub",
    "qfilter": "loads its filters from the hub",
    "kvzap_linear, kvzap_mlp, kvzap_mlp_head, kvzap_mlp_layer": "load trained KVzap scorers from the hub",
    "fastkvzip": "loads trained gates from the hub (released for some hub models only)",
    "RestoreKV, RestoreKV_plus": "load trained weights from the hub",
    "lukv": "needs a budget curve measured for the model (kvpress ships one, for Llama-3.1-8B-Instruct)",
    "finch": "needs a delimiter token between context and question, which kvpress's evaluate.py adds to the "
             "tokenizer and its datasets (not to a local dataset)",
    "merging_kvzap_mlp": "loads a trained KVzap scorer from the hub",
    "decoding_*": "compress during decoding to a target size, not at a ratio: the decode-time study compares them",
    "snap_think": "ThinK's channel ratio and SnapKV's token ratio are two settings; `think` alone is here",
}

BASELINE = "no_press"  # the uncompressed run: sweeps and studies run it once, at ratio 0
PRESS_REGISTRY: dict[str, PressFactory] = {
    BASELINE: lambda ratio: None,
    **{name: (lambda ratio, build=build: at_ratio(build(), ratio)) for name, build in KVPRESS_PRESSES.items()},
    **COMPOSE_PRESSES,
}


def check_press_name(name: str) -> None:
    """Raise ValueError naming the known presses when ``name`` is not one of them."""
    if name not in PRESS_REGISTRY:
        raise ValueError(f"unknown press {name!r}; known presses: {', '.join(PRESS_REGISTRY)}")


KVZIP_LOGGER = "kvpress.presses.kvzip_press"  # KVzipPress logs its 2-3x prefill overhead each time one is built


@contextmanager
def quiet_press_construction() -> Iterator[None]:
    """Building presses without kvpress's per-instance notices: KVzipPress warns about its prefill cost every
    time one is built (kvpress's own registry builds three at import), which the README says once. Only that
    logger, only while the block runs."""
    logger = logging.getLogger(KVZIP_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


UNTESTED_MODEL_LOGGERS = ("kvpress.presses.base_press", KVZIP_LOGGER)  # "Model ... not tested" at every forward


class OncePerMessage(logging.Filter):
    """Lets each distinct message through once (kvpress warns that a model is "not tested, supported models:
    ..." at every forward of every context, e.g. on Gemma3ForCausalLM)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def say_kvpress_warnings_once() -> None:
    """kvpress's per-forward model warnings, said once per process from here on (idempotent)."""
    for name in UNTESTED_MODEL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, OncePerMessage) for existing in logger.filters):
            logger.addFilter(OncePerMessage())


def make_press(name: str, ratio: float) -> BasePress | None:
    """A fresh press ``name`` removing the fraction ``ratio`` of the KV cache (``None`` for ``no_press``)."""
    check_press_name(name)
    with quiet_press_construction():
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
