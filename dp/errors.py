"""Errors raised by the DP core; messages name the argument, echo the value, say what is allowed."""


class DpAdaptError(ValueError):
    """Base class of every error the pack raises on bad input or refused releases."""


class InvalidParameterError(DpAdaptError):
    """A parameter is outside what the mechanism or method allows."""
