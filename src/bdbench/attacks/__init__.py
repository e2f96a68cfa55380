"""Attack registry: one file per attack, each registered under its grid name."""

from __future__ import annotations

from bdbench.attacks.badnets import BadNets
from bdbench.attacks.base import Attack, PoisonedTrainingSet, TriggeredTestSet
from bdbench.attacks.blended import Blended
from bdbench.attacks.bpp import Bpp
from bdbench.attacks.inputaware import InputAware
from bdbench.attacks.lf import LowFrequency
from bdbench.attacks.narcissus import Narcissus
from bdbench.attacks.none import NoAttack
from bdbench.attacks.ssba import SSBA
from bdbench.attacks.wanet import WaNet
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")
ATTACKS.register("none")(NoAttack)
ATTACKS.register("badnets")(BadNets)
ATTACKS.register("blended")(Blended)
ATTACKS.register("wanet")(WaNet)
ATTACKS.register("bpp")(Bpp)
ATTACKS.register("lf")(LowFrequency)
ATTACKS.register("inputaware")(InputAware)
ATTACKS.register("ssba")(SSBA)
ATTACKS.register("narcissus")(Narcissus)

__all__ = ["ATTACKS", "Attack", "AttackWorkshop", "PoisonedTrainingSet", "TriggeredTestSet"]
