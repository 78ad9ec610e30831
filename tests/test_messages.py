"""foodlib's progress lines are records of the standard ``logging`` logger "foodlib" (issue 22)."""
from __future__ import annotations

import logging

import pytest

from conftest import tiny_config
from foodlib.messages import logger
from foodlib.train import fit


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def records():
    handler = _Records()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_the_logger_writes_to_the_current_stdout_by_default(capsys):
    logger.info("hello from foodlib")
    assert capsys.readouterr().out == "hello from foodlib\n"  # the stdout pytest swapped in, not the one at import


def test_a_run_reports_through_the_foodlib_logger_and_a_level_silences_it(tmp_path, records, capsys):
    fit(tiny_config(tmp_path / "loud", data="digits", limit_per_class=10, epochs=1, figures=False, features=False,
                    tensorboard=False))
    assert any(m.startswith("epoch 1/1:") for m in records.messages), records.messages
    assert "epoch 1/1:" in capsys.readouterr().out
    records.messages.clear()
    logger.setLevel(logging.WARNING)
    try:
        fit(tiny_config(tmp_path / "quiet", data="digits", limit_per_class=10, epochs=1, figures=False, features=False,
                        tensorboard=False))
    finally:
        logger.setLevel(logging.INFO)
    assert not any(m.startswith("epoch") for m in records.messages)
    assert "epoch 1/1:" not in capsys.readouterr().out
