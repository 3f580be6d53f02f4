"""ComposePress: KVCompose as a kvpress press."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress import BasePress, ScorerPress
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from kvpress_compose import attention_lse
from kvpress_compose.allocation import compute_n_kept, with_sinks_kept
from kvpress_compose.cache_gather import layer_states
from kvpress_compose.compression import CompositeCompression
from kvpress_compose.head_masks import install_head_mask_hooks
from kvpress_compose.layer_masks import install_layer_mask_hooks
from kvpress_compose.model_attachment import (
    DecoderAttachment,
    check_context_length,
    language_model_of,
    refuse_if_in_use,
    refuse_more_context,
    refuse_non_empty_cache,
    refuse_static_cache,
    refuse_unstructured,
)
from kvpress_compose.prefill_inputs import decoder_arguments, prefill_inputs
from kvpress_compose.prefill_run import PREFILL, SCORED, PrefillRun
from kvpress_compose.query_sources import RepeatPrompt, query_source_for, repeat_prompt_for
from kvpress_compose.settings import SETTINGS
from kvpress_compose.windowed_layers import layers_to_compress, record_window

START_LOCK = threading.Lock()  # one thread at a time checks for, and starts, a press's prefill


@dataclass
class ComposePress(CompositeCompression, BasePress):
    """KVCompose: structured KV cache compression with composite tokens and global layer allocation.

    Every (layer, KV head) scores its context tokens; each head ranks its own tokens and rank j of every head
    forms composite token j, so a layer stays one dense ``(batch, kv_heads, k_l, head_dim)`` tensor. One budget
    for the whole model is spread over layers by a global top-k of composite scores: layers whose tokens draw
    more attention keep more. Based on KVCompose (https://arxiv.org/abs/2509.05165).

    Example, given a causal LM ``model`` (Llama, Qwen, Mistral, Gemma 3, ...) and its ``tokenizer``:

    >>> import torch
    >>> from transformers import DynamicCache
    >>> press = ComposePress(compression_ratio=0.5)
    >>> context_ids = tokenizer("The secret code is 4711. " * 20, return_tensors="pt").input_ids  # (1, n)
    >>> cache = DynamicCache()
    >>> with torch.no_grad(), press(model):
    ...     _ = model(context_ids, past_key_values=cache)  # compressed when this call returns
    >>> n = context_ids.shape[1]
    >>> question_ids = tokenizer(" What is the secret code?", return_tensors="pt").input_ids
    >>> q = question_ids.shape[1]
    >>> with torch.no_grad():
    ...     logits = model(question_ids, past_key_values=cache, position_ids=torch.arange(n, n + q)[None]).logits

    Later tokens need ``position_ids`` continuing from the ORIGINAL context length ``n``, as kvpress's pipeline
    passes them: the cache is shorter than ``n`` after compression, and positions counted from its length would
    be wrong (a warning says so). ``model.generate`` inside ``with press(model):`` and kvpress's
    ``pipeline("kv-press-text-generation")`` need nothing more.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the model's context KV entries to remove, in [0, 1); checked whenever it is set.
    query_source : str, default="replay"
        Which queries score the context (one class each in :mod:`kvpress_compose.query_sources`). "replay" (the
        paper's, and the default: on a real model, SmolLM2-135M-Instruct, it is the only source that keeps the
        facts a later question asks for; docs/real-model-sources.md): the context re-fed after itself in a
        second forward pass, whose attention covers three times the prefill's (query, key) pairs; the cache never
        keeps the re-fed tokens (about 3x a plain prefill on CPU). "prefill": the prefill's own queries, causal
        (no extra pass). "bidirectional": the prefill's queries attending to every context key (no extra pass;
        on SmolLM2 it keeps a quarter of the needles' tokens and scores 0-25% where replay scores 53-69%).
        "replay_local": the replay with KVzip's cheaper attention, each re-fed chunk attending
        to the context and its own tokens only. Ignored when ``scorer`` is given. On CPU with sdpa, scoring
        reuses the log-sum-exp of the model's own attention. "prefill_seen" (needs ``agg_task="mean"``): the
        prefill's causal attention averaged over the queries that could see each key, not over all of them.
        "replay_prompted": the replay framed as an instruct model reads it, KVzip's way: the context is re-fed as
        the assistant's answer to "Repeat the previous context exactly." in the model's chat template
        (``replay_prompt_ids``); use it with ``n_sink=4``.
    structured : bool, default=True
        False gives the unstructured upper bound: per-(layer, head) budgets applied with kvpress's head-wise
        masking. That saves no memory (evicted entries are masked, not removed) and needs sdpa or flash.
    layer_allocation : str, default="global"
        "global" (the paper's, and the default): one top-k over every layer's composite scores decides how many
        each layer keeps. "uniform": every layer keeps the same number of composite tokens. On SmolLM2's RULER
        study (120 questions at 0.75) global beat uniform by 40.8 points [32.5, 49.2]: on prose haystacks a few
        layers need most of the budget. (On a 4-needle noise haystack uniform had led by 3-16 points on three
        samples of 32 questions: docs/real-model-sources.md.) With ``structured=False``, "uniform" gives every layer the same budget (its heads compete
        for it) and "global" one budget for the whole model.
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

    On a model with sliding-window or chunked-attention layers (``config.layer_types``: Gemma 3, Qwen2 with
    ``max_window_layers``, Llama 4), only the full-attention layers are compressed and ``compression_ratio`` is a
    fraction of their entries; every windowed layer is left as the model's cache keeps it (at most its window).
    Where every layer is windowed (Mistral's ``sliding_window``), the layers are compressed as full ones while the
    context fits the window, and a longer context is refused (:mod:`kvpress_compose.windowed_layers`).

    After each prefill, ``last_budgets`` holds what each compressed layer kept (``(layers,)`` composite tokens,
    or ``(batch, layers, kv_heads)`` tokens when ``structured=False``), ``last_layers`` which layers those are,
    and ``last_scores`` the scores ranked; they take no part in comparisons (two presses are equal when their
    settings are).

    One press is used by one ``with`` block at a time, on one model, from one thread: entering it again while it
    is in use (on the same model or another) raises, and so does a prefill from a second thread while another
    thread's is under way. Used sequentially, one press serves any number of blocks and models.
    """

    compression_ratio: float = 0.0
    query_source: str = "replay"
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
    last_budgets: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    last_scores: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    last_layers: list[int] | None = field(default=None, init=False, repr=False, compare=False)

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
        if not self.structured and (self.layer_allocation == "global_normalized" or not self.composite_tokens
                                    or self.layer_floor > 0):
            raise ValueError(
                "structured=False ranks every head's tokens on their own, against one budget per layer "
                "(layer_allocation='uniform') or one for the whole model ('global'): layer_allocation="
                "'global_normalized', layer_floor and composite_tokens=False apply to the structured press only"
            )

    def __post_init__(self):
        self._check_combination()
        self._attachment: DecoderAttachment | None = None  # our decoder hooks, while the press is in use
        self._run: PrefillRun | None = None  # the prefill under way, if any
        self._model_name: str | None = None  # where "replay_prompted" loads the tokenizer from
        self._template_prompts: dict[str, RepeatPrompt] = {}  # by model name, built once

    # -- being used on a model ----------------------------------------------------------------------------

    def post_init_from_model(self, model: PreTrainedModel):
        self._refuse_if_in_use()
        language_model = language_model_of(model)
        attention_modules = [layer.self_attn for layer in language_model.layers]
        if not self.structured:
            refuse_unstructured(model)
        self._model_name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        attention_lse.install()
        install_layer_mask_hooks(language_model, attention_modules)
        if not self.structured:
            install_head_mask_hooks(attention_modules)
        self._detach()
        self._attachment = DecoderAttachment(self, language_model, attention_modules, type(model).__name__)
        if self.scorer is not None:
            self.scorer.post_init_from_model(model)

    @contextmanager
    def __call__(self, model: PreTrainedModel):
        self._refuse_if_in_use()  # before the `try`: the block in use keeps its hooks
        try:
            with super().__call__(model):
                yield
        finally:
            self._detach()

    def _refuse_if_in_use(self):
        """A press entered while a block that uses it (its own or a wrapper's) is still open would take over
        that block's hooks: refused. An attachment left by a wrapper that has exited is dropped."""
        refuse_if_in_use(self._attachment)
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
        with START_LOCK:
            self._start_prefill_locked(attachment, decoder_arguments(decoder, args, kwargs))

    def _start_prefill_locked(self, attachment: DecoderAttachment, arguments: dict) -> None:
        if self._run is not None and self._run.thread != threading.get_ident():
            raise RuntimeError(
                "this ComposePress is compressing a prefill in another thread: a press serves one forward at a time. "
                "Give each thread its own model and press (copy.deepcopy), or run the forwards one after another"
            )
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
            if not attachment.hands_later_tokens_to_decoding():
                refuse_non_empty_cache(cache, arguments)
            return
        refuse_static_cache(cache)
        inputs = prefill_inputs(arguments)
        check_context_length(inputs, self.min_tokens_per_layer)
        compressed_layers = layers_to_compress(attachment.windows, inputs.length)  # windowed layers are left
        if not self.structured:
            refuse_unstructured(None, attachment, compressed_layers)
        self._run = PrefillRun(
            inputs=inputs,
            source=query_source_for(self.query_source, self.scorer, self._repeat_prompt),
            language_model=attachment.language_model,
            attention_modules=attachment.attention_modules,
            agg_task=self.agg_task,
            agg_group=self.agg_group,
            score_block_size=self.score_block_size,
            local_span=attachment.local_span,
            cache=cache,
            compressed_layers=compressed_layers,
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
        if run is None or run.thread != threading.get_ident():  # nothing under way here (another thread's is)
            return
        if run.nested_calls > 0 or run.phase != SCORED:  # nothing scored, or a replay's nested call
            return
        with torch.no_grad():  # scoring and compression are never differentiated, even if the forward is
            run.source.finish(run, run.cache)
            self._compress(run, run.cache)
        self._attachment.compressed.add(run.cache)

    def _end_prefill(self, decoder: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Decoder forward hook, run however the forward ends (``always_call``): the prefill's state goes when
        the decoder call that started it ends."""
        if self._run is not None and self._run.thread != threading.get_ident():  # another thread's prefill
            return
        if self._run is not None and self._run.nested_calls > 0:  # a replay pass's nested call
            self._run.nested_calls -= 1
            return
        self._end_run()

    # -- scoring (forward hook) ---------------------------------------------------------------------------

    def forward_hook(self, module: nn.Module, input: list, kwargs: dict, output: list):
        """kvpress's per-layer hook, called after each attention layer's forward: it *scores* that layer's context
        entries (the query source's ``score_layer``) and compresses nothing. Once the last layer is scored the
        prefill is marked scored; the cache is compressed, every layer at once under one global budget, when the
        decoder call returns (the decoder's forward hook, ``_finish_prefill``), after the prefill's own
        activations are freed. kvpress's ScorerPress, by contrast, compresses each layer in this hook."""
        run = self._run
        if run is None or run.phase != PREFILL or run.thread != threading.get_ident():
            return output
        cache = kwargs.get("past_key_values")
        if cache is None:
            raise ValueError("ComposePress needs a cache: call the model with past_key_values=DynamicCache()")
        run.cache = cache if run.cache is None else run.cache  # transformers makes one when none is given
        if cache is not run.cache:  # another press's replay pass, nested in this prefill
            return output
        if module.layer_idx in run.compressed_layers:  # a windowed layer of a hybrid model is left as it is
            with torch.no_grad():  # scoring is never differentiated, even if the forward is
                keys, values = layer_states(cache, module.layer_idx)
                run.source.score_layer(run, module, keys, values, output[1], kwargs)
        if module.layer_idx == run.n_layers - 1:
            run.close()  # the prefill's captured attention is no longer needed
            run.phase = SCORED  # compressed when the decoder call returns (_finish_prefill)
        return output

    # -- allocation and compression -----------------------------------------------------------------------

    def _compress(self, run: PrefillRun, cache):
        scores = with_sinks_kept(self._stacked_scores(run, cache), run.inputs.valid, self.n_sink)  # compressed layers'
        if self.structured:
            n_kept = compute_n_kept(scores.shape[0] * scores.shape[-1], self.compression_ratio)
            positions = self.compress_scored(cache, scores, n_kept, run.compressed_layers)
            for layer_idx, kept in positions.items():  # a windowed layer compressed as a full one (short context)
                window = self._attachment.windows[layer_idx]
                if window is not None:
                    record_window(cache.layers[layer_idx], window, kept, run.inputs.valid)
        else:
            sorted_scores, token_order = self._ranked(scores)
            self._mask_unstructured(run, sorted_scores, token_order)
