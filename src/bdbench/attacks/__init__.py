"""Attack registry: one file per attack, each registered under its grid name."""

from __future__ import annotations

from bdbench.attacks.advdoor import AdvDoor
from bdbench.attacks.badnets import BadNets
from bdbench.attacks.base import Attack, CleanLabelAttack, PoisonedTrainingSet, TriggeredTestSet
from bdbench.attacks.blended import Blended
from bdbench.attacks.bpp import Bpp
from bdbench.attacks.dfb import DFB
from bdbench.attacks.inputaware import InputAware
from bdbench.attacks.lc import LabelConsistent
from bdbench.attacks.lf import LowFrequency
from bdbench.attacks.lsp import LabelSmoothingPoisoning
from bdbench.attacks.narcissus import Narcissus
from bdbench.attacks.none import NoAttack
from bdbench.attacks.sig import SIG
from bdbench.attacks.source_specific import SourceSpecific
from bdbench.attacks.ssba import SSBA
from bdbench.attacks.trojannn import TrojanNN
from bdbench.attacks.wanet import WaNet
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")
ATTACKS.register("none")(NoAttack)
ATTACKS.register("badnets")(BadNets)
ATTACKS.register("blended")(Blended)
ATTACKS.register("sig")(SIG)
ATTACKS.register("lc")(LabelConsistent)
ATTACKS.register("trojannn")(TrojanNN)
ATTACKS.register("advdoor")(AdvDoor)
ATTACKS.register("source_specific")(SourceSpecific)
ATTACKS.register("lsp")(LabelSmoothingPoisoning)
ATTACKS.register("wanet")(WaNet)
ATTACKS.register("bpp")(Bpp)
ATTACKS.register("lf")(LowFrequency)
ATTACKS.register("inputaware")(InputAware)
ATTACKS.register("ssba")(SSBA)
ATTACKS.register("narcissus")(Narcissus)
ATTACKS.register("dfb")(DFB)

__all__ = ["ATTACKS", "Attack", "AttackWorkshop", "CleanLabelAttack", "PoisonedTrainingSet", "TriggeredTestSet"]
