"""Mistakes a person can fix: the CLI prints their message on one line and exits with status 2.

Each job raises its own kinds (`ModelLoadError`, `DataError`, ...), derived from `UserError`, so the
CLI's one error boundary (`onegpu.cli.main`) tells them from bugs and runtime failures (status 1)
without naming them. A message says what is wrong and what to do about it.
"""

from __future__ import annotations


class UserError(Exception):
    """A bad argument, a missing or incompatible model, bad data: fixable by the person running."""


class OutputExistsError(UserError, FileExistsError):
    """The output folder already holds something that a job would replace."""


class ModelNotFoundError(UserError):
    """The model is neither a local model folder nor a hub repository that answers."""
