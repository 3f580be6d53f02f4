"""One command for both studies: ``python -m evaluation.studies --model <model>``.

A real model's short name (:data:`evaluation.model_zoo.real_models.REAL_MODELS`, e.g. ``smollm2-135m``) runs the
real-model study (:mod:`evaluation.studies.real_study`: RULER's tasks in the model's tokens, its own options); any
other model (a folder, a hub id, or none: the shipped GQA toy model) runs the toy study
(:mod:`evaluation.studies.toy_study`: the word-level tasks). ``--help`` shows the toy study's options;
``--model smollm2-135m --help`` the real one's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..model_zoo.real_models import REAL_MODELS
from . import real_study, toy_study


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--model")
    if peek.parse_known_args(argv)[0].model in REAL_MODELS:  # RULER's tasks in the model's tokens
        return real_study.main(argv)
    return toy_study.main(argv)


if __name__ == "__main__":
    main()
