"""Estimator kinds as an Enum with properties, instead of recognising them by name prefixes.

The values are the names the estimators carry in every output (core.estimators.sequence_estimates: "MC", "RB+CV",
"RB-IS", "k3-IS", …; the single-token experiment adds "k2"). A str Enum: ``Estimator("RB+CV") == "RB+CV"``.
"""
from __future__ import annotations

from enum import Enum


class Estimator(str, Enum):
    MC = "MC"  # naive Monte Carlo (k1) from P
    SNIS = "SNIS"  # self-normalised IS (for r = P it is MC itself)
    RB = "RB"  # Rao-Blackwellized MC from P (sequence: Σ_t KL_t; single token: sum-and-sample)
    RB_CV = "RB+CV"  # RB plus a cross-fitted control variate
    K3 = "k3"  # Schulman's k3 from P
    K2 = "k2"  # Schulman's k2 from P (biased: ½E[f²])
    IS = "IS"
    RB_IS = "RB-IS"
    RB_IS_CV = "RB-IS+CV"
    K3_IS = "k3-IS"

    def __str__(self) -> str:
        return self.value

    @property
    def unbiased(self) -> bool:
        """Unbiased for the KL whenever the proposal covers P (SNIS is biased at O(1/n), k2 always)."""
        return self not in (Estimator.SNIS, Estimator.K2)

    @property
    def recommendable(self) -> bool:
        """May be the estimate to report: unbiased and not k3 (whose terms grow like Q/P — the heaviest tails of all,
        so its SE is the first to be understated; MC, RB and RB+CV come from the same draws)."""
        return self.unbiased and not self.k3

    @property
    def uses_weights(self) -> bool:
        """Importance weighted: drawn from a proposal r ≠ P."""
        return self in (Estimator.IS, Estimator.SNIS, Estimator.RB_IS, Estimator.RB_IS_CV, Estimator.K3_IS)

    @property
    def p_based(self) -> bool:
        """Drawn from P and relying on nothing but P's own draws: the yardsticks of the consistency check."""
        return self in (Estimator.MC, Estimator.RB, Estimator.RB_CV)

    @property
    def control_variate(self) -> bool:
        return self in (Estimator.RB_CV, Estimator.RB_IS_CV)

    @property
    def k3(self) -> bool:
        """k3 relies on E[Q/r] = 1 (Q's mass on the draws' support)."""
        return self in (Estimator.K3, Estimator.K3_IS)

    @property
    def rao_blackwellized(self) -> bool:
        return self in (Estimator.RB, Estimator.RB_CV, Estimator.RB_IS, Estimator.RB_IS_CV)

    @property
    def without_cv(self) -> "Estimator | None":
        """The same estimator without its control variate (RB+CV → RB), None for the others."""
        return {Estimator.RB_CV: Estimator.RB, Estimator.RB_IS_CV: Estimator.RB_IS}.get(self)


def kind(name) -> Estimator | None:
    """The Estimator named `name` (an Estimator or its value), None when it is not one (a synthetic method name)."""
    try:
        return Estimator(name)
    except ValueError:
        return None
