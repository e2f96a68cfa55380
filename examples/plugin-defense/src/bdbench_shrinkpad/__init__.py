"""ShrinkPad, a bdbench plugin defense (registered through the `bdbench.defenses` entry point)."""

from bdbench_shrinkpad.defense import ShrinkPad, ShrinkPadded

__all__ = ["ShrinkPad", "ShrinkPadded"]
