"""Errors caused by the user's input or machine rather than by a bug in foodlib.

The ``foodlib`` command prints such an error as one line, ``foodlib COMMAND: error: MESSAGE``, and
exits with code 2 (``--debug`` or ``FOODLIB_DEBUG=1`` shows the traceback). ValueError,
FileNotFoundError and FileExistsError count as such errors too (see ``foodlib.cli._user_errors``);
raise a :class:`UserError` subclass for the other kinds, with a message that names the file or value
and the fix.
"""
from __future__ import annotations


class UserError(Exception):
    """An error whose message is the whole story: the input or the machine must change, not the code."""


class PretrainedWeightsError(UserError, RuntimeError):
    """Published pretrained weights could not be downloaded (offline machine, proxy, firewall)."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the field, the value and the fix."""
