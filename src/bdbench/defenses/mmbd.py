"""MM-BD (Wang, Xiang, Miller and Kesidis, "MM-BD: Post-Training Detection of Backdoor Attacks with
Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic", IEEE S&P 2024).

A backdoor makes its target class reachable with an abnormally large classification margin, whatever
the trigger's form. For every class k, maximise the margin logit_k(x) - max_{j != k} logit_j(x)
over images x in [0, 1], starting from `restarts` (the paper's code: 30) uniform random images,
by plain gradient ascent at lr 0.01 (each step moves the images by lr times the margin's gradient: the
reference univ_bd.py builds a new `SGD(momentum=0.2)` at every step, whose momentum buffer starts at that
step's gradient, so no momentum carries over) for at most `steps` (300) steps, a class
stopping once its summed margin changes by less than a relative 1e-5 in a step (the paper's code).
Every class and restart is one batch, so all classes are optimised in the same forward passes
(in groups of classes where a pass would exceed 2,048 images). As in univ_bd.py, the images themselves
are not constrained: the model sees them clamped to [0, 1], so a pixel that a step carries past a bound
is seen at the bound and, its gradient through the clamp being zero, stays there (projecting each step
back onto [0, 1] instead would let it return). A class's statistic is the largest margin among its
restarts in its last forward pass (at step 300, or the step at which it stopped), as univ_bd.py reads it,
not the largest reached on the way; the stopping rule starts, as there, from a previous summed margin
of -1000 (the reference's loss of 1000). The model is in eval mode throughout, as there.

Detection: fit a gamma distribution (shape, location and scale all free, `scipy.stats.gamma.fit` with no
`floc`, the reference's call) to the statistics of all classes but the largest (the suspect's own statistic
is left out of the null), and take as p-value the chance that the largest of K draws from it is at least
the largest statistic, p = 1 - F(max) ** K (the reference's exponent, len(null) + 1). `detected` when
p < `significance` (0.05); `suspected_targets` the class of the largest statistic when detected, none
otherwise; `anomaly_index` is -log10(p) (so the detection threshold is -log10 0.05 = 1.30, stored as
`threshold`). Data-free: the clean budget is not used, and there is nothing to tune. Detection only: the
model is not repaired. With shape, location and scale free, the fit to K - 1 = 9 statistics is fragile:
when the fitted shape falls below 1 the likelihood grows without bound as the location nears the smallest
statistic, and the optimiser stops there, so p can move by orders of magnitude when the statistics move
in their second digit (on the test suite's BadNets digits model, 1.8e-6 against 5.6e-4 for statistics
0.16 apart at most). That is the reference's test, kept as it is; it bears on the benign flag rate.

Checked against the authors' code, `wanghangpsu/MM-BD` at 903338d (univ_bd.py, the detector that
run_detect.sh runs), line by line: margin, restarts (30), steps (300), lr (0.01), step rule, clamping,
random start, stopping rule, statistic, null, gamma fit, p-value, threshold and reported class.
BackdoorBench (`SCLBD/BackdoorBench` at f02e353) has no MM-BD port to compare. The paper's body was not
reachable when this was checked (its abstract only), so where the paper's text and the code could differ
(the statistic read at the last step rather than the best on the way), the code decides.

Kept differences from univ_bd.py, each with its reason:
- All classes share each forward pass, in groups, where the reference runs one class after another: in
  eval mode each image's margin and gradient depend on that image alone, so the ascent is the same and
  each class still stops on its own (`test_label_groups_give_the_same_optimisation_as_one_batch`); cost.
- The passes run in the trainer's precision and layout (below), bdbench's rule for every defense loop.
- The random starts come from the experiment's seeded generator (the reference's `torch.rand` is
  unseeded): reproducibility.
- The largest other logit is taken with the class's own logit masked by -inf; the reference subtracts
  1000 from it instead, which differs only when every other logit is below -1000.
- p is computed from the gamma's log survival function: the same number where 1 - F ** K is
  representable, and a finite one (so a finite `anomaly_index`) where the reference's rounds to 0 (below
  about 1e-16); the verdict is the same.
- The reference flags p <= 0.05, here p < 0.05, so that flagged means `anomaly_index` above `threshold`,
  as `det_threshold` is defined for every detector; the two differ only at p exactly 0.05.
- When the other statistics are all equal, scipy's fit fails (FitError) and the reference would stop;
  here p is 1 if the largest is not above them, else 0.
- The reference fixes 10 classes; here K is the data set's, at least 3 (the null needs two values).
- The scipy here (1.17) is newer than the reference's era (its README: Python 3.7); the free-location fit
  goes through scipy's generic optimiser in both, and whether the two versions give the same parameters
  was not checked.

Cost (issue 26): the ascent is all of it, K x `restarts` images forward and input-gradient per step,
10 x 30 x 300 = 90,000 passes when no class converges early, against the 60,000 forward and backward
passes that train a `model-defenses` victim (12 epochs of 5,000 images): in float32 it costs about as
much as that small victim (1.21-1.48x in rows measured with one thread), which the paper's 30 restarts
and 300 steps per class demand. The passes run as the trainer trains the victim (`training.loop_precision`:
bfloat16 autocast on CUDA and where the grid sets `cpu_bfloat16`; images, margins and
steps stay float32), with as many images a pass as suits the device (`training.images_per_pass`); class
groups add up their gradients before the one step, so that changes the cost, not the ascent.
The measurements in the rest of this paragraph were taken before the ascent followed univ_bd.py (then: one
SGD with momentum 0.2 carried across steps, each step projected onto [0, 1], the statistic the best margin
reached at any step), and are not re-measured; the cost of a pass is unchanged, how often the stopping rule
fires may not be. Stopping a class once its statistic stops growing saved nothing then: on the
`model-defenses` victims of seed 0 (clean and BadNets; per-step traces, one thread) the paper code's 1e-5
stop never fired and every class's largest margin was still growing at step 300 (between steps 200 and 300
the clean victim's class 8 went from 24.25 to 25.81, the BadNets target from 36.01 to 39.21), so a stop
after 10-50 steps without a relative gain of 1e-3 would stop no class, and one at 1e-2 over 10 steps saved
13% of the steps but moved statistics by up to 10% and turned the clean victim's detection (-log10 p 1.53)
into a miss (1.04). The reference code runs the same 30 x 300 per class, one class at a time,
with nothing shared between classes that could be reused. What does save time is the layout: in float32
on the CPU the passes run channels-last (`LoopPrecision.memory_format`; see `nc`), where a forward and
input-gradient pass of PreAct-ResNet18 (width 0.25, 28x28, one thread) costs
0.86x the CPU time of the default layout at 120 images (a group of 4 classes x 30 restarts) and 0.64x at 320;
and on the BadNets victim of `model-defenses` (seed 0, one thread, a shared core) MM-BD took 249.0 CPU s in
the default layout and 216.5 channels-last (0.87x) with the same finding (class 0 detected);
`test_float32_loops_in_channels_last_find_what_the_default_layout_finds` holds the margins to rounding.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import stats
from torch import nn

from bdbench import progress
from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.errors import ConfigError
from bdbench.params import OpenRate, PositiveFloat, PositiveInt
from bdbench.training import LoopPrecision, loop_precision, to_layout
from bdbench.training import images_per_pass as default_images_per_pass


def _margins(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             precision: LoopPrecision | None = None) -> torch.Tensor:
    """logit_k - max_{j != k} logit_j of images (labels, restarts, C, H, W), each row for its class k."""
    if precision is None:
        logits = model(images.flatten(0, 1))
    else:
        with precision.autocast():
            logits = model(images.flatten(0, 1).contiguous(memory_format=precision.memory_format))
    logits = logits.float().view(len(labels), images.shape[1], num_classes)
    own = torch.nn.functional.one_hot(labels, num_classes).bool()[:, None, :]
    return logits.masked_fill(~own, -math.inf).amax(2) - logits.masked_fill(own, -math.inf).amax(2)


def max_margins(model: nn.Module, num_classes: int, shape: tuple[int, int, int], generator: torch.Generator, *,
                restarts: int = 30, steps: int = 300, lr: float = 0.01, tolerance: float = 1e-5,
                images_per_pass: int | None = None, precision: LoopPrecision | None = None) -> torch.Tensor:
    """Per class k (K,), the largest margin logit_k - max_{j != k} logit_j among the restarts at the last
    step of gradient ascent on images that the model sees clamped to [0, 1] (the last step: `steps`, or the
    one at which the class's summed margin moved by less than a relative `tolerance`); each step moves the
    images by `lr` times the margin's gradient. All classes and restarts share each step; where that is more
    than `images_per_pass` images (default: `training.images_per_pass` of the model's device, 128 on a CPU,
    2,048 on a GPU), classes go through the model in groups (the same step, in bounded memory). `precision`
    runs the model's passes as the trainer would (`training.loop_precision`); the images, margins and steps
    stay float32."""
    device = next(model.parameters()).device
    images_per_pass = images_per_pass or default_images_per_pass(device)
    model.eval()
    if precision is not None:
        to_layout(model, precision.memory_format)
    images = torch.rand(num_classes, restarts, *shape, generator=generator).to(device).requires_grad_()
    statistic = torch.full((num_classes,), -math.inf, dtype=torch.float64)
    # univ_bd.py's previous loss (minus the summed margin) starts at 1000.
    last_total = torch.full((num_classes,), -1000.0, dtype=torch.float64)
    active = torch.ones(num_classes, dtype=torch.bool)
    group = max(1, images_per_pass // restarts)
    for _ in progress.steps("mmbd step", steps):
        labels = torch.nonzero(active).flatten()
        images.grad = torch.zeros_like(images)
        reached, total = torch.empty(len(labels), dtype=torch.float64), torch.empty(len(labels), dtype=torch.float64)
        for first in range(0, len(labels), group):
            chunk = labels[first:first + group].to(device)
            # The model sees the images clamped to [0, 1] (univ_bd.py); a pixel past a bound gets no gradient.
            margin = _margins(model, images[chunk].clamp(0, 1), chunk, num_classes, precision)
            images.grad += torch.autograd.grad(-margin.sum(), [images])[0]
            reached[first:first + group] = margin.detach().amax(1).double().cpu()
            total[first:first + group] = margin.detach().sum(1).double().cpu()
        with torch.no_grad():
            images -= lr * images.grad
        statistic[labels] = reached  # the margins of a class's last forward pass (univ_bd.py)
        # A class stops once its summed margin barely moves (the paper code's relative 1e-5).
        converged = (last_total[labels] - total).abs() < tolerance * last_total[labels].abs()
        last_total[labels] = total
        active[labels[converged]] = False
        if not active.any():
            break
    to_layout(model, torch.contiguous_format)
    return statistic


def max_statistic_p_value(statistics: np.ndarray) -> float:
    """p-value of the largest statistic under a gamma null fitted to the others (order statistic of K draws)."""
    largest = float(statistics.max())
    null = np.delete(statistics, statistics.argmax())
    if np.ptp(null) == 0:  # a degenerate null: anything above it is infinitely unlikely
        return 1.0 if largest <= null[0] else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        shape, loc, scale = stats.gamma.fit(null)
    # 1 - F^K, computed from the survival function so that a far outlier does not round to 0.
    log_sf = float(stats.gamma.logsf(largest, shape, loc=loc, scale=scale))
    return float(-np.expm1(len(statistics) * np.log1p(-np.exp(log_sf)))) if log_sf > -30 else \
        float(np.exp(np.log(len(statistics)) + log_sf))


@DEFENSES.register("mmbd")
class MaxMarginDetection(Defense):
    """MM-BD (Wang et al. 2024): flag a class whose reachable classification margin is an outlier."""

    kind = DefenseKind.MODEL_DETECTION
    citation = ("Wang, Xiang, Miller, Kesidis. MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary "
                "Backdoor Pattern Types Using a Maximum Margin Statistic. IEEE S&P 2024.")

    def __init__(self, restarts: PositiveInt = 30, steps: PositiveInt = 300, lr: PositiveFloat = 0.01,
                 significance: OpenRate = 0.05) -> None:
        self.restarts, self.steps, self.lr = restarts, steps, lr
        self.significance = float(significance)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        if context.num_classes < 3:
            raise ConfigError(f"mmbd fits a null distribution to the other classes' statistics and needs at least "
                              f"3 classes, not {context.num_classes}")
        shape = (context.in_channels, context.image_size, context.image_size)
        statistics = max_margins(context.model, context.num_classes, shape, context.generator("mmbd"),
                                 restarts=self.restarts, steps=self.steps, lr=self.lr,
                                 precision=loop_precision(context.train_config, context.device)).numpy()
        p_value = max_statistic_p_value(statistics)
        detected = p_value < self.significance
        return DefenseOutcome(detected=detected, anomaly_index=-math.log10(max(p_value, 1e-300)),
                              suspected_targets=(int(statistics.argmax()),) if detected else (),
                              threshold=-math.log10(self.significance),
                              class_statistics=torch.from_numpy(statistics.copy()))
