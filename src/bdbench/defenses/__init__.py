"""Defense registry: one file per defense, each registered under its grid name with its kind."""

from __future__ import annotations

from bdbench.defenses.base import (
    Defense, DefenseContext, DefenseKind, DefenseOutcome, InputDetector, SEES_TRAINING_SET,
)
from bdbench.defenses.ft import FineTuning
from bdbench.defenses.none import NoDefense
from bdbench.registry import Registry

DEFENSES: Registry[type[Defense]] = Registry("defense")
DEFENSES.register("none")(NoDefense)
DEFENSES.register("ft")(FineTuning)

__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseKind", "DefenseOutcome", "InputDetector",
           "SEES_TRAINING_SET"]
