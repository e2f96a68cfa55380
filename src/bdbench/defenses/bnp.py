"""BatchNorm-statistics-based neuron pruning, BNP (Runkai Zheng, Rongjun Tang, Jianze Li and Li Liu,
"Pre-activation Distributions Expose Backdoor Neurons", NeurIPS 2022, vol. 35, pp. 18667-18680;
openreview.net/forum?id=wwW-1k1ljIg; code github.com/RJ-T/NIPS2022_EP_BNP, `defense.py`, `BNP`).

A backdoor neuron's pre-activation (the input of its BatchNorm) has different moments on poisoned and on
benign images. A BatchNorm layer's running mean and variance were gathered on the poisoned training set,
so they describe a hypothetical distribution N(running_mean, running_var) that the poison has pulled
away from the benign one; the benign one, N(mu, sigma^2), is estimated from the defender's clean
images. Every neuron (channel) of every BatchNorm layer is scored by the Kullback-Leibler divergence

    KL(N(mu, sigma^2) || N(running_mean, running_var))
        = log(sd_running / sigma) + (sigma^2 + (mu - running_mean)^2) / (2 running_var) - 1/2,

and within each layer the neurons whose divergence exceeds the layer's mean + u x std (the sample
standard deviation, strict `>`; u = 3) are pruned by setting their BatchNorm scale to zero, as in the
authors' code (the shift stays, so the neuron outputs a constant). All layers are scored on the unpruned
model before any is pruned.

Data: the paper's BNP is not data-free. It needs a few benign images, without labels (the authors use a
held-out 1% of the training set, 500 CIFAR-10 images, with the training augmentation, in one batch, model
in eval mode). Here those are the clean budget's images, all of them, with the victim's augmentation
(the running statistics were gathered on augmented batches); the labels are never read. The moments are
the per-channel mean and unbiased variance of each BatchNorm's input over images and positions, pooled
over all the budget's batches, with the model in eval mode. Nothing is tuned: u is fixed before seeing
data. A layer of n neurons cannot hold a value more than (n - 1) / sqrt(n) std above its mean (3.75 at
n = 16), so on narrow networks u = 3 prunes little; `u` is a parameter.

Only BatchNorm layers keep running statistics, so a model without them (a ConvNeXt or a ViT, whose norms
are LayerNorms) is refused with `NotApplicable` (a `not_applicable` row), naming the norm layers it has.

Against the authors' release (`defense.py`, `BNP`, lines 142-178 at commit af5150d; `test.py`, `data.py`),
the direction and form of the divergence (their `measure`, line 160: benign batch statistics first,
log of the standard deviations' ratio), the per-layer threshold (line 161: `measure.std()`, the sample
one, strict `>`), the eval mode (line 146), the unbiased per-channel variance of the BatchNorm's input
over images and positions (`BatchNorm2d_gau`, line 31), pruning the BatchNorm weight only (line 173), the
training augmentation of the benign images (`data.py` lines 99-100, 133) and u = 3 (`test.py` line 95)
are followed. Where this differs:

- Epsilon. BatchNorm's own eps is added to both variances here (it is what the BatchNorm divides by);
  the authors use the raw variances. On a channel that is constant on the benign images (variance 0, as
  a backdoor neuron silent on benign images can be) their score is infinite, the layer's mean becomes
  infinite and its std NaN, and that layer prunes nothing; here the score is finite and large. Elsewhere
  the difference is eps / variance: on the test suite's digits models (eps 1e-5, variances >= 0.13) the
  scores moved by at most 0.15% and the pruned neurons were the same at u = 2 and u = 3, at 10% and 15%
  poison. Our MobileNet's BatchNorms have eps = 1e-3, where channels of variance near 1e-3 would move.
- Data. They use one batch of 500 held-out images; here the whole clean budget, with exactly pooled
  moments (the batching is for memory only).
- Layers. They score every `nn.BatchNorm2d` (and would fail on one without affine scale); here every
  BatchNorm that keeps running statistics and has an affine scale (ours has no BatchNorm1d/3d).

BackdoorBench (`defense/bnp.py`, `bnp_defense`, commit f02e353) differs from the authors in ways not
followed here: it zeroes the shift too (line 99); it writes the log term with the variances' ratio, not
the standard deviations' (line 95), so log(running_var / sigma^2) counts twice; and its BatchNorm keeps
the statistics of its last forward pass (`mbns_batchnorm.py`, `collect_stats`), which is the batch of
the poisoned training set it runs after the clean batch (lines 82 and 88), so it scores a poisoned
training batch, not clean images, against the running statistics. Its `u` sweep passes `self.args.u`, not
the swept value (line 352). Its u is 3 (4 for Tiny-ImageNet, `config/defense/bnp/tiny.yaml`). The
16-defense study's copy (WhoDunnett/BackdoorBenchmark `defense/bnp.py`) drops the poisoned pass and runs
every clean batch, but still keeps the last batch's statistics only, and keeps the shift zeroing and the
variance ratio. Its LayerNorm variant (compare clean with poisoned batches) needs poisoned images a
defender does not have, so it is not offered.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.clp import outlier_channels
from bdbench.defenses.layers import capture, norm_layers
from bdbench.errors import NotApplicable
from bdbench.params import NonNegativeFloat
from bdbench.training import augment_batch

_BATCH = 256  # images per forward pass while the moments are gathered (memory only; the sums are exact)


def gaussian_kl(mean_p: torch.Tensor, var_p: torch.Tensor, mean_q: torch.Tensor, var_q: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)) of univariate Gaussians, element by element."""
    return 0.5 * (var_q / var_p).log() + (var_p + (mean_p - mean_q).pow(2)) / (2 * var_q) - 0.5


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of `model` that have running statistics and an affine scale."""
    norms = norm_layers(model)
    found = [m for m in norms if isinstance(m, _BatchNorm) and m.running_var is not None and m.weight is not None]
    if not found:
        kinds = ", ".join(sorted({type(m).__name__ for m in norms})) or "none"
        raise NotApplicable(f"{type(model).__name__} has no BatchNorm layer with running statistics and an affine "
                         f"scale (its norm layers: {kinds}); bnp cannot run on this model")
    return found


@torch.no_grad()
def benign_moments(model: nn.Module, layers: list[_BatchNorm], x: torch.Tensor, crop_padding: int, hflip: bool,
                   generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and unbiased variance of the input of each of `layers` over the uint8 images `x`
    (augmented as the victim's training was), `model` in eval mode."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    sums = [torch.zeros(layer.num_features, dtype=torch.float64, device=device) for layer in layers]
    squares = [torch.zeros_like(s) for s in sums]
    counts = [0] * len(layers)
    with ExitStack() as stack:
        seen = [stack.enter_context(capture(layer, "input")) for layer in layers]
        for start in range(0, len(x), _BATCH):
            model(augment_batch(x[start:start + _BATCH].to(device).float().div_(255.0), crop_padding, hflip, generator))
            for i, inputs in enumerate(seen):
                for a in inputs:
                    a = a.double().transpose(0, 1).reshape(a.shape[1], -1)  # (channels, images x positions)
                    sums[i] += a.sum(1)
                    squares[i] += a.pow(2).sum(1)
                    counts[i] += a.shape[1]
                inputs.clear()
    moments = []
    for total, square, count in zip(sums, squares, counts):
        mean = total / count
        moments.append((mean.float(), ((square - count * mean.pow(2)) / max(count - 1, 1)).clamp_min(0).float()))
    return moments


def preactivation_divergences(model: nn.Module, x: torch.Tensor, crop_padding: int, hflip: bool,
                              generator: torch.Generator) -> list[tuple[_BatchNorm, torch.Tensor]]:
    """Each BatchNorm layer of `model` with the KL divergence, per neuron, of the benign pre-activation
    distribution (estimated on `x`) from the one its running statistics record."""
    layers = batch_norms(model)
    divergences = []
    for layer, (mean, var) in zip(layers, benign_moments(model, layers, x, crop_padding, hflip, generator)):
        assert layer.running_mean is not None and layer.running_var is not None  # batch_norms keeps only these
        divergences.append((layer, gaussian_kl(mean, var + layer.eps, layer.running_mean.float(),
                                               layer.running_var.float() + layer.eps)))
    return divergences


@DEFENSES.register("bnp")
class PreActivationPruning(Defense):
    """BNP (Zheng et al. 2022): prune neurons whose benign pre-activations diverge from their BatchNorm statistics."""

    kind = DefenseKind.MODEL_REPAIR
    citation = "Zheng, Tang, Li, Liu. Pre-activation Distributions Expose Backdoor Neurons. NeurIPS 2022."

    def __init__(self, u: NonNegativeFloat = 3.0) -> None:
        self.u = u

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model = copy.deepcopy(context.model).to(context.device).eval()
        divergences = preactivation_divergences(model, context.clean_x, context.crop_padding, context.allow_hflip,
                                                context.generator("bnp_augment"))
        with torch.no_grad():
            for layer, divergence in divergences:
                layer.weight[outlier_channels(divergence, self.u).to(layer.weight.device)] = 0.0
        return DefenseOutcome(model=model)
