"""Errors ctloop raises: each message names what is at fault, what was expected and what was found."""


class CtloopError(Exception):
    """Base class of every error ctloop raises deliberately (the CLI prints these as one line)."""


class DataValidationError(CtloopError):
    """Data does not meet the contract: a missing or mistyped column, too few rows, bad values."""


class SqlError(CtloopError):
    """A SQL template that cannot be rendered, or SQL that cannot be run faithfully on the local engine."""


class ModelLoadError(CtloopError):
    """A saved model that cannot be loaded: a missing file, a bad card, a scikit-learn version mismatch."""


class ChampionError(CtloopError):
    """The champion model cannot be loaded or scored on the test split, so the gate cannot compare."""
