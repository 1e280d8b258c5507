"""Errors a user can cause and fix: ``pipelines/run.py`` prints each as one line, without a traceback."""


class UserError(Exception):
    """Bad input (a config value, a data row, a damaged artifact, a diverging run): the message names
    what is wrong and where, in one line."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work."""


class DataError(UserError, ValueError):
    """Input data a stage refuses; the message names the split (or file) and the row."""


class CorruptArtifactError(UserError, RuntimeError):
    """A completed artifact whose files no longer match its manifest."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""
