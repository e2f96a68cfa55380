"""No defense: the reference row of each cell (CA and ASR of the deployed model as it is)."""

from __future__ import annotations

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome


@DEFENSES.register("none")
class NoDefense(Defense):
    """No defense: measures the deployed model as it is (the reference for DER)."""

    kind = DefenseKind.NONE
    reference = True
    needs_internals = False  # touches nothing

    def run(self, context: DefenseContext) -> DefenseOutcome:
        return DefenseOutcome()
