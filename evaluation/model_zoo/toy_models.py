"""The toy models: small Llamas trained from scratch on the word-level tasks (:mod:`evaluation.model_zoo.train_model`),
shipped in ``evaluation/models/``; their tokens are words, so they read the word-level tasks, not RULER's."""

from __future__ import annotations

from pathlib import Path

TOY_MODELS = Path(__file__).parents[1] / "models"
SHIPPED_MODEL = TOY_MODELS / "retrieval-llama"  # the main job's toy model (MHA)
GQA_MODEL = TOY_MODELS / "retrieval-llama-gqa"  # the toy study's (grouped-query attention)


def is_toy_model(model: str) -> bool:
    """Whether ``model`` is one of the trained toy models, which read the word-level tasks."""
    path = Path(model)
    return path.exists() and path.resolve().is_relative_to(TOY_MODELS.resolve())
