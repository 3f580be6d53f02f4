"""Run kvpress's own ``evaluation/evaluate.py`` on ComposePress and any kvpress press, offline or online.

    pip install -e ".[kvpress-eval]"      # what kvpress's evaluation imports (rouge, nltk, jieba, ...)
    python -m evaluation data --out evaluation/data/kvpress-synthetic-1024 --contexts 20 --words 1024
    python -m evaluation.runner.kvpress_evaluate --kvpress-dir ~/kvpress -- \\
        --dataset synthetic --data_dir kvpress-synthetic-1024 --model evaluation/models/retrieval-llama \\
        --press_name compose_replay --compression_ratio 0.5

``--kvpress-dir`` is a checkout of https://github.com/NVIDIA/kvpress (the wheel does not ship its
``evaluation/`` folder). Everything after ``--`` goes to kvpress's ``evaluate.py`` unchanged, which writes its
own ``{output_dir}/{dataset}__{data_dir}__{model}__{press}__{ratio:.2f}/`` with ``predictions.csv``,
``metrics.json`` and ``config.yaml``. ``output_dir`` is ``results/kvpress`` unless ``--output_dir`` (or a
``--config_file``) is passed: not kvpress's ``./results``, where our sweep's runs (``results/sweep``) would
share folder names with kvpress's. Before it runs, this module adds to kvpress's registries, leaving every
name kvpress already has as it is:

- ``PRESS_REGISTRY``: the ComposePress variants of :data:`evaluation.runner.presses.COMPOSE_PRESSES`;
- ``DATASET_REGISTRY`` and ``SCORER_REGISTRY``: ``--dataset-name`` (``synthetic``) for the local datasets under
  ``--data-root`` (``evaluation/data``; ``--data_dir`` then names one folder there, written by
  ``python -m evaluation.tasks.dataset_files``), scored by kvpress's own RULER scorer.

kvpress's hub datasets (``--dataset ruler --data_dir 4096``) work as in kvpress, given hub access.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path
from types import ModuleType

from ..tasks.dataset_files import DEFAULT_DATA_ROOT
from .presses import quiet_press_construction, register_with_kvpress

KVPRESS_SCORER_FOR_LOCAL_DATA = "ruler"  # our tasks are RULER-style: kvpress's RULER scorer reads them
DEFAULT_OUTPUT_DIR = "results/kvpress"  # our sweep's runs go to results/sweep


def with_output_dir(kvpress_args: list[str]) -> list[str]:
    """``kvpress_args`` with ``--output_dir`` :data:`DEFAULT_OUTPUT_DIR` added, unless they name an output
    folder or a config file (which holds one)."""
    named = any(arg.replace("-", "_").startswith(("__output_dir", "__config_file")) for arg in kvpress_args)
    return kvpress_args if named else [*kvpress_args, "--output_dir", DEFAULT_OUTPUT_DIR]


def kvpress_evaluation_dir(kvpress_dir: str | Path) -> Path:
    """The ``evaluation/`` folder of a kvpress checkout; a clear error where it is not one."""
    folder = Path(kvpress_dir).expanduser() / "evaluation"
    missing = [name for name in ("evaluate.py", "evaluate_registry.py") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"--kvpress-dir {kvpress_dir}: no {', '.join(missing)} in {folder}; pass a checkout of "
            "https://github.com/NVIDIA/kvpress (its evaluation/ folder is not in the kvpress wheel)"
        )
    return folder


def import_from(folder: Path, name: str) -> ModuleType:
    """Module ``name`` from ``folder``, even where another module of that name (the hub's ``evaluate``
    package) was imported first."""
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").parent != folder:
        del sys.modules[name]
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def register_local_datasets(evaluate_registry: ModuleType, dataset_name: str, data_root: str | Path) -> None:
    """Make ``--dataset dataset_name --data_dir <folder>`` read ``data_root/<folder>`` in kvpress's evaluate.py."""
    datasets, scorers = evaluate_registry.DATASET_REGISTRY, evaluate_registry.SCORER_REGISTRY
    if dataset_name in datasets and datasets[dataset_name] != str(data_root):
        raise ValueError(f"--dataset-name {dataset_name!r} is one of kvpress's own datasets: choose another name")
    datasets[dataset_name] = str(data_root)
    scorers[dataset_name] = scorers[KVPRESS_SCORER_FOR_LOCAL_DATA]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, kvpress_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.runner.kvpress_evaluate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kvpress-dir", required=True, help="a checkout of NVIDIA/kvpress")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT),
                        help="folder whose subfolders are local datasets (python -m evaluation.tasks.dataset_files writes them)")
    parser.add_argument("--dataset-name", default="synthetic", help="the --dataset name of the local datasets")
    args = parser.parse_args(ours)
    try:
        folder = kvpress_evaluation_dir(args.kvpress_dir)
    except FileNotFoundError as error:
        parser.error(str(error))
    # kvpress's registry builds every press at import (KVzipPress's cost notice, three times), and fire imports
    # the deprecated `pipes` module: neither is ours to fix, so both are silenced while they are imported
    with quiet_press_construction(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        evaluate_registry = import_from(folder, "evaluate_registry")
        register_with_kvpress(evaluate_registry)
        register_local_datasets(evaluate_registry, args.dataset_name, Path(args.data_root).resolve())
        evaluate = import_from(folder, "evaluate")
        import fire

    fire.Fire(evaluate.CliEntryPoint, command=with_output_dir(kvpress_args), name="evaluate.py")


if __name__ == "__main__":
    main()
