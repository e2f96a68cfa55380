"""Tests that run many defenses at once: every repair on every architecture, and defenses
of each kind through the runner. Each method's own tests are in tests/defenses/test_<name>.py."""

import pytest
import torch
from torch import nn

from bdbench import load_results, run_grid
from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.errors import NotApplicable
from bdbench.models import MODELS
from bdbench.training import TrainConfig

from defense_fixtures import toy_context, untrained

CHEAP = {"nad": {"teacher_epochs": 1, "epochs": 1, "batch_size": 8},
         "anp": {"iterations": 2, "batch_size": 8},
         "ibau": {"rounds": 1, "fixed_point_iterations": 2, "batch_size": 8},
         "clp": {},
         "bnp": {},
         "rnp": {"unlearning_epochs": 1, "recovering_epochs": 1, "batch_size": 8},
         "awm": {"rounds": 1, "inner": 1, "batch_size": 8},
         "sau": {"epochs": 1, "batch_size": 8, "pgd_steps": 1},
         "fst": {"epochs": 1, "batch_size": 8},
         "ftsam": {"epochs": 1, "batch_size": 8},
         "npd": {"epochs": 1, "warm_epochs": 1, "steps": 1, "batch_size": 8},
         "pbe": {"adversarial_epochs": 1, "epochs": 1, "steps": 1, "batch_size": 8},
         "pt": {"epochs": 1, "batch_size": 8},
         "strategic": {"iterations": 1, "seed_images": 4, "mask_steps": 2, "mask_batch_size": 4, "epochs": 1,
                       "batch_size": 8, "reasr_threshold": 0.0},
         # A zero threshold takes every architecture through the Grad-CAM focus, the region search and the repair.
         "cetf": {"population": 4, "generations": 1, "search_images": 8, "flip_threshold": 0.0,
                  "region_population": 4, "region_generations": 1, "epochs": 1, "batch_size": 8}}


@pytest.mark.parametrize("architecture", MODELS.names())
def test_every_repair_runs_on_every_architecture(architecture, digits):
    model = untrained(architecture, digits)
    context = toy_context(model, digits.x_train[:16], digits.y_train[:16], num_classes=10, crop_padding=1,
                          train_config=TrainConfig(epochs=1, batch_size=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, params in CHEAP.items():
        if name == "bnp" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            with pytest.raises(NotApplicable, match="no BatchNorm layer"):  # a `not_applicable` row, not an error
                DEFENSES.build(name, params).run(context)
            continue
        repaired = DEFENSES.build(name, params).run(context).model
        with torch.no_grad():
            logits = repaired.eval()(digits.x_test[:4].float() / 255)
        assert logits.shape == (4, 10) and torch.isfinite(logits).all(), name
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), name


def test_the_runner_scores_the_repaired_models(tmp_path, tiny_grid):
    tiny_grid.update(attacks=[{"name": "badnets", "patch_size": 2}],
                     defenses=[{"name": name, **params} for name, params in CHEAP.items()])
    run_grid(tiny_grid, out=tmp_path, progress=False)
    rows = load_results(tmp_path)
    assert sorted(rows["defense"]) == sorted(CHEAP)
    assert (rows["status"] == "ok").all(), rows[["defense", "error"]]
    assert (rows["defense_kind"] == "model_repair").all()
    for column in ("clean_acc", "asr", "robust_acc", "der", "defense_s", "peak_rss_mb", "clean_budget"):
        assert rows[column].notna().all(), column


def test_model_defenses_run_through_the_runner(tmp_path, tiny_grid):
    tiny_grid["defenses"] = [{"name": "fp", "epochs": 1}, {"name": "nc", "epochs": 4, "unlearning_epochs": 1},
                             {"name": "mmbd", "restarts": 4, "steps": 20}]
    rows = run_grid(tiny_grid, out=tmp_path, progress=False)
    assert len(rows) == 6 and set(rows.status) == {"ok"}, rows[["defense", "error"]]
    assert (rows.defense_s > 0).all() and (rows.peak_rss_mb > 0).all()
    assert rows.clean_acc.notna().all()
    fp = rows[(rows.defense == "fp") & (rows.attack == "badnets")].iloc[0]
    assert fp.defense_kind == "model_repair" and 0 <= fp.der <= 1 and fp.detected is None
    for name in ("nc", "mmbd"):
        verdicts = rows[rows.defense == name]
        assert (verdicts.defense_kind == "model_detection").all()
        assert verdicts.detected.notna().all() and verdicts.anomaly_index.notna().all()
        assert verdicts.det_threshold.notna().all() and verdicts.suspected_targets.map(type).eq(list).all()


def test_data_defenses_declare_the_kind_that_gets_the_training_set():
    for name in ("ac", "ss", "spectre", "scan", "beatrix"):
        assert DEFENSES.get(name).kind is DefenseKind.DATA_DETECTION
    assert DEFENSES.get("abl").kind is DefenseKind.ROBUST_TRAINING
