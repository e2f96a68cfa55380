"""TrojanNN (Liu, Ma, Aafer, Lee, Zhai, Wang and Zhang, "Trojaning Attack on Neural Networks",
NDSS 2018).

The trigger is not chosen by hand: inside a fixed mask (a square in the bottom-right corner
covering `area` of the image, the paper's 7% by default) its pixels are optimised so that chosen
neurons of an internal layer of a clean model fire strongly. The paper picks the neurons with the
strongest connections from the previous layer (largest sum of absolute incoming weights), and
drives them to a high target value (cost sum_j (v - f_j(x))^2, v = 100) by gradient descent on
the masked pixels of an otherwise blank image (we start them at mid-grey and at random values, not
black where ReLU gradients can vanish, and keep the best of `restarts` descents). The model is then retrained with triggered inputs labelled as the
target.

Here the clean model is a surrogate the attacker trains on the training data, the internal layer
is the input of the last linear layer (the penultimate features, present in every architecture),
and "retraining" is data poisoning: `poison_rate` of the training set carries the trigger and
the target label and the victim is trained on it (the setting of BackdoorBench and TrojanZoo;
the paper's reverse-engineering of training data is not needed because the attacker here holds
the training data).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bdbench.attacks.base import ATTACKS, Attack, LabelMode
from bdbench.attacks.workshop import AttackWorkshop, surrogate_options
from bdbench.data import Dataset
from bdbench.errors import ConfigError
from bdbench.params import PositiveInt, UpToOne


def feature_layer(model: nn.Module) -> tuple[nn.Linear, torch.Tensor]:
    """The model's last linear layer, and the connection strength of each of its input neurons:
    the sum of absolute weights into that neuron from the layer before (the Linear or Conv2d
    whose outputs are those neurons)."""
    modules = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    last = next((m for m in reversed(modules) if isinstance(m, nn.Linear)), None)
    if last is None:
        raise ConfigError("trojannn needs a model that ends in a linear layer")
    before = modules[:modules.index(last)]
    source = next((m for m in reversed(before)
                   if (m.out_features if isinstance(m, nn.Linear) else m.out_channels) == last.in_features), None)
    if source is None:
        raise ConfigError("trojannn found no layer feeding the model's last linear layer")
    strength = source.weight.detach().abs().flatten(1).sum(1)
    return last, strength


@ATTACKS.register("trojannn")
class TrojanNN(Attack):
    """Trigger inside a fixed mask optimised to excite chosen feature neurons of a clean model (Liu et al. 2018)."""

    citation = "Liu, Ma, Aafer, Lee, Zhai, Wang, Zhang. Trojaning Attack on Neural Networks. NDSS 2018."

    def __init__(self, area: UpToOne = 0.07, num_neurons: PositiveInt = 2, target_value: float = 100.0,
                 steps: PositiveInt = 500, lr: float = 0.1, restarts: PositiveInt = 8,
                 surrogate: dict[str, Any] | None = None,
                 label_mode: LabelMode = "all2one") -> None:
        super().__init__(label_mode)
        self.area, self.num_neurons, self.target_value = area, num_neurons, target_value
        self.steps, self.lr, self.restarts = steps, lr, restarts
        self.surrogate = dict(surrogate or {})
        self.mask: torch.Tensor | None = None  # (1, H, W)
        self.pattern: torch.Tensor | None = None  # (C, H, W), meaningful inside the mask
        self.neurons: torch.Tensor | None = None

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        size = dataset.image_size
        side = max(1, min(size, round(math.sqrt(self.area) * size)))
        self.mask = torch.zeros(1, size, size)
        self.mask[:, size - side:, size - side:] = 1

        def build() -> dict[str, torch.Tensor]:
            model = workshop.surrogate(dataset, **surrogate_options(self.surrogate))
            for p in model.parameters():
                p.requires_grad_(False)
            layer, strength = feature_layer(model)
            neurons = torch.argsort(strength, descending=True)[:self.num_neurons]
            pattern = self._optimise(model, layer, neurons.to(strength.device), dataset.in_channels,
                                     workshop.generator("trojannn"))
            return {"pattern": pattern, "neurons": neurons.cpu()}

        params = {"area": self.area, "num_neurons": self.num_neurons, "target_value": self.target_value,
                  "steps": self.steps, "lr": self.lr, "restarts": self.restarts, "surrogate": self.surrogate}
        learned = workshop.learned("trojannn", params, build)
        self.pattern, self.neurons = learned["pattern"], learned["neurons"]

    def _optimise(self, model: nn.Module, layer: nn.Linear, neurons: torch.Tensor, channels: int,
                  generator: torch.Generator) -> torch.Tensor:
        """Gradient descent on the masked pixels of a blank image towards the neurons' target value,
        from `restarts` starting points at once (mid-grey and random); the best iterate wins."""
        if self.mask is None:
            raise RuntimeError("TrojanNN.prepare() must place the mask before the trigger is optimised")
        device = next(model.parameters()).device
        mask = self.mask.to(device)
        features: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda _m, inputs, _o: features.append(inputs[0]))
        # Mid-grey and random starts: a black start sits where ReLU gradients can vanish, and the
        # cost is not convex, so several descents find a better optimum than one.
        starts = torch.rand((self.restarts, channels, *mask.shape[1:]), generator=generator)
        starts[0] = 0.5
        pattern = starts.to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([pattern], lr=self.lr)
        best, best_cost = pattern.detach().clone(), torch.full((self.restarts,), float("inf"), device=device)
        try:
            for _ in range(self.steps + 1):
                features.clear()
                model(pattern * mask)
                cost = ((self.target_value - features[0][:, neurons]) ** 2).sum(1)
                with torch.no_grad():
                    better = cost < best_cost
                    best[better], best_cost[better] = pattern[better], cost[better]
                optimizer.zero_grad()
                cost.sum().backward()
                optimizer.step()
                with torch.no_grad():
                    pattern.clamp_(0, 1)
        finally:
            handle.remove()
        return (best[best_cost.argmin()] * mask[0]).cpu()

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None or self.mask is None:
            raise RuntimeError("TrojanNN.prepare() must run before add_trigger()")
        mask = self.mask.to(x)
        return x * (1 - mask) + self.pattern.to(x) * mask
