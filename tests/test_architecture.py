"""The package's shape: which modules one pipeline call enters, and no import cycle anywhere in the tree."""

import ast
import random
import sys
from pathlib import Path

from transformers import pipeline

from evaluation.tasks.word_tasks import build_tokenizer, make_sample, vocabulary
from kvpress_compose import ComposePress
from tests.models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kvpress_compose"
# one prefill's steps, in the order docs/design.md's map lists them
PIPELINE_MODULES = {
    "compose_press",  # the press, its settings' checks and its per-layer hook
    "model_attachment",  # the decoder hooks and the prefill under way
    "prefill_run",  # one prefill's inputs and what its scoring produces
    "query_sources",  # step 1: scores per layer
    "replay",  # the default source's second pass
    "attention_scores",  # attention statistics, from the model's own log-sum-exp
    "compression",  # steps 2-6: post-processing to the gather
    "layer_masks",  # the question's tokens on the compressed cache
}


def modules_entered(call) -> set[str]:
    """Names of the kvpress_compose modules whose functions run during ``call()``."""
    entered = set()

    def profile(frame, event, arg):
        if event == "call":
            path = Path(frame.f_code.co_filename)
            if path.parent == PACKAGE:
                entered.add(path.stem)

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return entered


def test_a_pipeline_call_enters_the_eight_modules_of_the_map_and_no_other():
    tokenizer = build_tokenizer()
    model = tiny_model(layers=2, vocab=len(vocabulary()))
    sample = make_sample("niah_single", 80, random.Random(0))
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")

    entered = modules_entered(lambda: pipe(sample.context, question=sample.questions[0],
                                           press=ComposePress(compression_ratio=0.5), max_new_tokens=2))

    assert entered == PIPELINE_MODULES


def local_imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` (dotted names) that the file at ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import submodule` imports the submodule; `from module import name`, the module
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_in_the_package_or_the_evaluation_tree():
    files = [path for folder in ("kvpress_compose", "evaluation") for path in (ROOT / folder).rglob("*.py")]
    names = {module_name(path): path for path in files}
    graph = {name: local_imports(path, set(names)) - {name} for name, path in names.items()}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, route = stack.pop()
            for other in graph[node]:
                if other == start:
                    return route + [start]
                if other not in seen:
                    seen.add(other)
                    stack.append((other, route + [other]))
        return None

    cycles = [route for route in map(cycle_from, graph) if route]
    assert cycles == []
