"""Ranges of component parameters, declared in the constructors' signatures.

`Registry.check` (before a grid runs) and every registered class's constructor validate a parameter
against its annotation, so `epochs: PositiveInt` refuses `epochs=-1` in one line that names the
parameter: "defense 'ft' parameter 'epochs' is -1: input should be greater than or equal to 1". Ranges
that no alias here names are written in place: `Annotated[float, Field(gt=0, le=255)]`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

PositiveInt = Annotated[int, Field(ge=1)]  # epochs, steps, sizes, counts
NonNegativeInt = Annotated[int, Field(ge=0)]  # epochs where 0 skips a stage, back-offs
BatchSize = Annotated[int, Field(ge=2)]  # batch statistics need two samples
PositiveFloat = Annotated[float, Field(gt=0)]  # learning rates, step sizes
NonNegativeFloat = Annotated[float, Field(ge=0)]  # weights of loss terms, thresholds
UnitInterval = Annotated[float, Field(ge=0, le=1)]  # [0, 1]: accuracy drops, mixing weights
UpToOne = Annotated[float, Field(gt=0, le=1)]  # (0, 1]: perturbation bounds, shares kept
BelowOne = Annotated[float, Field(ge=0, lt=1)]  # [0, 1): shares where 1 would leave nothing
OpenRate = Annotated[float, Field(gt=0, lt=1)]  # (0, 1): rates of flagged samples, false rejections

__all__ = ["BatchSize", "BelowOne", "NonNegativeFloat", "NonNegativeInt", "OpenRate", "PositiveFloat", "PositiveInt",
           "UnitInterval", "UpToOne"]
