"""Errors of the DP core. Messages name the argument, echo the value and say what is allowed."""


class DpAdaptError(ValueError):
    """Base class of every error the pack raises on bad input or a refused release."""


class InvalidParameterError(DpAdaptError):
    """A parameter is outside what the mechanism or method allows."""


class BudgetExceededError(DpAdaptError):
    """A release would take a dataset past its total privacy budget."""


class LedgerError(DpAdaptError):
    """The budget ledger cannot be used; it is left exactly as found."""


class LedgerFormatError(LedgerError):
    """The ledger file is of an unknown format or version."""


class LedgerCorruptError(LedgerError):
    """The ledger file cannot be parsed or holds an unreadable record."""
