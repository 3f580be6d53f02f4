"""How far a press moves a model from its uncompressed self, on any causal LM.

For one context and a question with its reference answer:

- ``kl``: the mean KL divergence KL(uncompressed || compressed) of the next-token distributions at every
  question and answer position (teacher forcing);
- ``first_divergence``: the first of ``n_greedy`` greedily generated answer tokens where the compressed cache's
  continuation differs from the uncompressed one's (``None`` when all agree).

Both runs prefill the context into a ``DynamicCache`` (with and without the press) through the base model, as
kvpress's pipeline does, and then give the question and answer tokens the positions that follow the *original*
context length, whatever the press kept.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from kvpress import BasePress
from transformers import Cache, DynamicCache, PreTrainedModel

from ..runner.presses import reset_press_state


@dataclass
class Fidelity:
    """One row's fidelity: mean KL over the teacher-forced tokens and the first greedy token that differs."""

    kl: float
    first_divergence: int | None
    n_greedy: int


@dataclass
class _Trace:
    """What one cache makes of the continuation: log-probabilities (teacher forcing) and greedy tokens."""

    log_probs: torch.Tensor  # (question + answer tokens, vocab)
    greedy: torch.Tensor  # (n_greedy,)


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    context_ids: torch.Tensor,
    press: BasePress | None = None,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
) -> Cache:
    """The context's KV cache (a new ``DynamicCache`` unless ``cache`` is given), compressed by ``press``
    (``None``: uncompressed), filled through the base model as kvpress's pipeline does."""
    cache = DynamicCache() if cache is None else cache
    with press(model) if press is not None else nullcontext():
        model.model(input_ids=context_ids, attention_mask=attention_mask, past_key_values=cache)
    return cache


def _positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device)[None]


def teacher_forced_log_probs(
    model: PreTrainedModel, cache: DynamicCache, ids: torch.Tensor, start: int
) -> torch.Tensor:
    """Next-token log-probabilities at each of ``ids``' positions, which start at position ``start``."""
    positions = _positions(start, ids.shape[1], ids.device)
    logits = model(input_ids=ids, past_key_values=cache, position_ids=positions).logits
    return logits[0].float().log_softmax(-1)


def greedy_tokens(
    model: PreTrainedModel, cache: DynamicCache, prompt_ids: torch.Tensor, start: int, n: int
) -> torch.Tensor:
    """``n`` greedily decoded tokens after ``prompt_ids`` (placed at position ``start`` onwards)."""
    tokens, ids, position = [], prompt_ids, start
    for _ in range(n):
        positions = _positions(position, ids.shape[1], ids.device)
        logits = model(input_ids=ids, past_key_values=cache, position_ids=positions, logits_to_keep=1).logits
        tokens.append(logits[0, -1].argmax())
        position += ids.shape[1]
        ids = tokens[-1].view(1, 1)
    return torch.stack(tokens)


def _trace(model, context_ids, question_ids, answer_ids, press, n_greedy) -> _Trace:
    """Prefill with ``press`` and run the continuation both ways (teacher forcing on a copy of the cache)."""
    cache = prefill(model, context_ids, press)
    start = context_ids.shape[1]
    continuation = torch.cat([question_ids, answer_ids], dim=1)
    log_probs = teacher_forced_log_probs(model, copy.deepcopy(cache), continuation, start)
    return _Trace(log_probs, greedy_tokens(model, cache, question_ids, start, n_greedy))


@torch.no_grad()
def fidelity(
    model: PreTrainedModel,
    context_ids: torch.Tensor,
    question_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    press: BasePress | None,
    n_greedy: int = 8,
) -> Fidelity:
    """Compare the uncompressed model with the ``press``-compressed one on one context and continuation.

    All ids are ``(1, length)`` tensors on the model's device; ``answer_ids`` may be empty. The uncompressed
    run goes first and the compressed one last, since head-wise presses leave masks on the attention modules
    that the compressed cache's decoding needs.
    """
    if n_greedy < 1:
        raise ValueError(f"n_greedy must be >= 1, got {n_greedy}")
    reset_press_state(model)
    reference = _trace(model, context_ids, question_ids, answer_ids, None, n_greedy)
    compressed = _trace(model, context_ids, question_ids, answer_ids, press, n_greedy)
    kl = torch.nn.functional.kl_div(compressed.log_probs, reference.log_probs, log_target=True, reduction="none")
    differs = (reference.greedy != compressed.greedy).nonzero()
    first = int(differs[0, 0]) if len(differs) else None
    return Fidelity(kl=kl.sum(-1).mean().item(), first_divergence=first, n_greedy=n_greedy)


def summarize(results: list[Fidelity]) -> dict[str, float | int]:
    """Averages over rows: KL, first divergence (rows that never diverge count ``n_greedy``), diverged share."""
    if not results:
        raise ValueError("no fidelity results to summarize")
    n = len(results)
    firsts = [r.n_greedy if r.first_divergence is None else r.first_divergence for r in results]
    return {
        "kl": sum(r.kl for r in results) / n,
        "first_divergence": sum(firsts) / n,
        "diverged": sum(r.first_divergence is not None for r in results) / n,
        "rows": n,
        "n_greedy": results[0].n_greedy,
    }
