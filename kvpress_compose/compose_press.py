"""ComposePress: KVCompose as a kvpress press."""

from __future__ import annotations

import dataclasses
import logging
import numbers
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress import BasePress, ScorerPress
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from kvpress_compose import attention_lse
from kvpress_compose.allocation import (
    composite_scores,
    compute_n_kept,
    floor_per_layer,
    head_budgets,
    kept_positions,
    layer_budgets,
    per_head_shares,
    rank_tokens,
    stack_layer_scores,
    uniform_budgets,
    with_sinks_kept,
)
from kvpress_compose.attention_scores import AGGREGATIONS, aggregate
from kvpress_compose.cache_gather import compress_layer, layer_states, mask_evicted_entries
from kvpress_compose.layer_masks import install_layer_mask_hooks
from kvpress_compose.prefill_inputs import decoder_arguments, prefill_inputs
from kvpress_compose.prefill_run import PREFILL, SCORED, PrefillRun
from kvpress_compose.query_sources import (
    QUERY_SOURCES,
    RepeatPrompt,
    check_cache_unchanged,
    query_source_for,
    repeat_prompt_for,
)

logger = logging.getLogger(__name__)
LAYER_ALLOCATIONS = ("global", "uniform", "global_normalized")


@dataclass
class ComposePress(BasePress):
    """KVCompose: structured KV cache compression with composite tokens and global layer allocation.

    Every (layer, KV head) scores its context tokens; each head ranks its own tokens and rank j of every head
    forms composite token j, so a layer stays one dense ``(batch, kv_heads, k_l, head_dim)`` tensor. One budget
    for the whole model is spread over layers by a global top-k of composite scores: layers whose tokens draw
    more attention keep more. Based on KVCompose (https://arxiv.org/abs/2509.05165).

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the model's context KV entries to remove, in [0, 1); checked whenever it is set.
    query_source : str, default="bidirectional"
        Which queries score the context (one class each in :mod:`kvpress_compose.query_sources`). "prefill":
        the prefill's own queries, causal (no extra pass). "bidirectional" (the default, chosen by the study in
        the README): the prefill's queries attending to every context key (no extra pass). "replay": the
        paper's, the context re-fed after itself in a second forward pass, whose attention covers three times
        the prefill's (query, key) pairs; the cache never keeps the re-fed tokens. "replay_local": the replay
        with KVzip's cheaper attention, each re-fed chunk attending to the context and its own tokens only.
        "prefill_seen" (needs ``agg_task="mean"``): the prefill's causal attention averaged over the queries
        that could see each key, not over all of them. "replay_prompted": the replay framed as an instruct model reads it, KVzip's way: the context is re-fed
        as the assistant's answer to "Repeat the previous context exactly." in the model's chat template
        (``replay_prompt_ids``); use it with ``n_sink=4``.
        Ignored when ``scorer`` is given. On CPU with sdpa, scoring reuses the log-sum-exp of the model's own
        attention.
    structured : bool, default=True
        False gives the unstructured upper bound: per-(layer, head) budgets applied with kvpress's head-wise
        masking. That saves no memory (evicted entries are masked, not removed) and needs sdpa or flash.
    layer_allocation : str, default="global"
        "global" (the paper's): one top-k over every layer's composite scores decides how many each layer
        keeps. "uniform": every layer keeps the same number of composite tokens (the ablation).
        "global_normalized": the global top-k over each head's scores divided by their sum (sinks and
        ``layer_floor`` apart), so that a layer competes with how its scores are spread, not their scale (on
        SmolLM2, "global" gave two layers most of the budget and starved the layers whose attention sits on the
        sink tokens: docs/real-model-sources.md). Use it with ``n_sink``.
    composite_tokens : bool, default=True
        True (the paper's): each head keeps its own top positions. False (the ablation): one set of positions
        per layer, ranked by the head-aggregated (``agg_head``) score and shared by every head.
    scorer : ScorerPress, optional
        Any kvpress ScorerPress (SnapKV, ExpectedAttention, Knorm, TOVA, ...) used as the token scores in place
        of attention scores; its own compression_ratio is ignored.
    agg_task, agg_group, agg_head : str, default "max", "mean", "mean"
        Aggregation ("max" or "mean") over query positions, over the query heads of a KV head (GQA), and over
        heads to score a composite token.
    add_v_norm : bool, default=False
        Multiply each token's score by the norm of its value vector.
    add_mean_across_heads : bool, default=True
        Add the mean over KV heads of a token's score to each head's score.
    min_tokens_per_layer : int, default=1
        Composite tokens every layer keeps (per head, when ``structured=False``).
    n_sink : int, default=0
        The first ``n_sink`` context tokens of each row (the attention sinks) are kept in every head of every
        layer, outside the competition for the budget (they count in it); KVzip keeps 4.
    layer_floor : float, default=0.0
        Under global allocation, every layer keeps at least this fraction of the uniform budget (``n_kept //
        layers`` composite tokens); the global top-k spreads the rest. In [0, 1].
    replay_prompt_ids : sequence of int, optional
        The tokens "replay_prompted" feeds before re-feeding the context (the whole context is then re-fed). By
        default they are built from the model's tokenizer, loaded from ``model.name_or_path``: the repeat
        instruction closing a user's turn and opening the assistant's, and the template's opening is not re-fed
        where the context starts with it.
    score_block_size : int, optional
        Queries scored at once where scores come from a softmax (eager, flash-attn, CUDA, windowed replay); by
        default a block of float32 probabilities is about 10% of the full KV cache (at least 16 queries), so
        scoring adds memory O(block x context), never O(context^2). The log-sum-exp path (sdpa on CPU) scores
        in fixed tiles of 256 query columns x 512 keys and does not use it.

    After each prefill, ``last_budgets`` holds what each layer kept (``(layers,)`` composite tokens, or
    ``(batch, layers, kv_heads)`` tokens when ``structured=False``) and ``last_scores`` the scores ranked.
    """

    compression_ratio: float = 0.0
    query_source: str = "bidirectional"
    structured: bool = True
    layer_allocation: str = "global"
    composite_tokens: bool = True
    scorer: ScorerPress | None = None
    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    min_tokens_per_layer: int = 1
    n_sink: int = 0
    layer_floor: float = 0.0
    replay_prompt_ids: tuple[int, ...] | None = None
    score_block_size: int | None = None
    last_budgets: torch.Tensor | None = field(default=None, init=False, repr=False)
    last_scores: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __setattr__(self, name, value):
        """Every documented setting is checked (and normalised: numpy numbers become Python ones) whenever it is
        set, at construction or later (kvpress's evaluate.py assigns ``compression_ratio``)."""
        validate = SETTINGS.get(name)
        if validate is None:
            return super().__setattr__(name, value)
        previous = self.__dict__.get(name)
        super().__setattr__(name, validate(name, value))
        if "_run" in self.__dict__:  # constructed: settings that depend on each other are checked together
            try:
                self._check_combination()
            except ValueError:
                super().__setattr__(name, previous)
                raise

    def _check_combination(self):
        if not self.structured and (self.layer_allocation != "global" or not self.composite_tokens
                                    or self.layer_floor > 0):
            raise ValueError(
                "structured=False ranks every head's tokens on their own against one global budget: "
                "layer_allocation, layer_floor and composite_tokens apply to the structured press only"
            )

    def __post_init__(self):
        self._check_combination()
        self._attachment: DecoderAttachment | None = None  # our decoder hooks, while the press is in use
        self._run: PrefillRun | None = None  # the prefill under way, if any
        self._model_name: str | None = None  # where "replay_prompted" loads the tokenizer from
        self._template_prompts: dict[str, RepeatPrompt] = {}  # by model name, built once

    # -- being used on a model ----------------------------------------------------------------------------

    def post_init_from_model(self, model: PreTrainedModel):
        language_model = language_model_of(model)
        attention_modules = [layer.self_attn for layer in language_model.layers]
        if not self.structured and model.config._attn_implementation == "eager":
            raise ValueError(
                "structured=False relies on kvpress's head-wise masking, which does not patch eager attention: "
                "load the model with attn_implementation='sdpa' (or flash_attention_2)"
            )
        self._model_name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        attention_lse.install()
        install_layer_mask_hooks(language_model, attention_modules)
        self._detach()
        self._attachment = DecoderAttachment(self, language_model, attention_modules)
        if self.scorer is not None:
            self.scorer.post_init_from_model(model)

    @contextmanager
    def __call__(self, model: PreTrainedModel):
        try:
            with super().__call__(model):
                yield
        finally:
            self._detach()

    def _detach(self):
        self._end_run()
        if self._attachment is not None:
            self._attachment.remove()
            self._attachment = None

    def _detach_from(self, attachment: DecoderAttachment):
        """A wrapper's hook that used this press is gone: its attachment goes (and the press forgets it)."""
        if self._attachment is attachment:
            self._detach()
        else:
            attachment.remove()

    @property
    def in_prefill(self) -> bool:
        """Whether a prefill this press compresses is under way (its replay pass included)."""
        return self._run is not None

    def _end_run(self):
        if self._run is not None:
            self._run.close()
            self._run = None

    # -- one prefill: started by the decoder's pre-hook, ended by its forward hook ------------------------

    def _start_prefill(self, decoder: nn.Module, args: tuple, kwargs: dict) -> None:
        attachment = self._attachment
        if not attachment.press_is_hooked():  # the press was used by a wrapper that has exited
            self._detach()
            return
        arguments = decoder_arguments(decoder, args, kwargs)
        cache = arguments.get("past_key_values")
        fresh = cache is None or cache.get_seq_length() == 0
        if self._run is not None:
            if not fresh:  # a replay pass (ours or an outer press's) re-entering the decoder
                self._run.nested_calls += 1
                return
            self._end_run()  # left by a forward that ended without its hooks (KeyboardInterrupt)
        if self.compression_ratio == 0:
            return
        if not fresh:
            refuse_more_context(attachment, cache, arguments)
            return
        inputs = prefill_inputs(arguments)
        local_span = attachment.local_span
        if local_span is not None and inputs.length >= local_span:  # caches keep span - 1
            raise ValueError(
                f"context of {inputs.length} tokens does not fit the model's sliding window or attention chunk "
                f"({local_span} tokens, of which a cache keeps {local_span - 1}): ComposePress supports "
                "full-attention layers only"
            )
        self._run = PrefillRun(
            inputs=inputs,
            source=query_source_for(self.query_source, self.scorer, self._repeat_prompt),
            language_model=attachment.language_model,
            attention_modules=attachment.attention_modules,
            agg_task=self.agg_task,
            agg_group=self.agg_group,
            score_block_size=self.score_block_size,
            local_span=local_span,
            cache=cache,
        )

    def _repeat_prompt(self) -> RepeatPrompt:
        """``replay_prompt_ids``, else the repeat prompt built from the model's tokenizer (once per model)."""
        if self.replay_prompt_ids is not None:
            return RepeatPrompt(ids=self.replay_prompt_ids)
        name = self._model_name
        if name not in self._template_prompts:
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
            except Exception as error:  # noqa: BLE001 - any failure means the same: no tokenizer to build it from
                raise ValueError(
                    f"query_source='replay_prompted' builds its repeat prompt with the model's tokenizer, which could "
                    f"not be loaded from the model's name_or_path {name!r} ({type(error).__name__}: {error}): give "
                    "replay_prompt_ids (the tokens fed before the re-fed context)"
                ) from error
            self._template_prompts[name] = repeat_prompt_for(tokenizer)
        return self._template_prompts[name]

    def _finish_prefill(self, decoder: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Decoder forward hook, run only when the decoder call returns normally: when the call that started the
        prefill has every layer scored, the query source finishes (the replay pass runs here, once the prefill's
        own activations are freed) and the cache is compressed."""
        run = self._run
        if run is None or run.nested_calls > 0 or run.phase != SCORED:  # nothing scored, or a replay's nested call
            return
        with torch.no_grad():  # scoring and compression are never differentiated, even if the forward is
            run.source.finish(run, run.cache)
            self._compress(run, run.cache)
        self._attachment.compressed.add(run.cache)

    def _end_prefill(self, decoder: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Decoder forward hook, run however the forward ends (``always_call``): the prefill's state goes when
        the decoder call that started it ends."""
        if self._run is not None and self._run.nested_calls > 0:  # a replay pass's nested call
            self._run.nested_calls -= 1
            return
        self._end_run()

    # -- scoring (forward hook) ---------------------------------------------------------------------------

    def forward_hook(self, module: nn.Module, input: list, kwargs: dict, output: list):
        run = self._run
        if run is None or run.phase != PREFILL:
            return output
        cache = kwargs.get("past_key_values")
        if cache is None:
            raise ValueError("ComposePress needs a cache: call the model with past_key_values=DynamicCache()")
        run.cache = cache if run.cache is None else run.cache  # transformers makes one when none is given
        if cache is not run.cache:  # another press's replay pass, nested in this prefill
            return output
        with torch.no_grad():  # scoring is never differentiated, even if the forward is
            keys, values = layer_states(cache, module.layer_idx)
            run.source.score_layer(run, module, keys, values, output[1], kwargs)
        if module.layer_idx == run.n_layers - 1:
            run.close()  # the prefill's captured attention is no longer needed
            run.phase = SCORED  # compressed when the decoder call returns (_finish_prefill)
        return output

    # -- allocation and compression -----------------------------------------------------------------------

    def _compress(self, run: PrefillRun, cache):
        scores = with_sinks_kept(self._stacked_scores(run, cache), run.inputs.valid, self.n_sink)
        if self.structured:
            n_kept = compute_n_kept(scores.shape[0] * scores.shape[-1], self.compression_ratio)
            self.compress_scored(cache, scores, n_kept)
        else:
            sorted_scores, token_order = self._ranked(scores)
            self._mask_unstructured(run, sorted_scores, token_order)

    def _ranked(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's scores, enhanced as the settings say, sorted, with the token order (``rank_tokens``)."""
        if self.add_mean_across_heads:
            scores = scores + scores.mean(dim=2, keepdim=True)
        if not self.composite_tokens:  # one ranking per layer, shared by every head
            scores = aggregate(scores, self.agg_head, dim=2)[:, :, None].expand_as(scores).contiguous()
        self.last_scores = scores
        return rank_tokens(scores)

    def compress_scored(self, cache, scores: torch.Tensor, n_kept: int) -> None:
        """Keep ``n_kept`` composite tokens over every layer of ``cache``, from ``(layers, batch, kv_heads, n)``
        scores (``-inf``: never kept): composite tokens and the layer allocation as the settings say. The
        prefill uses it at ``compression_ratio``; :class:`~kvpress_compose.ComposeDecodingPress` during decoding."""
        sorted_scores, token_order = self._ranked(scores)
        self._compress_structured(cache, sorted_scores, token_order, n_kept)

    def layer_scores_enhanced(self, scores: torch.Tensor, cache, layer_idx: int, valid: torch.Tensor) -> torch.Tensor:
        """``(batch, kv_heads, n)`` scores of a layer with the value-norm enhancement, and -inf where ``valid``
        ``(batch, n)`` is False (padding)."""
        if self.add_v_norm:
            _, values = layer_states(cache, layer_idx)
            scores = scores * values[:, :, : scores.shape[2]].float().norm(dim=-1)
        if scores.shape[2] == valid.shape[1]:
            scores = scores.masked_fill(~valid[:, None].to(scores.device), float("-inf"))
        return scores

    def _stacked_scores(self, run: PrefillRun, cache) -> torch.Tensor:
        """``(layers, batch, kv_heads, n)`` scores on one device; positions a layer lacks are -inf."""
        row_lengths = run.inputs.valid.sum(dim=1)
        short_row = int(row_lengths.argmin())
        if int(row_lengths[short_row]) < self.min_tokens_per_layer:
            raise ValueError(
                f"row {short_row} of the batch has {int(row_lengths[short_row])} context tokens (the rest is "
                f"padding), fewer than min_tokens_per_layer={self.min_tokens_per_layer}"
            )
        layer_scores = [self.layer_scores_enhanced(run.source.layer_scores(run, layer_idx), cache, layer_idx,
                                                   run.inputs.valid) for layer_idx in range(run.n_layers)]
        check_cache_unchanged([cache.get_seq_length(i) for i in range(run.n_layers)],
                              [scores.shape[2] for scores in layer_scores])
        return stack_layer_scores(layer_scores)

    def _compress_structured(self, cache, sorted_scores, token_order, n_kept: int):
        n_layers, _, _, n = sorted_scores.shape
        if n_layers * self.min_tokens_per_layer > n_kept:
            logger.warning(
                f"min_tokens_per_layer={self.min_tokens_per_layer} over {n_layers} layers keeps "
                f"{n_layers * self.min_tokens_per_layer} composite tokens, more than the {n_kept} that "
                f"the budget allows"
            )
            n_kept = n_layers * self.min_tokens_per_layer
        if self.layer_allocation == "global_normalized":
            sorted_scores = per_head_shares(sorted_scores)
        composite = composite_scores(sorted_scores, self.agg_head)
        if self.layer_allocation == "uniform":
            budgets = uniform_budgets(composite, n_kept, self.min_tokens_per_layer)
        else:
            floor = floor_per_layer(n_kept, n_layers, self.layer_floor, self.min_tokens_per_layer)
            budgets = layer_budgets(composite, n_kept, floor)
        if self.layer_allocation != "uniform" and int(budgets.sum()) < n_kept:
            logger.warning(
                f"kept {int(budgets.sum())} composite tokens instead of {n_kept}: batch rows share one length per "
                "layer and padding is never kept, so the shortest row bounds each layer"
            )
        self.last_budgets = budgets.cpu()
        for layer_idx, budget in enumerate(self.last_budgets.tolist()):
            compress_layer(cache, layer_idx, kept_positions(token_order[layer_idx], budget))
        logger.info(  # kvpress's pipeline logs layer 0's length only, which says little here
            f"ComposePress kept {int(budgets.sum())} of {n_layers * n} entries per KV head (budget {n_kept}, "
            f"compression_ratio={self.compression_ratio}); per layer: {self.last_budgets.tolist()}"
        )

    def _mask_unstructured(self, run: PrefillRun, sorted_scores, token_order):
        budgets = head_budgets(sorted_scores, self.compression_ratio, self.min_tokens_per_layer)  # (b, L, H)
        self.last_budgets = budgets.cpu()
        mask_evicted_entries(run.attention_modules, token_order, budgets)


class DecoderAttachment:
    """ComposePress's hooks on a decoder stack: a pre-hook that starts a :class:`PrefillRun` for a fresh
    prefill, a forward hook that finishes and compresses it when the forward returns, and one run however the
    forward ends that drops it.

    They last while the press's kvpress forward hooks are registered: the press's own ``with press(model):``
    removes them on exit. A wrapper (kvpress's ``ComposedPress``, ``PrefillDecodingPress``, ...) never tells its
    presses that it exited, so at its first forward the pre-hook watches the wrapper's forward hook and removes
    ours when that hook goes (a finalizer on it); if the block saw no forward, the pre-hook removes ours at the
    next forward, which it leaves untouched."""

    def __init__(self, press: ComposePress, language_model: nn.Module, attention_modules: list[nn.Module]):
        self.press, self.language_model, self.attention_modules = press, language_model, attention_modules
        self.local_span = local_attention_span(language_model.config.get_text_config())
        self.compressed = weakref.WeakSet()  # caches this press compressed while attached
        self.watched: set[int] = set()  # ids of the kvpress hooks whose removal removes ours
        self.handles = [
            language_model.register_forward_pre_hook(press._start_prefill, with_kwargs=True),
            language_model.register_forward_hook(press._finish_prefill, with_kwargs=True),
            language_model.register_forward_hook(press._end_prefill, with_kwargs=True, always_call=True),
        ]

    def press_is_hooked(self) -> bool:
        """Whether a kvpress forward hook that reaches the press (itself, or a press wrapping it) is registered
        on the attention modules; the wrappers' hooks are watched so that their removal removes ours."""
        hooks = [hook for module in self.attention_modules for hook in module._forward_hooks.values()
                 if wraps_press(getattr(hook, "__self__", None), self.press)]
        for hook in hooks:
            if getattr(hook, "__self__", None) is not self.press and id(hook) not in self.watched:
                self.watched.add(id(hook))
                weakref.finalize(hook, self.press._detach_from, self)
        return bool(hooks)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def wraps_press(outer, press: BasePress) -> bool:
    """Whether ``outer`` is ``press`` or a kvpress press holding it in any field, however deep (``presses`` of a
    ComposedPress, ``press``, ``base_press``, ``prefilling_press``, ``decoding_press``, ...)."""
    if outer is press:
        return True
    if not isinstance(outer, BasePress) or not dataclasses.is_dataclass(outer):
        return False
    for field_ in dataclasses.fields(outer):
        value = getattr(outer, field_.name, None)
        for child in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(child, BasePress) and wraps_press(child, press):
                return True
    return False


def refuse_more_context(attachment: DecoderAttachment, cache, arguments: dict) -> None:
    """A forward of several tokens into a cache this press compressed while attached would be a second chunk of
    the context (a chunked prefill): ComposePress scored and compressed only the first."""
    reference = arguments.get("input_ids")
    reference = reference if reference is not None else arguments.get("inputs_embeds")
    if reference is not None and reference.shape[1] > 1 and cache in attachment.compressed:
        raise ValueError(
            f"a forward of {reference.shape[1]} tokens into a cache ComposePress has compressed, while the press is "
            "in use: ComposePress compresses the context of one prefill forward, so a context fed in chunks would "
            "be compressed only up to its first chunk. Feed the whole context in one forward; run later tokens "
            "(a question) after the `with press(model)` block, or one at a time"
        )


def language_model_of(model: PreTrainedModel) -> nn.Module:
    """The decoder stack whose layers have ``self_attn`` modules, with a rotary embedding; clear error if none."""
    inner = getattr(model, "model", None)
    language_model = getattr(inner, "language_model", inner)
    layers = getattr(language_model, "layers", None)
    if inner is None and getattr(model, "layers", None) is not None:
        raise ValueError(
            f"pass the whole model (e.g. LlamaForCausalLM), not its decoder stack {type(model).__name__}: "
            "use `with press(model):` around `model.model(...)`"
        )
    if layers is None or len(layers) == 0 or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"{type(model).__name__} is not supported: ComposePress needs a RoPE decoder whose layers have "
            "self_attn (Llama, Mistral, Qwen2, Qwen3, Phi3)"
        )
    if getattr(language_model, "rotary_emb", None) is None:
        raise ValueError(f"{type(model).__name__} is not supported: ComposePress needs a rotary (RoPE) model")
    return language_model


def local_attention_span(config) -> int | None:
    """The most keys back a query can see where attention is local: the sliding window (Mistral, Qwen2) or
    the attention chunk (Llama 4), whichever is set and smaller; None for full attention."""
    spans = [getattr(config, name, None) for name in ("sliding_window", "attention_chunk_size")]
    spans = [span for span in spans if span]
    return min(spans) if spans else None


# -- settings: each checked and normalised whenever it is set --------------------------------------------------


def ratio_setting(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not 0 <= value < 1:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def positive_int_setting(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def non_negative_int_setting(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def fraction_setting(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not 0 <= value <= 1:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


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


def token_ids_setting(name, value):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if (isinstance(value, (str, bytes)) or not hasattr(value, "__iter__")):
        raise TypeError(f"{name} must be a sequence of token ids (ints) or None, got {type(value).__name__}")
    value = tuple(value)
    if not value or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"{name} must be a non-empty sequence of token ids (ints >= 0), got {value!r}")
    return tuple(int(v) for v in value)


def scorer_setting(name, value):
    if value is not None and not isinstance(value, ScorerPress):
        raise TypeError(f"{name} must be a kvpress ScorerPress, got {type(value).__name__}")
    return value


SETTINGS = {
    "compression_ratio": ratio_setting,
    "query_source": choice_setting(QUERY_SOURCES),
    "structured": bool_setting,
    "layer_allocation": choice_setting(LAYER_ALLOCATIONS),
    "composite_tokens": bool_setting,
    "scorer": scorer_setting,
    "agg_task": choice_setting(AGGREGATIONS),
    "agg_group": choice_setting(AGGREGATIONS),
    "agg_head": choice_setting(AGGREGATIONS),
    "add_v_norm": bool_setting,
    "add_mean_across_heads": bool_setting,
    "min_tokens_per_layer": positive_int_setting,
    "n_sink": non_negative_int_setting,
    "layer_floor": fraction_setting,
    "replay_prompt_ids": token_ids_setting,
    "score_block_size": optional_positive_int_setting,
}
