"""Progressive Backdoor Erasing (PBE): its effect on a tiny BadNets model and its adversarial examples."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdbench import training
from bdbench.defenses import DEFENSES, DefenseKind, pbe
from bdbench.defenses.pbe import adversarial_cross_entropy
from bdbench.errors import ConfigError
from bdbench.training import TrainConfig

from defense_fixtures import toy_context, untrained


def test_repair_lowers_badnets_asr_and_keeps_clean_accuracy(badnets, effect):
    assert DEFENSES.get("pbe").kind is DefenseKind.MODEL_REPAIR
    # The authors' lr 0.001 at batch 128 is 20 steps that change nothing here, and digits have grey
    # levels 1/16 apart, so eps 6/255 is a tenth of one level: batch 32, lr 0.01, eps 0.15, 5
    # adversarial epochs (then the default 17 ordinary ones).
    repaired = badnets.repair("pbe", {"batch_size": 32, "lr": 0.01, "eps": 0.15, "adversarial_epochs": 5})
    # Measured: 0.15 / 0.10 ASR (one / two threads); clean accuracy within 0.04.
    badnets.check_repair(repaired, effect, 0.3, 0.15)
    assert not repaired.training and all(p.dtype == torch.float32 for p in repaired.parameters())


def test_pbe_adversarial_examples_are_the_untargeted_corner_for_a_linear_model():
    # Two classes, logits W x: cross-entropy for label 0 grows with (w1 - w0) . x, so the worst case in the
    # eps ball is x + eps sign(w1 - w0); 7 steps of eps/5 from x reach it.
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, 2.0, 0.5]]))
    seen = []
    model = nn.Sequential(nn.Flatten(), linear)
    model.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach()))
    x = torch.full((1, 1, 2, 2), 0.5)
    eps = 6 / 255
    loss = adversarial_cross_entropy(eps, eps / 5, 7)(model.train(), x, torch.tensor([0]))
    corner = x + eps * torch.tensor([-1.0, 1.0, 1.0, 1.0]).view(1, 1, 2, 2)
    assert torch.allclose(seen[-1], corner, atol=1e-6)
    assert torch.isclose(loss, F.cross_entropy(model(corner), torch.tensor([0])))
    assert model.training and linear.weight.grad is None  # the update's mode restored; no gradients left behind


def test_one_optimiser_runs_each_rounds_adversarial_then_ordinary_epochs(monkeypatch, digits):
    # The authors' aft_main.py builds one SGD optimiser and runs epochs 1-3 on adversarial examples and 4-20 on
    # the clean images with it, so the momentum of the adversarial epochs carries into the ordinary ones.
    # 40 images in batches of 8: 5 steps an epoch; 2 rounds of 1 adversarial and 2 ordinary epochs.
    optimisers, marks = [], []

    class CountingSGD(torch.optim.SGD):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimisers.append(self)

    augment, pgd = training.augment_batch, pbe.linf_pgd
    monkeypatch.setattr(torch.optim, "SGD", CountingSGD)
    monkeypatch.setattr(training, "augment_batch", lambda *a, **k: marks.append("step") or augment(*a, **k))
    monkeypatch.setattr(pbe, "linf_pgd", lambda *a, **k: marks.append("pgd") or pgd(*a, **k))
    context = toy_context(untrained("cnn-small", digits), digits.x_train[:40], digits.y_train[:40], num_classes=10,
                          train_config=TrainConfig(epochs=1, batch_size=8))
    DEFENSES.build("pbe", {"rounds": 2, "adversarial_epochs": 1, "epochs": 2, "batch_size": 8, "steps": 1}).run(context)
    per_step = [following == "pgd" for mark, following in zip(marks, marks[1:] + ["step"]) if mark == "step"]
    assert per_step == ([True] * 5 + [False] * 10) * 2
    assert len(optimisers) == 1


@pytest.mark.parametrize("params", [{"rounds": 0}, {"steps": 0}, {"lr": 0}])
def test_bad_parameters_raise_a_config_error(params):
    with pytest.raises(ConfigError, match="pbe"):
        DEFENSES.build("pbe", params)
