"""The privacy budget a user states once and every DP node of a workflow spends from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidParameterError
from .ledger import Ledger, TotalBudget, default_ledger_path, sanitize_ledger_name
from .validation import (
    MAX_DECLARED_SIZE,
    MAX_EPSILON,
    MIN_DECLARED_SIZE,
    check_budget_epsilon,
    check_declared_dataset_size,
    check_delta,
)

__all__ = ["MAX_DECLARED_SIZE", "MAX_EPSILON", "MIN_DECLARED_SIZE", "PrivacyBudget"]


@dataclass(frozen=True)
class PrivacyBudget:
    """Per-release target (epsilon, delta), the collection's total budget and declared size.

    Every release made with this budget is calibrated to ``(epsilon, delta)`` and recorded in
    the installation's ledger (``ledger.json`` in ``ledger_directory``) under the collection
    ``ledger_name``, which refuses a release once the collection's fully adaptive filter
    (Gaussian DP or a Renyi filter, pinned at its first release) would exceed ``total``;
    each image is charged too, so images shared with other
    collections share their spending (``dp/ledger.py``).

    ``declared_dataset_size`` is n_hat, the size the user declares publicly: the released
    average divides by q * n_hat and the work is padded to n_hat images. The software never
    derives it from the images (under add/remove adjacency the true count is private,
    docs/privacy.md §1 and 2.4). All fields are public.
    """

    epsilon: float
    delta: float
    total: TotalBudget
    ledger_name: str
    ledger_directory: Path
    declared_dataset_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.total, TotalBudget):
            raise InvalidParameterError(
                f"total must be a TotalBudget(epsilon, delta), got a {type(self.total).__name__}."
            )
        check_budget_epsilon(self.epsilon)
        check_budget_epsilon(self.total.epsilon, name="total epsilon")
        check_delta(self.delta)
        check_delta(self.total.delta)
        sanitize_ledger_name(self.ledger_name)
        check_declared_dataset_size(self.declared_dataset_size)
        if self.epsilon > self.total.epsilon:
            raise InvalidParameterError(
                f"per-release epsilon={self.epsilon} is larger than the dataset's total "
                f"epsilon={self.total.epsilon}; a single release could never fit. Lower the "
                "per-release epsilon or raise the total budget."
            )

    @property
    def ledger_path(self) -> Path:
        return default_ledger_path(self.ledger_directory)

    def ledger(self) -> Ledger:
        return Ledger(self.ledger_path)
