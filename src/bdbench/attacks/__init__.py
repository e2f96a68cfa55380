"""Attack registry: one file per attack, each registering its class with `@ATTACKS.register("name")`."""

from __future__ import annotations

# Imported for their registration; the order is the order `ATTACKS.registered()` lists them in.
from bdbench.attacks import (  # noqa: F401
    adaptive,
    advdoor,
    badnets,
    blended,
    bpp,
    dfb,
    inputaware,
    lc,
    lf,
    lsp,
    narcissus,
    none,
    sig,
    source_specific,
    ssba,
    trojannn,
    wanet,
)
from bdbench.attacks.base import ATTACKS, Attack, CleanLabelAttack, PoisonedTrainingSet, TriggeredTestSet
from bdbench.attacks.workshop import AttackWorkshop

__all__ = ["ATTACKS", "Attack", "AttackWorkshop", "CleanLabelAttack", "PoisonedTrainingSet", "TriggeredTestSet"]
