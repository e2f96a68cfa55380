"""Attack registry: one file per attack, each registered under its grid name."""

from __future__ import annotations

from bdbench.attacks.badnets import BadNets
from bdbench.attacks.base import Attack, PoisonedTrainingSet, TriggeredTestSet
from bdbench.attacks.blended import Blended
from bdbench.attacks.none import NoAttack
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")
ATTACKS.register("none")(NoAttack)
ATTACKS.register("badnets")(BadNets)
ATTACKS.register("blended")(Blended)

__all__ = ["ATTACKS", "Attack", "AttackWorkshop", "PoisonedTrainingSet", "TriggeredTestSet"]
