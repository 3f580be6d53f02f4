"""Quiet runs: nothing printed at import, kvpress's per-press notices silenced only while presses are built."""

import logging
import subprocess
import sys
from pathlib import Path

from evaluation.runner.presses import KVZIP_LOGGER, make_press, quiet_press_construction

ROOT = Path(__file__).resolve().parents[1]


def test_importing_our_packages_prints_nothing():
    code = "import kvpress_compose, evaluation.runner.presses, evaluation.runner.run, evaluation.runner.sweep, evaluation.runner.kvpress_evaluate"
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


def test_building_kvzip_logs_nothing_and_leaves_its_logger_as_it_was(caplog):
    logger = logging.getLogger(KVZIP_LOGGER)
    logger.setLevel(logging.INFO)
    filters, logger.filters = logger.filters, []  # an earlier run's once-per-message filter would hide the notice
    try:
        with caplog.at_level(logging.INFO):
            press = make_press("kvzip", 0.5)
            assert type(press).__name__ == "KVzipPress" and press.compression_ratio == 0.5
            assert [record for record in caplog.records if record.name == KVZIP_LOGGER] == []
            assert logger.level == logging.INFO  # only while building
            from kvpress import KVzipPress

            KVzipPress()  # outside our builder, kvpress's notice is untouched
            assert any(record.name == KVZIP_LOGGER for record in caplog.records)
    finally:
        logger.setLevel(logging.NOTSET)
        logger.filters = filters


def test_quiet_press_construction_restores_the_level_after_an_error():
    logger = logging.getLogger(KVZIP_LOGGER)
    try:
        with quiet_press_construction():
            raise KeyError("x")
    except KeyError:
        pass
    assert logger.level == logging.NOTSET


def test_kvpress_untested_model_warning_is_said_once_per_process(caplog):
    from evaluation.runner.presses import UNTESTED_MODEL_LOGGERS, say_kvpress_warnings_once

    logger = logging.getLogger(UNTESTED_MODEL_LOGGERS[0])
    filters, logger.filters = logger.filters, []  # as in a fresh process (an earlier run may have installed it)
    try:
        say_kvpress_warnings_once()
        say_kvpress_warnings_once()  # idempotent: one filter
        assert len(logger.filters) == 1
        with caplog.at_level(logging.WARNING):
            for model in ("Gemma3ForCausalLM", "Gemma3ForCausalLM", "OtherModel", "Gemma3ForCausalLM"):
                logger.warning(f"Model {model} not tested, supported models: (...)")
        assert [r.getMessage() for r in caplog.records] == [
            "Model Gemma3ForCausalLM not tested, supported models: (...)",
            "Model OtherModel not tested, supported models: (...)",
        ]
    finally:
        logger.filters = filters
