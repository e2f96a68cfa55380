"""BPP's ASR and clean accuracy after every epoch, for variants of its settings trained side by side.

A controlled measurement of why BppAttack (Wang et al., CVPR 2022) takes hold slowly: each variant
changes one setting of the default (8 levels with dithering, negative samples on 20% of each batch,
10% poisoned) and trains the same victim (the grids' recipe: `--model`, one-cycle
lr 0.05, batch 128, bfloat16 on the CPU when it has native support) on the first `--train` images of
an .npz data set for `--epochs` epochs, printing clean accuracy and ASR on the first `--test` test
images after each epoch (one-cycle: the curve of one run of that length, not of shorter runs).
The victim's test-time evaluation never feeds back into training.

    PYTHONPATH=src .venv/bin/python benchmarks/bpp_epochs.py --data ../shared/data/cifar10.npz \\
        [--train 10000] [--test 2000] [--epochs 15] [--variants default,no-negatives,...] \\
        [--model '{name: cnn-small, width: 16, pool: 4}']

`--model` is any registered model as a grid names it (default: PreAct-ResNet18 at width 0.25; the
`attacks-gtsrb` victim is the example above).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bdbench.attacks import ATTACKS
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.data import load_dataset
from bdbench.data.dataset import Dataset, channel_stats
from bdbench.grid import MODEL_SHAPE, Component
from bdbench.models import MODELS, create_model, with_normalization
from bdbench.training import TrainConfig, cpu_has_native_bfloat16, predict, train
from bdbench.triggers import parse_component

VARIANTS: dict[str, tuple[dict, float]] = {  # name -> (bpp parameters, poison rate)
    "default": ({}, 0.1),
    "no-negatives": ({"neg_ratio": 0.0}, 0.1),
    "no-dithering": ({"dithering": False}, 0.1),
    "authors-readme": ({"squeeze_num": 32, "dithering": False}, 0.1),  # their README's command line
    "rate-0.2": ({}, 0.2),  # their code's default injection rate
}


def sliced(dataset: Dataset, train_count: int, test_count: int) -> Dataset:
    x_train = dataset.x_train[:train_count]
    mean, std = channel_stats(x_train)
    return dataclasses.replace(dataset, x_train=x_train, y_train=dataset.y_train[:train_count],
                               x_test=dataset.x_test[:test_count], y_test=dataset.y_test[:test_count],
                               mean=mean, std=std)


class EpochProbe:
    """A batch hook that passes batches to the attack's own hook and, at each epoch's end, scores the model."""

    def __init__(self, inner, steps_per_epoch: int, score) -> None:
        self.inner, self.steps_per_epoch, self.score, self.step = inner, steps_per_epoch, score, 0

    def __call__(self, x, y, generator, index):
        if self.step and self.step % self.steps_per_epoch == 0:
            self.score(self.step // self.steps_per_epoch)
        self.step += 1
        return self.inner(x, y, generator, index) if self.inner is not None else (x, y)


def run(name: str, dataset: Dataset, epochs: int, model_spec: Component) -> None:
    params, rate = VARIANTS[name]
    attack = ATTACKS.get("bpp")(**params)
    attack.prepare(dataset, 0, AttackWorkshop(seed=0))
    poisoned = attack.poison(dataset, rate, 0, torch.Generator().manual_seed(0))
    triggered = attack.triggered_test_set(dataset, 0)
    torch.manual_seed(0)
    model = with_normalization(create_model(model_spec.name, dataset.num_classes, dataset.in_channels,
                                            dataset.image_size, **model_spec.params), dataset.mean, dataset.std)
    config = TrainConfig(epochs=epochs, batch_size=128, lr=0.05, schedule="onecycle",
                         cpu_bfloat16=cpu_has_native_bfloat16())
    start = time.process_time()

    def score(epoch: int) -> None:
        ca = (predict(model, dataset.x_test) == dataset.y_test).float().mean().item()
        asr = (predict(model, triggered.x) == triggered.y_target).float().mean().item()
        model.train()
        print(f"{name:15s} epoch {epoch:3d}  CA {ca:.3f}  ASR {asr:.3f}  cpu {time.process_time() - start:7.0f}s",
              flush=True)

    probe = EpochProbe(attack.training_hook(), len(dataset.x_train) // 128, score)
    train(model, poisoned.x, poisoned.y, config, seed=0, crop_padding=dataset.crop_padding,
          hflip=dataset.allow_hflip, hook=probe)
    score(epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--hflip", action="store_true", help="the data set allows horizontal flips (CIFAR-10)")
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--model", default="{name: preact-resnet18, width: 0.25}",
                        help="a registered model as a grid names it, e.g. '{name: cnn-small, width: 16, pool: 4}'")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    dataset = sliced(load_dataset("npz", path=args.data, allow_hflip=args.hflip), args.train, args.test)
    print(dataset.describe(), f"| bfloat16: {cpu_has_native_bfloat16()}", flush=True)
    model_spec = parse_component(args.model, "--model")
    MODELS.check(model_spec.name, model_spec.params, supplied=MODEL_SHAPE)
    print(f"model {model_spec.name} {model_spec.params}", flush=True)
    for name in args.variants.split(","):
        run(name, dataset, args.epochs, model_spec)


if __name__ == "__main__":
    main()
