"""A correct fast tokenizer for a GGUF-converted Gemma model, built from the vocabulary the GGUF file holds.

A GGUF file stores a SentencePiece tokenizer (``tokenizer.ggml.model == "llama"``) as parallel arrays: the
pieces (``tokenizer.ggml.tokens``), one score each (``.scores``) and one SentencePiece piece type each
(``.token_type``: 1 normal, 3 control, 4 user-defined, 6 byte), plus the ids of ``<bos>``/``<eos>``/``<unk>``/
``<pad>`` and whether to add ``<bos>``/``<eos>``. Gemma's SentencePiece model is BPE with byte fallback, and for
a BPE model the score of a normal piece is minus its merge rank (``▁t`` 0, ``in`` -1, ...). It holds no merges.

transformers 5.2 turns that into a *Unigram* model over the same (piece, score) pairs. Unigram picks the
segmentation with the largest total score, and with scores that are minus merge ranks a long, late-merged
piece (``▁capital``, -4785) loses to a chain of short early pieces (``▁c`` ``ap`` ``it`` ``al``, about -2300
together): text comes out in characters and short fragments. It also drops ``add_bos_token``, so no ``<bos>``
is added, which Gemma needs.

:func:`fixed_gemma_tokenizer` rebuilds what SentencePiece BPE does: a ``tokenizers`` BPE model over the same
vocabulary with byte fallback, whose merges are derived from the scores (a merge for every split of a normal
piece into two normal pieces, ranked by the merged piece's score, which is the order SentencePiece merges
adjacent symbols in); spaces normalized to ``▁`` with no dummy prefix; control pieces as special tokens and
user-defined pieces (newline, tab and space runs, HTML tags) as atomic added tokens, as SentencePiece matches
them before merging; ``<bos>`` prepended by the post-processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# SentencePiece piece types as GGUF stores them (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE_MARK = "▁"  # SentencePiece's visible space


@dataclass(frozen=True)
class GGUFTokenizer:
    """The tokenizer fields of a GGUF file.

    Parameters
    ----------
    model : str
        ``tokenizer.ggml.model``: ``"llama"`` for SentencePiece.
    tokens : list[str]
        The pieces, by id. User-defined pieces keep the literal spaces GGUF converters write for ``▁``.
    scores : list[float]
        One score per piece: for a SentencePiece BPE model, minus the merge rank of normal pieces.
    token_types : list[int]
        One SentencePiece piece type per piece (:data:`NORMAL`, :data:`CONTROL`, :data:`USER_DEFINED`, :data:`BYTE`...).
    merges : list[str] | None
        ``tokenizer.ggml.merges`` (``"left right"``) when the file has them; SentencePiece files have none.
    bos_id, eos_id, unk_id, pad_id : int | None
        Ids of the special pieces (``None`` when the file does not name one).
    add_bos, add_eos : bool
        Whether encoding prepends ``<bos>`` / appends ``<eos>``.
    add_space_prefix : bool
        Whether SentencePiece prepends a space to the text (Gemma: no).
    chat_template : str | None
        ``tokenizer.chat_template`` when present (instruction-tuned models).
    context_length : int | None
        ``<architecture>.context_length``: the model's longest input.
    """

    model: str
    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    context_length: int | None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf_tokenizer(gguf_path: Path) -> GGUFTokenizer:
    """The tokenizer fields of the GGUF file at ``gguf_path`` (read with the ``gguf`` package's GGUFReader)."""
    from gguf import GGUFReader

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"gguf_path: expected a GGUF file, {gguf_path} does not exist")
    reader = GGUFReader(gguf_path)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"gguf_path: {gguf_path.name} holds no tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    for name, values in (("scores", scores), ("token_type", types)):
        if values is None or len(values) != len(tokens):
            raise ValueError(f"gguf_path: {gguf_path.name}'s tokenizer.ggml.{name} should have one entry per token "
                             f"({len(tokens)}), has {None if values is None else len(values)}")
    architecture = _field(reader, "general.architecture")
    return GGUFTokenizer(
        model=_field(reader, "tokenizer.ggml.model", ""),
        tokens=list(tokens),
        scores=[float(score) for score in scores],
        token_types=[int(kind) for kind in types],
        merges=_field(reader, "tokenizer.ggml.merges"),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        unk_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
        pad_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
        context_length=_field(reader, f"{architecture}.context_length") if architecture else None,
    )


def sentencepiece_pieces(data: GGUFTokenizer) -> list[str]:
    """The pieces as SentencePiece spells them: GGUF converters write user-defined pieces' ``▁`` as a space
    (Gemma's runs of 2 to 31 spaces), which we turn back, so they match the ``▁``-normalized text."""
    return [token.replace(" ", SPACE_MARK) if kind == USER_DEFINED else token
            for token, kind in zip(data.tokens, data.token_types)]


def merges_from_scores(pieces: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE's merges, derived from the vocabulary: a merge ``(left, right)`` for every normal piece
    that is the concatenation of two normal pieces, ranked by the merged piece's score (highest first; ties,
    which only splits of one piece share, by id then split point). SentencePiece BPE merges, at each step, the
    adjacent pair whose concatenation is a piece with the highest score: the same order."""
    normal = {piece for piece, kind in zip(pieces, token_types) if kind == NORMAL}
    ranked = []
    for index, (piece, score, kind) in enumerate(zip(pieces, scores, token_types)):
        if kind != NORMAL:
            continue
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in normal and right in normal:
                ranked.append((-score, index, split, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _check_supported(data: GGUFTokenizer, gguf_path: Path) -> None:
    if data.model != "llama":
        raise ValueError(f"gguf_path: {gguf_path.name} has tokenizer.ggml.model {data.model!r}; expected 'llama' "
                         "(SentencePiece), the only kind this builder knows")
    if data.add_space_prefix:
        raise ValueError(f"gguf_path: {gguf_path.name} sets tokenizer.ggml.add_space_prefix; this builder follows "
                         "Gemma, whose SentencePiece model adds no dummy prefix")
    if BYTE not in data.token_types:
        raise ValueError(f"gguf_path: {gguf_path.name} has no byte pieces (<0x00>..<0xFF>); Gemma's byte fallback "
                         "needs them")
    for name, token_id in (("bos", data.bos_id), ("eos", data.eos_id), ("unknown", data.unk_id)):
        if token_id is None or not 0 <= token_id < len(data.tokens):
            raise ValueError(f"gguf_path: {gguf_path.name}'s tokenizer.ggml.{name}_token_id is {token_id}; expected "
                             f"an id in [0, {len(data.tokens)})")


def build_backend(data: GGUFTokenizer):
    """The ``tokenizers.Tokenizer`` reproducing SentencePiece BPE on ``data``'s vocabulary (see the module doc)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    pieces = sentencepiece_pieces(data)
    vocab = {piece: index for index, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError(f"the GGUF vocabulary repeats {len(pieces) - len(vocab)} pieces; expected distinct pieces")
    if data.merges:
        merges = [tuple(merge.split(" ", 1)) for merge in data.merges]
    else:
        merges = merges_from_scores(pieces, data.scores, data.token_types)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=pieces[data.unk_id], fuse_unk=True,
                            byte_fallback=True, dropout=None))
    backend.normalizer = normalizers.Replace(" ", SPACE_MARK)
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control pieces are special; user-defined ones are matched whole before BPE (longest first), as SentencePiece
    # does. Space runs are matched in the normalized text (where they are ▁ runs), the others in the raw text.
    added = [AddedToken(piece, special=kind == CONTROL, normalized=kind == USER_DEFINED and SPACE_MARK in piece)
             for piece, kind in zip(pieces, data.token_types) if kind in (CONTROL, USER_DEFINED)]
    backend.add_tokens(added)
    return backend


def fixed_gemma_tokenizer(gguf_path: Path, converted=None):
    """A ``PreTrainedTokenizerFast`` for the Gemma GGUF at ``gguf_path``, built from the tokenizer it stores.

    ``converted`` (optional) is the tokenizer transformers converted from the same file; its chat template and
    padding side are kept when the GGUF has no template of its own. The result adds ``<bos>`` (when the file
    says so), sets eos / pad / unk from the file's ids and saves like any fast tokenizer.
    """
    from transformers import PreTrainedTokenizerFast

    gguf_path = Path(gguf_path)
    data = read_gguf_tokenizer(gguf_path)
    _check_supported(data, gguf_path)
    pieces = sentencepiece_pieces(data)

    def piece(token_id):
        return None if token_id is None else pieces[token_id]

    kwargs = {}
    chat_template = data.chat_template or getattr(converted, "chat_template", None)
    if chat_template:
        kwargs["chat_template"] = chat_template
    if data.context_length:
        kwargs["model_max_length"] = int(data.context_length)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(data),
        bos_token=piece(data.bos_id),
        eos_token=piece(data.eos_id),
        unk_token=piece(data.unk_id),
        pad_token=piece(data.pad_id),
        add_bos_token=data.add_bos,
        add_eos_token=data.add_eos,
        padding_side=getattr(converted, "padding_side", "left"),
        **kwargs,
    )
    return tokenizer
