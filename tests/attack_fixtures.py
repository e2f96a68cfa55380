"""What attack tests share: a prepared attack, a victim trained for seconds on its poisoned digits, and
what that victim does with and without the trigger."""

from __future__ import annotations

import torch
from torch import nn

from bdbench.attacks import ATTACKS, Attack, AttackWorkshop, PoisonedTrainingSet
from bdbench.data import Dataset
from bdbench.models import create_model, with_normalization
from bdbench.training import BatchHook, TrainConfig, predict, train

from effects import test_seed

# The tiny clean surrogate (width 8, 4 epochs) that attacks learning against one share through `workshop`
# (tests/attacks/conftest.py).
SURROGATE = {"width": 8, "epochs": 4, "batch_size": 64}


def prepared(name: str, dataset: Dataset, workshop: AttackWorkshop | None = None, **params) -> Attack:
    """Attack `name` built with `params` and prepared for `dataset` with target class 0."""
    attack = ATTACKS.build(name, params)
    attack.prepare(dataset, target_label=0, workshop=workshop or AttackWorkshop(seed=0))
    return attack


def poison(attack: Attack, dataset: Dataset, rate: float = 0.1) -> PoisonedTrainingSet:
    return attack.poison(dataset, rate, 0, torch.Generator().manual_seed(test_seed()))


def victim(dataset: Dataset, poisoned: PoisonedTrainingSet, epochs: int = 15, crop_padding: int = 0,
           hook: BatchHook | None = None) -> nn.Module:
    """A cnn-small (width 16) trained on `poisoned` for `epochs`, with the attack's training `hook` if any."""
    torch.manual_seed(test_seed())
    model = with_normalization(create_model("cnn-small", 10, 1, 8, width=16), dataset.mean, dataset.std)
    return train(model, poisoned.x, poisoned.y, TrainConfig(epochs=epochs, batch_size=64), seed=test_seed(),
                 crop_padding=crop_padding, hook=hook)


def rates(model: nn.Module, dataset: Dataset, attack: Attack) -> tuple[float, float]:
    """`model`'s attack success rate on `attack`'s triggered test set, and its clean test accuracy."""
    triggered = attack.triggered_test_set(dataset, 0)
    asr = (predict(model, triggered.x) == triggered.y_target).float().mean().item()
    clean = (predict(model, dataset.x_test) == dataset.y_test).float().mean().item()
    return asr, clean


def assert_clean_label(poisoned: PoisonedTrainingSet, dataset: Dataset) -> None:
    mask = poisoned.poison_mask
    assert mask.any() and (dataset.y_train[mask] == 0).all()  # target-class images only
    assert torch.equal(poisoned.y, dataset.y_train)  # no label changed
    assert torch.equal(poisoned.x[~mask], dataset.x_train[~mask])


def hooked_victim(dataset: Dataset, poisoned: PoisonedTrainingSet, attack: Attack, epochs: int) -> nn.Module:
    """A victim trained as the runner trains one: with the data set's crop padding and the attack's hook."""
    return victim(dataset, poisoned, epochs, dataset.crop_padding, attack.training_hook())


def implanted(attack: Attack, dataset: Dataset, poisoned: PoisonedTrainingSet) -> tuple[nn.Module, float, float]:
    """A victim trained for 15 epochs on `poisoned`, its ASR under `attack`'s trigger and its clean accuracy."""
    model = victim(dataset, poisoned)
    asr, clean = rates(model, dataset, attack)
    return model, asr, clean


def clean_model_asr(dataset: Dataset, attack: Attack, epochs: int) -> float:
    """The ASR of the same trigger on a model trained on clean data: what the attack must beat."""
    none = ATTACKS.build("none", {})
    model = hooked_victim(dataset, none.poison(dataset, 0, 0, torch.Generator()), none, epochs)
    return rates(model, dataset, attack)[0]


def record_hook_batches(attack: Attack, poisoned: PoisonedTrainingSet, batches: int = 3) -> list[tuple]:
    """Run the attack's hook on a few plain batches of the poisoned set, as the trainer would."""
    hook = attack.training_hook()
    assert hook is not None
    generator = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, 64 * batches, 64):
        index = torch.arange(start, start + 64)
        x = poisoned.x[index].float() / 255
        y = poisoned.y[index]
        hx, hy = hook(x, y, generator, index)
        out.append((index, x, y, hx.detach(), hy))
    return out


def check_dirty_label_effect(name: str, dataset: Dataset, effect, params: dict, epochs: int,
                             min_asr: float = 0.8) -> None:
    """A dirty-label attack poisoning 10% of `dataset`: its poisons carry the target label, and a victim trained
    for `epochs` (as the runner trains one) keeps its clean accuracy above 0.9 and obeys the trigger."""
    attack = prepared(name, dataset, **params)
    poisoned = poison(attack, dataset)
    assert (poisoned.y[poisoned.poison_mask] == 0).all()
    asr, clean = rates(hooked_victim(dataset, poisoned, attack, epochs), dataset, attack)
    effect.check("clean accuracy", clean, ">", 0.9)
    effect.check("ASR", asr, ">", min_asr)


def check_poisoning_is_deterministic_per_seed(attack: Attack, dataset: Dataset) -> None:
    """The same generator seed poisons the same rows the same way; another seed picks other rows."""
    runs = [attack.poison(dataset, 0.1, 0, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0].x, runs[1].x) and torch.equal(runs[0].y, runs[1].y)
    assert torch.equal(runs[0].poison_mask, runs[1].poison_mask)
    assert not torch.equal(runs[0].poison_mask, runs[2].poison_mask)
