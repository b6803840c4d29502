"""The privacy budget a user states once and every DP node of a workflow spends from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .ledger import Ledger, TotalBudget, default_ledger_path, sanitize_ledger_name
from .validation import check_delta, check_epsilon


@dataclass(frozen=True)
class PrivacyBudget:
    """Per-release target (epsilon, delta) plus the dataset's total budget and its ledger.

    Every release made with this budget is calibrated to ``(epsilon, delta)`` and recorded in
    the ledger named ``ledger_name`` (one file in ``ledger_directory``), which refuses a
    release once the PLD composition of all releases on the same dataset would exceed
    ``total``. All fields are public (DP_SPEC section 1).
    """

    epsilon: float
    delta: float
    total: TotalBudget
    ledger_name: str
    ledger_directory: Path

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon)
        check_delta(self.delta)
        check_epsilon(self.total.epsilon)
        check_delta(self.total.delta)
        sanitize_ledger_name(self.ledger_name)
        if self.epsilon > self.total.epsilon:
            from .errors import InvalidParameterError

            raise InvalidParameterError(
                f"per-release epsilon={self.epsilon} is larger than the dataset's total "
                f"epsilon={self.total.epsilon}; a single release could never fit. Lower the "
                "per-release epsilon or raise the total budget."
            )

    @property
    def ledger_path(self) -> Path:
        return default_ledger_path(self.ledger_directory, self.ledger_name)

    def ledger(self) -> Ledger:
        return Ledger(self.ledger_path)
