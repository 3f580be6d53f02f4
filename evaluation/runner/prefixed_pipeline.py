"""kvpress's text-generation pipeline with one answer prefix per question, the context compressed once.

RULER names the asked key in its answer prefix ("The special magic number for {key} mentioned in the provided text
is"), so the questions of one context need different prefixes; kvpress's pipeline takes one ``answer_prefix`` for
all of them. :class:`PrefixedQuestionsPipeline` also accepts a list, one prefix per question: each question is
tokenized by kvpress's own ``preprocess`` with its own prefix, and ``_forward`` (unchanged) compresses the
context once and answers every question from the compressed cache.
"""

from __future__ import annotations

from kvpress.pipeline import KVPressTextGenerationPipeline


class PrefixedQuestionsPipeline(KVPressTextGenerationPipeline):
    """``pipe(context, questions=[...], answer_prefix=[...])``: a list of prefixes, one per question; a string
    prefix works as in kvpress."""

    def _sanitize_parameters(self, answer_prefix=None, **kwargs):
        prefixes = answer_prefix if isinstance(answer_prefix, (list, tuple)) else None
        preprocess, forward, postprocess = super()._sanitize_parameters(
            answer_prefix=None if prefixes is not None else answer_prefix, **kwargs)
        if prefixes is not None:
            if len(prefixes) != len(preprocess["questions"]):
                raise ValueError(f"answer_prefix: {len(prefixes)} prefixes for {len(preprocess['questions'])} "
                                 "questions; give one per question, or one string for all")
            preprocess["answer_prefix"] = [str(prefix) for prefix in prefixes]
        return preprocess, forward, postprocess

    def preprocess(self, context, questions, answer_prefix, *args, **kwargs):
        if isinstance(answer_prefix, str):
            return super().preprocess(context, questions, answer_prefix, *args, **kwargs)
        inputs = [super(PrefixedQuestionsPipeline, self).preprocess(context, [question], prefix, *args, **kwargs)
                  for question, prefix in zip(questions, answer_prefix)]
        return {"context_ids": inputs[0]["context_ids"], "questions_ids": [i["questions_ids"][0] for i in inputs]}
