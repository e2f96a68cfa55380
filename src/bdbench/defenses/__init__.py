"""Defense registry: one file per defense, each registering its class with `@DEFENSES.register("name")` and its
kind."""

from __future__ import annotations

# Imported for their registration, in the order `DEFENSES.registered()` lists them: the reference, fine-tuning;
# model repair and model inspection (they see the deployed model and the clean budget only; clp uses no data at
# all); model repair, part 2 (the newer defenses of the 16-defense study, Dunnett et al. 2024); training-data
# detection (the runner retrains on the samples they keep); run-time input detection; robust training on the
# poisoned set.
from bdbench.defenses import (  # noqa: F401
    abl,
    ac,
    aif,
    anp,
    awm,
    beatrix,
    bnp,
    cetf,
    clp,
    cti,
    fp,
    fst,
    ft,
    ftc,
    ftsam,
    ibau,
    mmbd,
    nad,
    nc,
    none,
    npd,
    pbe,
    pt,
    rnp,
    sau,
    scaleup,
    scan,
    sentinet,
    spectre,
    ss,
    strategic,
    strip,
    teco,
    vif,
)
from bdbench.defenses.base import (
    DEFENSES,
    SEES_TRAINING_SET,
    Defense,
    DefenseContext,
    DefenseKind,
    DefenseOutcome,
    InputDetector,
)

__all__ = ["DEFENSES", "SEES_TRAINING_SET", "Defense", "DefenseContext", "DefenseKind", "DefenseOutcome",
           "InputDetector"]
