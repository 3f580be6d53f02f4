"""One evaluation run: a model, a local dataset, a press at one compression ratio.

    python -m evaluation.runner.run --model evaluation/models/retrieval-llama --data-dir evaluation/data/synthetic-1024 \
        --press compose_replay --ratio 0.5

Rows are grouped by context and kvpress's pipeline answers all the questions of a context from one
compression. Results go to ``<output_dir>/<dataset>__<data name>__<model>__<press>__<ratio>`` (``output_dir``
by default ``results/sweep``, the sweep's; kvpress's own evaluate.py writes under ``results/kvpress``). The data
name is the dataset folder's own name; the model is a hub id with "/" replaced by "--" (as kvpress names its
runs), a folder inside this checkout by its path there (``evaluation--models--retrieval-llama``), any other
folder by its name: none of them depends on the working directory. The ratio has two decimals where they hold
it exactly (``0.50``), else every digit it has (``0.501``). ``dataset`` is a plain name (no "/"): every run
folder lies inside ``output_dir``.

- ``predictions.csv``: the rows with a ``predicted_answer`` column;
- ``metrics.json``: per-task scores and their average (percent) with its 95% bootstrap interval over
  contexts (``average_ci95``), ``memory`` (the bytes the compressed cache
  really holds as a fraction of the full cache, read on the cache), fidelity averages when asked, seconds,
  status and errors;
- ``config.yaml``: every argument of the run and what produced it: ``data_fingerprint`` (SHA-256 of the
  dataset files' bytes), ``press`` (the built press's class and every setting), the package ``versions``, and
  ``model_location`` / ``data_location`` (the model's and dataset's place: a real model's or hub id's name, a
  folder's path inside this checkout, else its absolute path).

Each file is written whole (a temporary file in the same folder, then renamed), ``metrics.json`` last: a run is
done when its ``metrics.json`` and ``config.yaml`` can be read, a run that succeeded still has its
``predictions.csv``, and the record matches this run's. It is skipped then, unless ``overwrite`` (or
``retry_failed``, for a run recorded as failed); otherwise it runs again and says why (which setting differs, an
unreadable or missing file). Other package versions alone do not rerun a run: they warn. A folder that holds
another model's run (two model folders of one name) or another dataset's (of one name, other bytes) is neither
skipped nor replaced: refused, before the first run, unless ``overwrite``. One process at a time runs a folder
(a lock while it runs): a second waits, saying so, and then skips what the first finished. A press that raises
is recorded as failed, with its error in ``metrics.json``, and does not stop the caller.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch
import yaml
from kvpress import BasePress  # importing kvpress registers the "kv-press-text-generation" pipeline
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, Cache, DynamicCache, Pipeline, pipeline
from transformers.utils import logging as transformers_logging

from ..metrics.accuracy import average, bootstrap_interval, task_scores
from ..metrics.fidelity import fidelity, summarize
from ..model_zoo.real_models import REAL_MODELS, cache_root, resolve_model
from ..safe_files import write_atomic
from ..tasks.dataset_files import dataset_name, fingerprint, load_rows
from .prefixed_pipeline import PrefixedQuestionsPipeline
from .presses import EAGER_PRESSES, check_press_name, make_press, reset_press_state, say_kvpress_warnings_once

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEFAULT_OUTPUT_DIR = "results/sweep"  # kvpress's own evaluate.py: results/kvpress (evaluation.runner.kvpress_evaluate)
CHECKOUT = Path(__file__).resolve().parents[2]  # a model folder in here is named by its path inside it
# The record fields that must match for a run to count as done. A field missing from a record (runs archived
# before it was recorded, e.g. docs/study-4096/runs) counts as unknown and is not held against the run: those
# archives stay usable. data_dir, output_dir and device say where, not what, and differ across checkouts;
# model, dataset, press and ratio are in the folder's name.
# registry names whose press changed after runs were made without a press record (those runs are stale)
REDEFINED = {"compose": "is ComposePress's defaults, which became the replay source on 2026-12-06"}
RECORD_FIELDS = ("data_fingerprint", "press", "max_contexts", "seed", "attn_implementation", "fidelity")
FIDELITY_FIELDS = ("fidelity_rows", "greedy_tokens")  # compared only where fidelity was measured
VERSIONED = ("kvpress", "transformers", "torch", "kvpress-compose")  # recorded; a difference warns, never reruns


@dataclass
class RunConfig:
    """Everything that defines a run (saved as ``config.yaml``).

    ``dataset`` names the benchmark and ``data_dir`` is the local folder written by :mod:`evaluation.tasks.dataset_files`;
    the folder's name is the short data name in the results folder. ``max_contexts`` keeps the first contexts
    of each task. ``fidelity_rows`` rows (the first row of each task first) get fidelity metrics when
    ``fidelity`` is set. ``no_press`` always runs at ratio 0. ``overwrite`` reruns a finished run,
    ``retry_failed`` one recorded as failed.
    """

    model: str
    data_dir: str
    press_name: str
    compression_ratio: float
    dataset: str = "synthetic"
    output_dir: str = DEFAULT_OUTPUT_DIR
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    max_contexts: int | None = None
    fidelity: bool = False
    fidelity_rows: int = 5
    greedy_tokens: int = 8
    seed: int = 0
    overwrite: bool = False
    retry_failed: bool = False

    def __post_init__(self):
        check_press_name(self.press_name)
        self.model, self.data_dir, self.output_dir = str(self.model), str(self.data_dir), str(self.output_dir)
        if not self.dataset or self.dataset in (".", "..") or any(sep in self.dataset for sep in "/\\"):
            raise ValueError(f"dataset (--dataset) must be a plain name, without '/' (it names the run's folder inside "
                             f"the output folder), got {self.dataset!r}")
        self.compression_ratio = 0.0 if self.press_name == "no_press" else float(self.compression_ratio)
        if not 0 <= self.compression_ratio < 1:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
            )
        for name in ("max_contexts", "fidelity_rows", "greedy_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def label(self) -> str:
        return f"{self.press_name}@{ratio_label(self.compression_ratio)}"

    @property
    def setting(self) -> str:
        """``<dataset>__<data name>__<model>``: what every run of a sweep shares."""
        return "__".join([self.dataset, dataset_name(self.data_dir), model_name(self.model)])

    def results_dir(self) -> Path:
        return Path(self.output_dir) / f"{self.setting}__{self.press_name}__{ratio_label(self.compression_ratio)}"


def ratio_label(ratio: float) -> str:
    """A compression ratio as run folders and tables name it: two decimals where they hold it exactly (``0.50``,
    as every run was named before), else every digit it has (``0.501``): two ratios never share a name."""
    two_decimals = f"{ratio:.2f}"
    return two_decimals if float(two_decimals) == ratio else repr(float(ratio))


def location(path: Path) -> str:
    """A folder's place, the same from any working directory: its path inside this checkout (the same in every
    checkout), else its absolute path."""
    path = path.expanduser().resolve()
    return "/".join(path.relative_to(CHECKOUT).parts) if path.is_relative_to(CHECKOUT) else str(path)


def model_location(model: str) -> str:
    """Which model a run evaluates, whatever path reached it: a real model's short name (its converted folder
    too), a folder's :func:`location`, a hub id as it is. Two models whose folders share a name (``ckpt-1/model``,
    ``ckpt-2/model``) share a run folder's name, not this."""
    path = Path(model).expanduser()
    if model in REAL_MODELS or not path.is_dir():
        return model
    if path.resolve().parent == cache_root().expanduser().resolve() and path.name in REAL_MODELS:
        return path.resolve().name
    return location(path)


def model_name(model: str) -> str:
    """The model's part of a result folder's name: a local folder inside this checkout by its path there, any
    other local folder by its own name, a hub id with "/" as "--" (as kvpress names its runs)."""
    path = Path(model)
    if not path.is_dir():
        return model.rstrip("/").replace("/", "--")
    path = path.resolve()
    return "--".join(path.relative_to(CHECKOUT).parts) if path.is_relative_to(CHECKOUT) else path.name


def package_versions() -> dict[str, str]:
    """The installed versions of the packages a run's numbers depend on."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def built_press(config: RunConfig):
    return make_press(config.press_name, config.compression_ratio)  # quietly (registry.quiet_press_construction)


def press_fields(press) -> dict[str, str] | str | None:
    """Every setting of ``press``: its class and each shown dataclass field's ``repr`` (a press that is no
    dataclass: its ``repr``; ``None`` for ``no_press``)."""
    if press is None or not dataclasses.is_dataclass(press):
        return None if press is None else repr(press)
    shown = [field for field in dataclasses.fields(press) if field.repr]
    return {"class": type(press).__name__} | {field.name: repr(getattr(press, field.name)) for field in shown}


def press_settings(config: RunConfig) -> dict[str, str] | str | None:
    """Every setting of the press the run builds (see :func:`press_fields`)."""
    return press_fields(built_press(config))


def press_differences(recorded, config: RunConfig) -> list[str]:
    """The settings whose recorded value differs from the press this run builds. A setting the record lacks
    counts only where it is not at its default: a field added to a press class later leaves the runs made before
    it valid, while a changed default (recorded explicitly) reruns them."""
    press = built_press(config)
    current = press_fields(press)
    if not isinstance(recorded, dict) or not isinstance(current, dict):
        return [] if recorded == current else [f"press: {recorded!r} recorded, now {current!r}"]
    defaults = {field.name: field.default for field in dataclasses.fields(press)
                if field.default is not dataclasses.MISSING}
    differences = []
    for name in sorted(set(recorded) | set(current)):
        if name in recorded and recorded[name] == current.get(name):
            continue
        if name not in recorded and name in defaults and current[name] == repr(defaults[name]):
            continue
        differences.append(f"press.{name}: {recorded.get(name, 'absent')} recorded, now {current.get(name, 'absent')}")
    return differences


def run_record(config: RunConfig) -> dict:
    """What ``config.yaml`` records: the run's arguments and what produced it (see :data:`RECORD_FIELDS`), and
    where its model and data came from (:func:`model_location`, :func:`evaluation.runner.run.location`)."""
    return asdict(config) | {"data_fingerprint": fingerprint(config.data_dir), "press": press_settings(config),
                             "versions": package_versions(), "model_location": model_location(config.model),
                             "data_location": location(Path(config.data_dir))}


def other_run_there(config: RunConfig) -> str | None:
    """What makes the run already in ``config``'s folder another model's or another dataset's (None where it is
    this run's, or unknown): a model of another place whose folder has the same name, or a dataset of another
    place and other bytes whose folder has the same name. Such a run is not this one's to skip nor to replace."""
    record, _ = read_result(config.results_dir() / "config.yaml")
    if record is None:
        return None
    model, recorded_model = model_location(config.model), record.get("model_location")
    if recorded_model is not None and recorded_model != model:
        return f"the model {recorded_model}, not {model}"
    data, recorded_data = location(Path(config.data_dir)), record.get("data_location")
    if recorded_data is not None and recorded_data != data and \
            record.get("data_fingerprint") != fingerprint(config.data_dir):
        return f"the dataset {recorded_data}, not {data} (other bytes)"
    return None


def refuse_other_run_there(config: RunConfig) -> None:
    """:func:`other_run_there` as a ValueError naming the folder, what it holds and what to do (``overwrite``
    replaces it)."""
    other = other_run_there(config) if not config.overwrite else None
    if other is not None:
        raise ValueError(
            f"{config.results_dir()} holds a run of {other}: their folders share a name. Pass another output folder "
            "(--out) for this one, or --overwrite to replace that run"
        )


def check_results_folders(configs: list[RunConfig]) -> None:
    """Every run has a folder of its own (two runs of one plan never share one), holding no other model's or
    dataset's run (:func:`refuse_other_run_there`): ValueError before the first run."""
    seen: dict[Path, RunConfig] = {}
    for config in configs:
        folder = config.results_dir()
        if folder in seen and seen[folder] != config:
            raise ValueError(f"{seen[folder].label} and {config.label} would share the run folder {folder}")
        seen[folder] = config
        refuse_other_run_there(config)


def record_differences(recorded: dict, config: RunConfig) -> list[str]:
    """``name: recorded, now`` for each field of :data:`RECORD_FIELDS` that the record holds and that differs
    from this run's (fields it lacks are unknown, and not held against it)."""
    current = asdict(config) | {"data_fingerprint": lambda: fingerprint(config.data_dir)}
    fields = RECORD_FIELDS + (FIDELITY_FIELDS if config.fidelity else ())
    differences = []
    if "press" not in recorded and config.press_name in REDEFINED:
        differences.append(f"press: not recorded, and {config.press_name!r} {REDEFINED[config.press_name]}")
    for name in fields:
        if name not in recorded:
            continue
        if name == "press":
            differences += press_differences(recorded[name], config)
            continue
        value = current[name]() if callable(current[name]) else current[name]
        if recorded[name] != value:
            differences.append(f"{name}: {recorded[name]!r} recorded, now {value!r}")
    return differences


def read_result(path: Path):
    """A result file's content (JSON or YAML), or an error message where it is missing or unreadable."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        content = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as error:
        return None, f"{path.name} unreadable ({type(error).__name__}: {str(error).splitlines()[0]})"
    return (content, None) if isinstance(content, dict) else (None, f"{path.name} unreadable (not a mapping)")


def rerun_reason(config: RunConfig) -> str | None:
    """Why the run must run (again), or None where it is done with the same record (see the module docstring)."""
    results_dir = config.results_dir()
    if config.overwrite:
        return "overwrite"
    metrics, problem = read_result(results_dir / "metrics.json")
    if problem:
        return problem
    record, problem = read_result(results_dir / "config.yaml")
    if problem:
        return problem
    if metrics.get("status") == "ok" and not (results_dir / "predictions.csv").is_file():
        return "no predictions.csv"  # its answers are gone: the study's paired tables would drop the run
    differences = record_differences(record, config)
    if differences:
        return "; ".join(differences)
    if config.retry_failed and metrics.get("status") != "ok":
        return "recorded as failed (retry_failed)"
    return None


def version_warning(config: RunConfig) -> str | None:
    """The packages whose versions differ from those a finished run recorded, or None."""
    record, _ = read_result(config.results_dir() / "config.yaml")
    recorded = (record or {}).get("versions") or {}
    now = package_versions()
    changed = [f"{name} {recorded[name]} (now {now[name]})" for name in VERSIONED
               if name in recorded and recorded[name] != now[name]]
    return ", ".join(changed) or None


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` and write a file there, or raise OSError naming it: before any run is computed."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / ".writable", "")
        (folder / ".writable").unlink()
    except OSError as error:
        raise OSError(f"output folder {folder} (--out): cannot write there ({error})") from None


def check_model(model: str) -> None:
    """``model`` (``--model``) is a real model's short name, a hub id or a model folder: a path that is not
    there, a file, or a folder without ``config.json`` is refused by name (ValueError) before anything runs.
    A string with at most one "/" that is no folder here is taken for a hub id."""
    if model in REAL_MODELS:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model}: a folder without config.json, not a model folder")
        return
    if path.exists():
        raise ValueError(f"--model {model}: a file, not a model folder")
    if model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model:
        raise ValueError(f"--model {model}: no such folder. Give a real model's short name ({', '.join(REAL_MODELS)}), "
                         "a hub id (org/name) or a model folder")


def preflight(configs: list[RunConfig]) -> None:
    """Check every model (:func:`check_model`), dataset (:func:`evaluation.tasks.dataset_files.load_rows` names a bad file, row
    or column), output folder and run folder (:func:`check_results_folders`) once, before the first run:
    ValueError, FileNotFoundError or OSError."""
    for model in dict.fromkeys(config.model for config in configs):
        check_model(model)
    for data_dir in dict.fromkeys(config.data_dir for config in configs):
        load_rows(data_dir)
    for output_dir in dict.fromkeys(config.output_dir for config in configs):
        check_writable(output_dir)
    check_results_folders(configs)


@lru_cache(maxsize=1)
def load_pipeline(model: str, device: str = "cpu", attn_implementation: str = "sdpa") -> Pipeline:
    """kvpress's text-generation pipeline for ``model`` (a hub id or a local folder); the last one is cached."""
    transformers_logging.disable_progress_bar()
    path = resolve_model(model)  # a real model's short name becomes its converted folder
    tokenizer = AutoTokenizer.from_pretrained(path)
    language_model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", attn_implementation=attn_implementation)
    return pipeline("kv-press-text-generation", model=language_model.eval(), tokenizer=tokenizer, device=device,
                    pipeline_class=PrefixedQuestionsPipeline)


def first_contexts(rows: pd.DataFrame, max_contexts: int | None) -> pd.DataFrame:
    """The rows of the first ``max_contexts`` contexts of each task (all rows when ``None``)."""
    if max_contexts is None:
        return rows
    context_rank = rows.groupby("task", sort=False)["context"].transform(lambda c: pd.factorize(c)[0])
    return rows[context_rank < max_contexts]


def cache_fraction(cache: Cache, config, n_tokens: int) -> float:
    """Bytes ``cache`` really holds (every layer's keys and values) as a fraction of the full cache of
    ``n_tokens`` tokens: 1.0 for presses that only mask, less where entries were removed."""
    keys = cache.layers[0].keys
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    full = config.num_hidden_layers * 2 * keys.shape[0] * config.num_key_value_heads * n_tokens * head_dim
    held = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    return held / full


def predict(pipe: Pipeline, rows: pd.DataFrame, press: BasePress | None, desc: str) -> tuple[pd.Series, float]:
    """Predicted answers for ``rows`` (one compression per context answers all of its questions, each after its
    own answer prefix: ``pipe`` is a :class:`PrefixedQuestionsPipeline` where they differ) and the mean
    over contexts of :func:`cache_fraction`, read on each context's cache once its answers are generated (the
    pipeline then has cropped it back to the compressed context)."""
    predictions = pd.Series(index=rows.index, dtype=object)
    fractions = []
    groups = rows.groupby("context", sort=False)
    for context, group in tqdm(groups, total=groups.ngroups, desc=desc, leave=False):
        cache = DynamicCache()
        output = pipe(
            context,
            questions=group["question"].tolist(),
            answer_prefix=answer_prefixes(group),
            press=press,
            max_new_tokens=int(group["max_new_tokens"].max()),
            cache=cache,
        )
        predictions[group.index] = output["answers"]
        n_tokens = pipe.preprocess(context, [], "", pipe.tokenizer.model_max_length)["context_ids"].shape[1]
        fractions.append(cache_fraction(cache, pipe.model.config.get_text_config(), n_tokens))
    return predictions, sum(fractions) / len(fractions)


def answer_prefixes(group: pd.DataFrame) -> str | list[str]:
    """The answer prefix of a context's rows: one string where they share it (any kvpress pipeline takes it),
    else one per row (a :class:`PrefixedQuestionsPipeline` takes the list)."""
    prefixes = group["answer_prefix"].fillna("").astype(str).tolist()
    return prefixes[0] if len(set(prefixes)) == 1 else prefixes


def fidelity_metrics(pipe: Pipeline, rows: pd.DataFrame, press: BasePress | None, config: RunConfig) -> dict:
    """Fidelity averaged over ``config.fidelity_rows`` rows, tokenized exactly as the pipeline does."""
    first_per_task = rows.groupby("task", sort=False).cumcount().sort_values(kind="stable").index
    device, results = pipe.model.device, []
    for _, row in rows.loc[first_per_task[: config.fidelity_rows]].iterrows():
        inputs = pipe.preprocess(
            row["context"], [row["question"]], row["answer_prefix"], pipe.tokenizer.model_max_length
        )
        context_ids, question_ids = inputs["context_ids"].to(device), inputs["questions_ids"][0].to(device)
        answer = " ".join(row["answer"])  # the items in order are the answer's text
        answer_ids = pipe.tokenizer.encode(answer, add_special_tokens=False, return_tensors="pt").to(device)
        results.append(fidelity(pipe.model, context_ids, question_ids, answer_ids, press, config.greedy_tokens))
    return summarize(results)


def _evaluate_rows(pipe: Pipeline, rows: pd.DataFrame, config: RunConfig) -> tuple[pd.DataFrame, dict]:
    """Predictions and metrics of a press that ran to the end."""
    torch.manual_seed(config.seed)
    press = make_press(config.press_name, config.compression_ratio)
    reset_press_state(pipe.model)
    predicted, memory = predict(pipe, rows, press, config.label)
    predictions = rows.assign(predicted_answer=predicted)
    scores = task_scores(predictions)
    metrics = {"status": "ok", "scores": scores, "average": average(scores),
               "average_ci95": list(bootstrap_interval(predictions, seed=config.seed)), "memory": round(memory, 4)}
    if config.fidelity:
        metrics["fidelity"] = fidelity_metrics(pipe, rows, press, config)
    return predictions, metrics


def run(config: RunConfig) -> Path:
    """Run (or skip) one evaluation and return its results folder. One process at a time runs a folder: a second
    one waits for the first (saying so), then skips the run it finished."""
    results_dir = config.results_dir()
    refuse_other_run_there(config)
    if skipped(config):
        return results_dir
    with run_lock(results_dir) as waited:
        if waited and skipped(config):
            return results_dir
        refuse_other_run_there(config)
        compute(config, rerun_reason(config))
    return results_dir


def skipped(config: RunConfig) -> bool:
    """Whether the run is done with the same record (:func:`rerun_reason`), said with any version warning."""
    results_dir = config.results_dir()
    if rerun_reason(config) is not None:
        return False
    versions = version_warning(config)
    if versions:
        tqdm.write(f"warning: {results_dir} was run with {versions}; kept (versions alone do not rerun)")
    tqdm.write(f"skip {results_dir} (done with the same record; overwrite to rerun)")
    return True


LOCK_NAME = ".lock"  # in a run's folder while a process runs it (removed when it ends)


@contextmanager
def run_lock(results_dir: Path):
    """Hold ``results_dir``'s lock (``flock`` on :data:`LOCK_NAME`, released by the system if the process dies)
    while the block runs; where another process holds it, say so and wait. Yields whether it waited. Without
    ``fcntl`` (Windows) nothing is locked."""
    results_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield False
        return
    path, waited = results_dir / LOCK_NAME, False
    while True:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tqdm.write(f"waiting: another process is running {results_dir} now (it holds {path}); this one goes on "
                       "when it ends")
            fcntl.flock(handle, fcntl.LOCK_EX)
            waited = True
        try:  # the holder removes the file as it ends: a lock on a removed file holds nothing, so lock again
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(handle)
    try:
        yield waited
    finally:
        Path(path).unlink(missing_ok=True)
        os.close(handle)


def compute(config: RunConfig, reason: str) -> None:
    """Run the evaluation (``reason``: why, said where the folder exists) and write its files."""
    results_dir = config.results_dir()
    say_kvpress_warnings_once()
    if any(path.name != LOCK_NAME for path in results_dir.iterdir()):  # a run was there (our lock aside)
        warning = "warning: " if "unreadable" in reason else ""
        tqdm.write(f"{warning}rerun {results_dir}: {reason}")
    rows = first_contexts(load_rows(config.data_dir), config.max_contexts)
    # as kvpress's evaluate.py does: ObservedAttention reads the attention weights only eager attention returns
    attn_implementation = "eager" if config.press_name in EAGER_PRESSES else config.attn_implementation
    pipe = load_pipeline(config.model, config.device, attn_implementation)
    start = time.perf_counter()
    metrics = {"press": config.press_name, "compression_ratio": config.compression_ratio, "rows": len(rows),
               "contexts": rows["context"].nunique()}
    try:
        predictions, outcome = _evaluate_rows(pipe, rows, config)
    except Exception as error:  # noqa: BLE001 - a press that cannot run on this model is a result, not a crash
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        tqdm.write(f"warning: {config.label} failed: {message}")
        predictions, outcome = None, {"status": "failed", "errors": [message]}
    metrics.update(outcome, seconds=round(time.perf_counter() - start, 3))
    metrics.setdefault("errors", [])
    write_results(results_dir, predictions, metrics, run_record(config))


def write_results(results_dir: Path, predictions: pd.DataFrame | None, metrics: dict, record: dict) -> None:
    """The run's files, each written whole; ``metrics.json`` (what marks a run done) goes first and comes back
    last, so that a kill in between leaves a run that is not done rather than one of mixed results."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "metrics.json").unlink(missing_ok=True)
    if predictions is not None:
        write_atomic(results_dir / "predictions.csv", predictions.to_csv(index=False))
    else:  # no stale predictions from an earlier run next to a failure
        (results_dir / "predictions.csv").unlink(missing_ok=True)
    write_atomic(results_dir / "config.yaml", yaml.safe_dump(record, sort_keys=False))
    write_atomic(results_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def evaluate(
    model: str,
    dataset: str,
    data_dir: str | Path,
    press_name: str,
    ratio: float,
    out_root: str | Path = DEFAULT_OUTPUT_DIR,
    **options,
) -> Path:
    """Run ``press_name`` at ``ratio`` on ``model`` over the local dataset in ``data_dir``; see :class:`RunConfig`."""
    config = RunConfig(model, str(data_dir), press_name, ratio, dataset=dataset, output_dir=str(out_root), **options)
    return run(config)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by a single run and a sweep."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn-implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS)
    parser.add_argument("--max-contexts", type=int, default=None, help="first contexts of each task only")
    parser.add_argument("--fidelity", action="store_true", help="also measure KL and greedy divergence")
    parser.add_argument("--fidelity-rows", type=int, default=5)
    parser.add_argument("--greedy-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="rerun even runs done with the same record")
    parser.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads for torch (default 1: the shipped model is small, and more threads than idle cores "
             "slow torch down many times over)",
    )


def run_options(args: argparse.Namespace) -> dict:
    """The :class:`RunConfig` keyword arguments that :func:`add_run_options` parsed; applies ``--threads``."""
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    names = ("device", "attn_implementation", "max_contexts", "fidelity", "fidelity_rows", "greedy_tokens", "seed",
             "overwrite", "retry_failed")
    return {name: getattr(args, name) for name in names}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.runner.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="hub id or local model folder")
    parser.add_argument("--data-dir", required=True, help="folder written by `python -m evaluation.tasks.dataset_files`")
    parser.add_argument("--press", required=True, help="a name from evaluation.runner.presses.PRESS_REGISTRY")
    parser.add_argument("--ratio", type=float, required=True, help="compression ratio in [0, 1)")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--out", default=DEFAULT_OUTPUT_DIR)
    add_run_options(parser)
    args = parser.parse_args(argv)
    try:
        config = RunConfig(args.model, args.data_dir, args.press, args.ratio, dataset=args.dataset,
                           output_dir=args.out, **run_options(args))
        preflight([config])
    except (ValueError, OSError) as error:
        parser.error(str(error))
    results_dir = run(config)
    print(f"results in {results_dir}")
    return results_dir


if __name__ == "__main__":
    main()
