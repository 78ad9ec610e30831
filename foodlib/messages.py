"""foodlib's messages go through the standard ``logging`` module, logger ``"foodlib"``.

Progress lines of a run or a suite ("epoch 3/10: ...", "[2/8] center-s0: done") are INFO
records of ``logging.getLogger("foodlib")``; progress bars stay tqdm and warnings stay Python
warnings. So the tools that collect logs (a cluster's log files, a notebook, an application
that embeds foodlib) can filter, format or redirect them like any other library's:

>>> import logging
>>> logging.getLogger("foodlib").setLevel(logging.WARNING)       # silence the progress lines  # doctest: +SKIP
>>> logging.getLogger("foodlib").handlers[:] = [my_handler]      # send them elsewhere          # doctest: +SKIP

Out of the box the logger writes the bare message to the *current* ``sys.stdout`` (resolved at
each record, so Jupyter, papermill and pytest's capture see it) and does not propagate to the
root logger, the way most deep-learning libraries set up their own logger: a script that never
configures logging still sees what ``print`` showed before, and one that configures the root
logger does not get every line twice.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("foodlib")


class _CurrentStdoutHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stdout`` is when a record is written (not at creation)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always follows sys.stdout
        pass


if not logger.handlers:  # once per process; a user's own handlers (set before import) are kept
    _handler = _CurrentStdoutHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
