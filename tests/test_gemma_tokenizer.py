"""The Gemma tokenizer rebuilt from a GGUF file: SentencePiece BPE segmentation, <bos>, byte fallback, round trips.

Fast tests write a tiny GGUF holding a hand-made SentencePiece BPE vocabulary; the slow test reads the real
Gemma-3-270M GGUF when it has been assembled (``python -m evaluation.model_zoo.real_models gemma3-270m``).
"""

import random
from itertools import pairwise

import pytest

from evaluation.model_zoo.gemma_tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    USER_DEFINED,
    fixed_gemma_tokenizer,
    merges_from_scores,
    read_gguf_tokenizer,
    sentencepiece_pieces,
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# User-defined pieces as GGUF converters store them: space runs with literal spaces.
USER = ["\n", "\n\n", "  ", "   ", "<b>"]
BYTES = [f"<0x{byte:02X}>" for byte in range(256)]
# Normal pieces in merge order (score = -rank), as SentencePiece BPE stores them; single characters last.
MERGED = ["▁t", "he", "▁the", "bc", "ab", "▁c", "ap", "it", "al", "▁cap", "ital", "▁capital", "▁a", "▁is", "is"]
CHARS = ["▁", "t", "h", "e", "a", "b", "c", "p", "i", "l", "s", "1", "2", "3", "é"]


def tiny_vocab():
    tokens = SPECIALS + USER + BYTES + MERGED + CHARS
    types = ([CONTROL] * len(SPECIALS) + [USER_DEFINED] * len(USER) + [BYTE] * len(BYTES)
             + [NORMAL] * (len(MERGED) + len(CHARS)))
    scores = [-1000.0] * (len(SPECIALS) + len(USER)) + [0.0] * len(BYTES)
    scores += [-float(rank) for rank in range(len(MERGED) + len(CHARS))]
    return tokens, scores, types


def write_gguf(path, model="llama", add_bos=True, chat_template=None, tokens=None):
    from gguf import GGUFWriter

    vocab, scores, types = tiny_vocab()
    if tokens is not None:
        vocab, scores, types = tokens
    writer = GGUFWriter(path, "gemma3")
    writer.add_context_length(128)
    writer.add_tokenizer_model(model)
    writer.add_token_list(vocab)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tokenizer(tiny_gguf):
    return fixed_gemma_tokenizer(tiny_gguf)


@pytest.fixture(scope="module")
def pieces(tiny_gguf):
    """The tiny vocabulary as SentencePiece spells it (space runs as ▁ runs)."""
    return sentencepiece_pieces(read_gguf_tokenizer(tiny_gguf))


def sentencepiece_bpe(text, pieces, scores, types):
    """SentencePiece's BPE encoding, written out plainly: spaces become ▁ (no dummy prefix); user-defined pieces
    are matched whole (longest first) and never merged; then, repeatedly, the adjacent pair whose concatenation is
    the best-scoring normal piece is merged (leftmost first); what is left outside the vocabulary becomes bytes."""
    ids = {piece: index for index, piece in enumerate(pieces)}
    normal = {piece: score for piece, score, kind in zip(pieces, scores, types) if kind == NORMAL}
    user = sorted((piece for piece, kind in zip(pieces, types) if kind == USER_DEFINED), key=len, reverse=True)
    text = text.replace(" ", "▁")
    symbols, position = [], 0  # (piece, atomic)
    while position < len(text):
        match = next((piece for piece in user if text.startswith(piece, position)), None)
        symbols.append((match, True) if match else (text[position], False))
        position += len(match) if match else 1
    while True:
        candidates = [(normal[left + right], -index) for index, ((left, a), (right, b))
                      in enumerate(pairwise(symbols)) if not a and not b and left + right in normal]
        if not candidates:
            break
        index = -max(candidates)[1]
        symbols[index:index + 2] = [(symbols[index][0] + symbols[index + 1][0], False)]
    out = []
    for piece, _ in symbols:
        out += [ids[piece]] if piece in ids else [ids[f"<0x{byte:02X}>"] for byte in piece.encode("utf-8")]
    return out


def test_reads_the_gguf_fields(tiny_gguf):
    data = read_gguf_tokenizer(tiny_gguf)
    tokens, scores, types = tiny_vocab()
    assert (data.model, data.tokens, data.token_types) == ("llama", tokens, types)
    assert data.scores == scores
    assert (data.bos_id, data.eos_id, data.unk_id, data.pad_id) == (2, 1, 3, 0)
    assert (data.add_bos, data.add_eos, data.add_space_prefix, data.merges) == (True, False, False, None)
    assert data.context_length == 128
    pieces = sentencepiece_pieces(data)
    assert pieces[len(SPECIALS) + 2:len(SPECIALS) + 4] == ["▁▁", "▁▁▁"]  # space runs as SentencePiece spells them


def test_merges_follow_the_merged_piece_score():
    tokens, scores, types = tiny_vocab()
    merges = merges_from_scores(tokens, scores, types)
    assert merges[:4] == [("▁", "t"), ("h", "e"), ("▁t", "he"), ("b", "c")]
    # every split of a merged piece into two normal pieces: "▁cap" from ▁c + ap, "▁capital" from ▁cap + ital
    assert ("▁c", "ap") in merges and ("it", "al") in merges and ("▁cap", "ital") in merges
    assert all(left + right in tokens for left, right in merges)
    assert not any("<" in left or "\n" in left for left, _ in merges)  # bytes and user-defined pieces never merge


@pytest.mark.parametrize("text, expected", [
    ("the", ["t", "he"]),                        # no dummy prefix: "the" is not "▁the"
    (" the", ["▁the"]),
    ("abc", ["a", "bc"]),                        # bc is merged before ab: BPE order, not longest match
    (" capital", ["▁capital"]),                  # ▁c ap it al -> ▁cap ital -> ▁capital
    ("capital", ["c", "ap", "ital"]),
    ("the capital is", ["t", "he", "▁capital", "▁is"]),
    ("a  b", ["a", "▁▁", "b"]),                  # user-defined space run taken whole
    ("a     b", ["a", "▁▁▁", "▁▁", "b"]),        # longest first
    ("t\n\nhe\n", ["t", "\n\n", "he", "\n"]),
    ("<b>is", ["<b>", "is"]),
    ("123", ["1", "2", "3"]),
    ("zé", ["<0x7A>", "é"]),                     # byte fallback for a character outside the vocabulary
    ("日", ["<0xE6>", "<0x97>", "<0xA5>"]),
])
def test_segments_like_sentencepiece_bpe(tokenizer, pieces, text, expected):
    ids = tokenizer(text).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>"] + expected
    _, scores, types = tiny_vocab()
    assert ids[1:] == sentencepiece_bpe(text, pieces, scores, types)


def test_matches_sentencepiece_bpe_on_random_text(tokenizer, pieces):
    _, scores, types = tiny_vocab()
    rng = random.Random(0)
    alphabet = list("thecapbils123é") + [" ", " ", " ", "\n", "z", "日", "<b>"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids == sentencepiece_bpe(text, pieces, scores, types), repr(text)


def test_adds_bos_and_sets_the_special_tokens(tokenizer, tmp_path):
    assert tokenizer(" the").input_ids == [2, tokenizer.convert_tokens_to_ids("▁the")]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<bos>", "<eos>", "<pad>", "<unk>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        2, 1, 0, 3)
    assert tokenizer.model_max_length == 128
    pair = tokenizer(" the", " is").input_ids
    assert pair == [2, tokenizer.convert_tokens_to_ids("▁the"), 2, tokenizer.convert_tokens_to_ids("▁is")]
    no_bos = fixed_gemma_tokenizer(write_gguf(tmp_path / "no_bos.gguf", add_bos=False))
    assert no_bos(" the").input_ids == [tokenizer.convert_tokens_to_ids("▁the")]


def test_control_pieces_are_special(tokenizer):
    ids = tokenizer("<start_of_turn>the<end_of_turn>").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "<start_of_turn>", "t", "he", "<end_of_turn>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the"


@pytest.mark.parametrize("text", ["the capital is", "  the\n\n  cap\tital  ", "日本 é zz 123", "🙂\n", " "])
def test_decoding_round_trips(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == "<bos>" + text


def test_saved_tokenizer_reloads_the_same(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["the capital is", "a     b\n\n", "abc 日 zé", "<start_of_turn>is"]:
        assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded.bos_token_id == 2 and reloaded.eos_token_id == 1


def test_keeps_the_chat_template(tmp_path):
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    assert fixed_gemma_tokenizer(write_gguf(tmp_path / "chat.gguf", chat_template=template)).chat_template == template


def test_rejects_what_it_cannot_build(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'gpt2'"):
        fixed_gemma_tokenizer(write_gguf(tmp_path / "gpt2.gguf", model="gpt2"))
    tokens, scores, types = tiny_vocab()
    keep = [index for index, kind in enumerate(types) if kind != BYTE]
    no_bytes = ([tokens[i] for i in keep], [scores[i] for i in keep], [types[i] for i in keep])
    with pytest.raises(ValueError, match="no byte pieces"):
        fixed_gemma_tokenizer(write_gguf(tmp_path / "no_bytes.gguf", tokens=no_bytes))
    with pytest.raises(FileNotFoundError, match="gguf_path"):
        fixed_gemma_tokenizer(tmp_path / "missing.gguf")


@pytest.mark.slow
def test_real_gemma_gguf_segments_words():
    from evaluation.model_zoo.real_models import cache_root

    path = cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not assembled (python -m evaluation.model_zoo.real_models gemma3-270m)")
    tokenizer = fixed_gemma_tokenizer(path)
    ids = tokenizer("The capital of France is").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]
    assert ids[0] == 2
    assert tokenizer.tokenize("In 2023") == ["In", "▁", "2", "0", "2", "3"]
    data = read_gguf_tokenizer(path)
    pieces = sentencepiece_pieces(data)
    text = ("The special magic number is: 4729183.\n\nIt   was a  bright cold day in April, and the clocks were "
            "striking thirteen. Ünïcödé, 日本語 and émojis 🙂\tare split into pieces or bytes.")
    assert tokenizer(text, add_special_tokens=False).input_ids == sentencepiece_bpe(
        text, pieces, data.scores, data.token_types)
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
