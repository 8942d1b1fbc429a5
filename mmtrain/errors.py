"""Errors that mean "the user gave us something wrong": the CLI prints them as one line and exits with status 2.

Anything else escaping a run is a bug in mmtrain and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: a mistake in a config, an override, a data folder, a checkpoint or a command line.

    The message must fit on one line and name the place (file, key path, sample) and the cause.
    """

    exit_code = 2


class ConfigError(UserError):
    """A config file, override or ``_target_`` that cannot be composed, validated or instantiated."""


class DataError(UserError):
    """A dataset folder, metadata file or sample that cannot be used."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupted, unsafe, or does not fit the model."""


def print_error(message: str) -> None:
    """Write ``error: MESSAGE`` and its newline to stderr in one write.

    Ranks of one launch share the launcher's stderr pipe; ``print`` writes the text and the newline separately, so
    two ranks failing together could splice their lines. One write of less than PIPE_BUF bytes is atomic.
    """
    import sys

    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
