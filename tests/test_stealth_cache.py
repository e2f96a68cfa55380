"""Stealth metrics (PSNR, SSIM of the triggered test set) are computed once per triggered test set and cached."""

import pytest
import torch

from bdbench import metrics, run_grid
from bdbench.attacks import ATTACKS, AttackWorkshop
from bdbench.experiment import triggered_test_source
from bdbench.grid import expand, load_grid

SURROGATE = {"width": 8, "epochs": 2, "batch_size": 64}


@pytest.fixture
def counted_ssim(monkeypatch):
    calls = []
    real = metrics.ssim

    def ssim(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "ssim", ssim)
    return calls


def test_stealth_metrics_are_computed_once_and_a_corrupt_entry_again(tmp_path, tiny_grid, counted_ssim, caplog):
    tiny_grid.update(attacks=[{"name": "badnets", "patch_size": 2}], seeds=[0, 1])
    rows = run_grid(tiny_grid, out=tmp_path, progress=False)
    # Two seeds x two defenses, one fixed trigger: one computation, four rows with its numbers.
    assert len(rows) == 4 and set(rows.status) == {"ok"} and len(counted_ssim) == 1
    assert rows.psnr.nunique() == 1 and rows.ssim.nunique() == 1 and 0.5 < rows.ssim[0] < 1
    (entry,) = (tmp_path / "cache" / "stealth").glob("*.safetensors")
    entry.write_bytes(b"\x00garbage")
    tiny_grid["defenses"] = [{"name": "ft", "epochs": 1}]
    again = run_grid(tiny_grid, out=tmp_path, progress=False)
    new = again[~again.experiment_id.isin(rows.experiment_id)]
    assert len(new) == 2 and set(new.status) == {"ok"} and len(counted_ssim) == 2  # recomputed once, then cached
    assert new.psnr.tolist() == rows.psnr[:2].tolist() and new.ssim.tolist() == rows.ssim[:2].tolist()
    assert "computing the stealth metrics again" in caplog.text


def _spec(tiny_grid, attack, **fields):
    tiny_grid.update(attacks=[attack], defenses=["none"], seeds=[0])
    return expand(load_grid(tiny_grid))[0].model_copy(update=fields)


def test_the_cache_key_holds_the_seed_and_victim_only_where_the_trigger_depends_on_them(tiny_grid):
    badnets, wanet, inputaware = (ATTACKS.build(name, {}) for name in ("badnets", "wanet", "inputaware"))
    assert triggered_test_source(_spec(tiny_grid, "badnets"), badnets) == \
        triggered_test_source(_spec(tiny_grid, "badnets", seed=1), badnets)
    assert triggered_test_source(_spec(tiny_grid, "wanet"), wanet) != \
        triggered_test_source(_spec(tiny_grid, "wanet", seed=1), wanet)
    # Input-aware learns its generator with the victim: another victim (here another poison rate) is another key.
    assert triggered_test_source(_spec(tiny_grid, "inputaware"), inputaware) != \
        triggered_test_source(_spec(tiny_grid, "inputaware", poison_rate=0.2), inputaware)
    assert triggered_test_source(_spec(tiny_grid, "badnets"), badnets) != \
        triggered_test_source(_spec(tiny_grid, "badnets", target_label=1), badnets)


@pytest.mark.parametrize("name, params", [
    ("badnets", {"pattern": "random"}), ("blended", {}), ("sig", {}), ("bpp", {}),
    ("lc", {"steps": 2, "surrogate": SURROGATE}), ("source_specific", {"variant": "trans"}),
    ("lsp", {"attack": "blended"}), ("wanet", {}), ("adaptive_blend", {}), ("adaptive_patch", {}),
])
def test_seeded_trigger_says_whether_the_seed_changes_the_triggered_test_set(digits, tmp_path, name, params):
    sets = []
    for seed in (0, 1):
        attack = ATTACKS.build(name, params)
        attack.prepare(digits, 0, AttackWorkshop(seed=seed, dataset_key="digits"))
        sets.append(attack.triggered_test_set(digits, 0))
    same = torch.equal(sets[0].x, sets[1].x) and torch.equal(sets[0].x_clean, sets[1].x_clean)
    assert same == (not attack.seeded_trigger)
