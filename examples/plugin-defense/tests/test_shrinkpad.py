"""ShrinkPad's own tests. Install the plugin first (`pip install -e examples/plugin-defense`), then
`pytest examples/plugin-defense`."""

from __future__ import annotations

import pytest
import torch
from bdbench_shrinkpad import ShrinkPad, ShrinkPadded
from torch import nn

import bdbench
from bdbench.defenses import DEFENSES
from bdbench.errors import ConfigError


class Spy(nn.Module):
    """Records what the defended model passes on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return torch.zeros(len(x), 10)


def test_bdbench_finds_the_installed_plugin():
    if "shrinkpad" not in DEFENSES:
        pytest.fail("bdbench does not see the plugin: install it with pip install -e examples/plugin-defense")
    entry = DEFENSES.entry("shrinkpad")
    assert entry.obj is ShrinkPad and entry.source.startswith("bdbench-shrinkpad ")


def test_images_are_shrunk_and_padded_back_at_a_seeded_random_offset():
    spy = Spy()
    images = torch.ones(64, 1, 28, 28)
    ShrinkPadded(spy, shrink=4, seed=0)(images)
    seen = spy.seen[0]
    assert seen.shape == images.shape
    # Each image keeps a 24x24 block of ones; the other 4 rows and 4 columns are zero padding.
    assert torch.allclose(seen.sum((1, 2, 3)), torch.full((64,), 24.0 * 24.0))
    rows = (seen[:, 0].sum(2) > 0).float().argmax(1)  # first non-padded row of each image
    assert set(rows.tolist()) <= set(range(5)) and len(set(rows.tolist())) > 1  # offsets vary within 0..4
    again = Spy()
    ShrinkPadded(again, shrink=4, seed=0)(images)
    assert torch.equal(again.seen[0], seen)  # the same seed pads the same way


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="shrink must be at least 1 pixel"):
        ShrinkPad(shrink=0)


def test_shrinkpad_lowers_badnets_attack_success_in_a_grid(tmp_path):
    """A BadNets cnn-small on mnist5k: ShrinkPad at the paper's share of the side (4 of 28 pixels) takes the
    attack success from about 1.0 to about 0.2 for some 8 points of clean accuracy (measured 1.00 -> 0.17,
    0.961 -> 0.883); the bars leave room for other CPUs and seeds."""
    grid = {"name": "shrinkpad-check", "dataset": "mnist5k", "model": "cnn-small",
            "training": {"epochs": 8, "batch_size": 128, "lr": 0.05},
            "attacks": ["badnets"], "poison_rates": [0.1], "defenses": ["none", "shrinkpad"], "seeds": [0]}
    rows = bdbench.run_grid(grid, out=tmp_path, progress=False).set_index("defense")
    assert (rows.status == "ok").all(), rows.error.tolist()
    assert rows.loc["none", "asr"] > 0.9
    assert rows.loc["shrinkpad", "asr"] < 0.5
    assert rows.loc["none", "clean_acc"] - rows.loc["shrinkpad", "clean_acc"] < 0.15
