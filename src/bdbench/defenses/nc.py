"""Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng and Zhao, "Neural Cleanse: Identifying and
Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019).

1. Reverse engineering: for every label t, find the smallest trigger that sends clean images to t:
   a mask m (one channel, H x W) and a pattern p (C x H x W), both squashed into [0, 1] by
   tanh / 2 + 1/2, stamped as (1 - m) * x + m * p, minimising cross-entropy towards t plus
   cost_t * |m|_1 on the clean budget. All labels are optimised in one batched pass: the masks and
   patterns are (K, 1, H, W) and (K, C, H, W) tensors, every batch is stamped with every label's
   trigger, and the labels' losses are summed. Adam works element-wise and the model is in eval
   mode, so this is the same optimisation as K separate runs, at one forward pass per batch (in
   groups of labels whose gradients add up before the step, where a pass would exceed 2,048 images).
   The schedule of the authors' code (`_Schedule`), per label: Adam at lr 0.1, betas (0.5, 0.9); the
   cost starts at 0 and is set to `init_cost` (1e-3) after `patience` (5) epochs in a row whose attack
   success on the budget (the share of its images sent to the label) is at least 99%
   (`cost_from_zero`; False starts at 1e-3, as BackdoorBench's port does); then after 5 such epochs in
   a row the cost is multiplied by `cost_multiplier` (2), after 5 epochs in a row below it divided by
   2 ** 1.5; the kept trigger is the smallest-norm mask reaching 99%; a label stops early once its
   cost had moved both ways before the epoch and its best norm has not improved for
   `early_stop_patience` (25) epochs. A label that never reaches 99% keeps its last mask.
2. Detection: the L1 norms of the K masks; their median and MAD (scaled by the consistency
   constant 1.4826; for an even count of labels the median is the mean of the two middle norms);
   the anomaly index of a label is |norm - median| / MAD. Labels below the median with an index
   above `anomaly_threshold` (2) are flagged. `anomaly_index` is the largest index among
   below-median labels, `suspected_targets` the flagged labels, `detected` whether any.
3. Repair by unlearning: fine-tune on the clean budget in which a random `unlearning_fraction` (the
   paper's 20%) of the images carry a reversed trigger (of the flagged labels, in turn) under their
   TRUE labels, the rest clean (as the paper and BackdoorBench's port build the set: no clean twin of
   a stamped image), with the `ft` recipe (10 epochs, SGD lr 0.01, cosine, batch 32). If no label is
   flagged the model is returned unchanged (no model in the outcome: the runner measures the
   deployed model), as BackdoorBench's port returns the loaded model.

Checked against the authors' code, bolunwang/backdoor at e857774 (visualizer.py, gtsrb_visualize_example.py,
mad_outlier_detection.py; read, not run: Keras 2.2), and BackdoorBench's port, SCLBD/BackdoorBench at f02e353
(defense/nc.py, config/defense/nc/cifar10.yaml). As the authors': the tanh parametrisation of a one-channel
mask and a full pattern, both started uniform at random; the loss (mean cross-entropy + cost x mask L1); Adam
(0.1, betas 0.5 and 0.9); the schedule and early stop above (a test,
`test_the_cost_schedule_and_early_stop_follow_the_reference_on_random_runs`, holds `_Schedule` to a
transcription of their rule); batch 32; clean images without augmentation; the best mask kept by its
epoch-mean norm among epochs of at least 99% success; the outlier rule of mad_outlier_detection.py (median and
MAD over all labels, numpy's median of an even count, flags only below the median with an index above 2; their
printed anomaly index, |min - median| / MAD, is `anomaly_index`).
BackdoorBench's port differs from the authors where noted above and below; this file follows the authors.

Differences kept, each with its reason:
- An epoch is one pass over the clean budget; the authors' is a fixed NB_SAMPLE = 1,000 images (31 mini-batches
  of 32 drawn round their 12,630 GTSRB test images). The budget here is the defender's whole clean set and its
  size varies (150 images in the tests, 250 on `model-defenses`, 2,500 on `fidelity-cifar10`): one pass makes an
  epoch's 99% a rate over every budget image once, as BackdoorBench's epoch (one pass of its loader) is, and
  1,000-image epochs on a 250-image budget would cost 4 passes each. See below for what it does to the step counts.
- `epochs` is 40, not the authors' 1,000 (the cost schedule and early stop still apply within them), so that a
  10-class 28x28 cnn-small (width 16) is inverted in one to two minutes on one CPU core (BackdoorBench: 80).
- Masks and patterns are tanh / 2 + 1/2, the authors' tanh / (2 - 1e-7) + 1/2 (theirs overshoots [0, 1] by
  5e-8); `unsquash`'s factor 2 - 1e-6 only keeps atanh finite for the random start. Adam's epsilon is torch's
  1e-8 (Keras: 1e-7, on a gradient summed over the batch, 32 times ours): both far below the gradients.
- The norms are the float masks' L1; mad_outlier_detection.py re-reads the masks from 8-bit PNG files, so theirs
  are rounded to 1/255 a pixel, an artefact of their storage.
- Unlearning fine-tunes for the `ft` recipe's 10 epochs, not the paper's one epoch (over a 10% sample of the
  training set: some 3,500 to 3,900 GTSRB images, over 100 steps at a batch of 32): one pass of
  the budget here is 8 steps on `model-defenses` and 5 on the tests' 150 images, so the paper's epoch count
  would not carry its amount of fine-tuning; with the `ft` recipe the repair differs from the `ft` baseline
  only by the stamped fifth.
  BackdoorBench: 100 epochs at batch 256 (SGD lr 0.01, cosine), with its training augmentation as here.
- With several flagged labels their triggers take turns over the one stamped fifth (the share stays the paper's
  20%); BackdoorBench stamps the same fifth once more for every flagged label; the paper does not say.
Nothing here is tuned on test data: every setting is the authors', the paper's or fixed in advance.

The measurements below (times, traces, findings on `model-defenses`) were taken before this file followed the
authors' schedule (the cost from 0, the early stop on earlier epochs' flags), an epoch's success over its images
and the unlearning set with its fifth stamped in place; they have not been re-measured since.

Where the time goes (issue 26; torch.profiler on PreAct-ResNet18 width 0.25, mnist5k, one thread):
the inversion is all of it, and within it convolutions forward and backward are about two thirds,
eval-mode BatchNorm backward about a ninth. Its work is fixed by the procedure: every label's trigger on every
budget image each epoch, 40 x 250 x 10 = 100,000 forward and input-gradient passes on `model-defenses`'
clean budget, against the victim's 12 x 5,000 = 60,000 forward, input- and weight-gradient passes, so
in float32 Neural Cleanse costs about as much as training that small victim (1.27-1.49x in rows measured with one
thread); it is the per-label inversion of the paper (step 1) that demands it, and a victim trained for
longer on more data (the fidelity grids) shrinks the ratio. The passes run as the trainer trains the
victim (`training.loop_precision`: bfloat16 autocast on CUDA and where the grid sets
`cpu_bfloat16`, float32 otherwise; masks, patterns, losses and Adam stay float32), and as many images go
through the model at once as suits the device (`training.images_per_pass`: 128 on a CPU, 2,048 on a
GPU); label groups add up their gradients before the one step, so the pass size changes the cost,
never the optimisation (`test_label_groups_give_the_same_optimisation_as_one_batch`; on the clean
`model-defenses` victim of seed 0 the 40 epochs at 128 images a pass gave the bit-identical anomaly
index of the former 320 a pass, and the process peaked at 690 MB resident instead of 1,090 MB).
In Adam steps, with an epoch one pass of `model-defenses`' 250-image budget (8 mini-batches) against the
authors' 31: the 5-epoch cost patience is 40 steps here against their 155, the 25-epoch early stop 200 against
775, and of their up to 1,000 x 31 = 31,000 steps per label the 40 epochs here take 320 (3,160 on
`fidelity-cifar10`'s 2,500 images). The stop cannot shorten the 40 epochs on `model-defenses`: on the clean
victim of seed 0 (per-epoch trace, one thread) it stopped no label, 7 of the 10 best norms were still falling
between epochs 30 and 40 (label 1 from 148 to 130), and a cut at epoch 10 or 15 would have flagged label 8, a false positive that the full
40 epochs do not make. The inversion is not converged at 40 epochs, so no stop criterion saves time here.
What does save time is the layout: in float32 on the CPU the passes run channels-last
(`LoopPrecision.memory_format`), the same float32 sums in another order, on which oneDNN's convolutions skip
reordering every activation as they do in the default layout (those reorders, `aten::copy_`, were a tenth of
a 128-image pass in a torch.profiler trace); on the BadNets victim of `model-defenses` (seed 0, one thread, on a
core shared with about 15 other processes) Neural Cleanse took 259.0 CPU s in the default layout and 213.1
channels-last (0.82x, with the unlearning's fine-tuning, in the trainer's default layout, in both), with the
same finding: label 0 flagged alone, CA 0.979 and ASR 0.009 after the repair
(`test_float32_loops_in_channels_last_find_what_the_default_layout_finds` holds the norms to rounding).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.ft import fine_tune
from bdbench.defenses.scoring import anomaly_index, median
from bdbench.params import OpenRate, PositiveFloat, PositiveInt
from bdbench.progress import steps
from bdbench.training import LoopPrecision, loop_precision, to_layout
from bdbench.training import images_per_pass as default_images_per_pass


@dataclass
class ReversedTriggers:
    """One reversed trigger per label: masks (K, 1, H, W) and patterns (K, C, H, W) in [0, 1], and
    the L1 norm of each mask. Where Neural Cleanse's inversion made them, `costs` and `successes`
    (epochs run x K, float64) log each epoch's cost weight and the attack success that the schedule
    read at its end (NaN once a label has stopped), as the reference code's `logs` do."""

    masks: torch.Tensor
    patterns: torch.Tensor
    norms: torch.Tensor
    costs: torch.Tensor | None = None
    successes: torch.Tensor | None = None

    def stamp(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """uint8 images `x` carrying the trigger of `labels` (one label per image)."""
        mask, pattern = self.masks[labels].to(x.device), self.patterns[labels].to(x.device)
        stamped = (1 - mask) * x.float().div(255.0) + mask * pattern
        return stamped.mul(255.0).round().clamp(0, 255).to(torch.uint8)


def squash(raw: torch.Tensor) -> torch.Tensor:
    """Unconstrained parameters to (0, 1) masks and patterns: tanh / 2 + 1/2 (Neural Cleanse's, and ABS's)."""
    return torch.tanh(raw) / 2 + 0.5


def unsquash(value: torch.Tensor) -> torch.Tensor:
    """The parameters that `squash` maps to `value` in [0, 1]."""
    return torch.atanh((value - 0.5) * (2 - 1e-6))


@dataclass
class _Schedule:
    """The per-label cost schedule and early stop of the reference code (bolunwang/backdoor, visualizer.py,
    at gtsrb_visualize_example.py's settings), as (K,) tensors, updated once at the end of each epoch:

    - the cost starts at 0 (its RESET_COST_TO_ZERO, "true for full optimization") and is set to `init_cost`
      at the end of the `patience`-th successful epoch in a row, which also clears the raise and lower counters
      and flags (the raise counter then counts that epoch);
    - `patience` successful epochs in a row multiply the cost by `multiplier`, as many failed ones divide it by
      `multiplier` ** 1.5;
    - a label stops once its cost had been raised and lowered before the epoch (the reference checks the stop
      before it moves the cost) and its best norm has not fallen below the lowest so far (EARLY_STOP_THRESHOLD
      1.0) for `early_stop_patience` epochs."""

    init_cost: float
    cost: torch.Tensor
    settled: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    raised: torch.Tensor
    lowered: torch.Tensor
    moved_both_ways: torch.Tensor
    stale: torch.Tensor
    best_seen: torch.Tensor

    @classmethod
    def start(cls, labels: int, init_cost: float, from_zero: bool = True) -> _Schedule:
        def zeros() -> torch.Tensor:
            return torch.zeros(labels, dtype=torch.long)

        def no() -> torch.Tensor:
            return torch.zeros(labels, dtype=torch.bool)

        cost = torch.full((labels,), 0.0 if from_zero else init_cost, dtype=torch.float64)
        return cls(init_cost, cost, zeros(), zeros(), zeros(), no(), no(), no(), zeros(),
                   torch.full((labels,), math.inf, dtype=torch.float64))

    def update(self, succeeded: torch.Tensor, best_norm: torch.Tensor, patience: int, multiplier: float) -> None:
        found = torch.isfinite(best_norm)
        self.stale = torch.where(found & (best_norm >= self.best_seen), self.stale + 1,
                                 torch.where(found, torch.zeros_like(self.stale), self.stale))
        self.best_seen = torch.minimum(self.best_seen, best_norm)
        self.moved_both_ways = self.raised & self.lowered  # what the early stop reads: the epochs before this one
        at_zero = self.cost == 0
        self.settled = torch.where(at_zero & succeeded, self.settled + 1, torch.zeros_like(self.settled))
        set_cost = self.settled >= patience
        self.cost = torch.where(set_cost, self.init_cost, self.cost)
        self.up[set_cost], self.down[set_cost], self.raised[set_cost], self.lowered[set_cost] = 0, 0, False, False
        self.up = torch.where(succeeded, self.up + 1, torch.zeros_like(self.up))
        self.down = torch.where(succeeded, torch.zeros_like(self.down), self.down + 1)
        raise_cost, lower_cost = self.up >= patience, self.down >= patience
        self.cost = torch.where(raise_cost, self.cost * multiplier, self.cost)
        self.cost = torch.where(lower_cost, self.cost / multiplier ** 1.5, self.cost)
        self.up[raise_cost], self.down[lower_cost] = 0, 0
        self.raised |= raise_cost
        self.lowered |= lower_cost

    def finished(self, early_stop_patience: int) -> torch.Tensor:
        """The labels that stop at the end of the epoch just updated (the reference leaves their cost as it
        was; here it moves, but a stopped label is not optimised again)."""
        return self.moved_both_ways & (self.stale >= early_stop_patience)


def _accumulate_label_gradients(model: nn.Module, xb: torch.Tensor, mask_raw: torch.Tensor, pattern_raw: torch.Tensor,
                                labels: torch.Tensor, cost: torch.Tensor,
                                precision: LoopPrecision | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stamp the float batch `xb` with the trigger of each of `labels`, add the gradient of their summed
    losses (cross-entropy towards the label + cost x mask L1) to `mask_raw.grad` and `pattern_raw.grad`,
    and return how many of the batch's images each label's trigger sends to it, and its mask's L1 norm."""
    mask, pattern = squash(mask_raw[labels]), squash(pattern_raw[labels])
    stamped = (1 - mask[:, None]) * xb[None] + (mask * pattern)[:, None]  # (labels, batch, C, H, W)
    if precision is None:
        logits = model(stamped.flatten(0, 1))
    else:
        with precision.autocast():
            logits = model(stamped.flatten(0, 1).contiguous(memory_format=precision.memory_format))
    logits = logits.float().view(len(labels), len(xb), -1)
    target = labels[:, None].expand(-1, len(xb))
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    norm = mask.flatten(1).sum(1)
    loss = (cross_entropy.view(len(labels), -1).mean(1) + cost * norm).sum()
    grad_mask, grad_pattern = torch.autograd.grad(loss, [mask_raw, pattern_raw])
    assert mask_raw.grad is not None and pattern_raw.grad is not None, "the caller zeroes the gradients first"
    mask_raw.grad += grad_mask
    pattern_raw.grad += grad_pattern
    return (logits.argmax(2) == target).double().sum(1).detach().cpu(), norm.detach().double().cpu()


def reverse_engineer_triggers(model: nn.Module, x: torch.Tensor, num_classes: int, generator: torch.Generator,
                              *, epochs: int, batch_size: int = 32, lr: float = 0.1, init_cost: float = 1e-3,
                              success_threshold: float = 0.99, patience: int = 5, cost_multiplier: float = 2.0,
                              early_stop_patience: int = 25, cost_from_zero: bool = True,
                              images_per_pass: int | None = None,
                              precision: LoopPrecision | None = None) -> ReversedTriggers:
    """Neural Cleanse's trigger reverse engineering for every label at once, on uint8 clean images `x`.

    Each optimiser step sees one batch stamped with every active label's trigger; where that is more
    than `images_per_pass` images (default: `training.images_per_pass` of the model's device, 128 on
    a CPU, 2,048 on a GPU), the labels go through the model in groups and their gradients add up
    before the step (the same step, in bounded memory). `precision` runs the model's passes as the
    trainer would (`training.loop_precision`: bfloat16 autocast and channels-last where the victim
    trained so); masks, patterns, losses and Adam stay float32.
    """
    device = next(model.parameters()).device
    images_per_pass = images_per_pass or default_images_per_pass(device)
    model.eval()
    if precision is not None:
        to_layout(model, precision.memory_format)
    _, channels, height, width = x.shape
    mask_raw = unsquash(torch.rand(num_classes, 1, height, width, generator=generator)).to(device).requires_grad_()
    pattern_raw = unsquash(torch.rand(num_classes, channels, height, width, generator=generator)).to(device)
    pattern_raw.requires_grad_()
    optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=lr, betas=(0.5, 0.9))
    schedule = _Schedule.start(num_classes, init_cost, cost_from_zero)
    best_norm = torch.full((num_classes,), math.inf, dtype=torch.float64)
    best_mask, best_pattern = squash(mask_raw).detach().clone(), squash(pattern_raw).detach().clone()
    active = torch.ones(num_classes, dtype=torch.bool)
    costs: list[torch.Tensor] = []
    successes: list[torch.Tensor] = []
    x_dev = x.to(device)
    for _ in steps("nc trigger epoch", epochs):
        costs.append(schedule.cost.clone())
        labels = torch.nonzero(active).flatten()
        labels_dev = labels.to(device)
        cost = schedule.cost[labels].to(device, torch.float32)
        hits = torch.zeros(len(labels), dtype=torch.float64)
        norm_sum = torch.zeros(len(labels), dtype=torch.float64)
        order = torch.randperm(len(x), generator=generator)
        batches = range(0, len(x), batch_size)
        for start in batches:
            xb = x_dev[order[start:start + batch_size].to(device)].float().div(255.0)
            mask_raw.grad, pattern_raw.grad = torch.zeros_like(mask_raw), torch.zeros_like(pattern_raw)
            group = max(1, images_per_pass // len(xb))
            for first in range(0, len(labels), group):
                chunk = slice(first, first + group)
                correct, norm = _accumulate_label_gradients(model, xb, mask_raw, pattern_raw, labels_dev[chunk],
                                                            cost[chunk], precision)
                hits[chunk] += correct
                norm_sum[chunk] += norm
            optimizer.step()
        # The attack success of the epoch is over its images (the reference's loss_acc_list holds one entry per
        # image), the norm the mean of its steps' (loss_reg_list: one per step).
        success, norm_mean = hits / len(x), norm_sum / len(batches)
        # The paper keeps, per label, the smallest mask (by its epoch-mean norm) whose epoch reached the threshold.
        succeeded = success >= success_threshold
        better = succeeded & (norm_mean < best_norm[labels])
        with torch.no_grad():
            improved = labels[better]
            best_norm[improved] = norm_mean[better]
            best_mask[improved.to(device)] = squash(mask_raw[improved.to(device)])
            best_pattern[improved.to(device)] = squash(pattern_raw[improved.to(device)])
        full_success = torch.zeros(num_classes, dtype=torch.bool)
        full_success[labels] = succeeded
        successes.append(torch.full((num_classes,), math.nan, dtype=torch.float64).index_put_((labels,), success))
        schedule.update(full_success, best_norm, patience, cost_multiplier)
        # Stopped labels drop out of the batch: their trigger is final.
        active &= ~schedule.finished(early_stop_patience)
        if not active.any():
            break
    never = ~torch.isfinite(best_norm)
    with torch.no_grad():
        best_mask[never.to(device)] = squash(mask_raw[never.to(device)])
        best_pattern[never.to(device)] = squash(pattern_raw[never.to(device)])
    norms = best_mask.flatten(1).sum(1).double().cpu()
    to_layout(model, torch.contiguous_format)
    return ReversedTriggers(best_mask.cpu(), best_pattern.cpu(), norms, torch.stack(costs), torch.stack(successes))


def anomaly_indices(norms: torch.Tensor) -> torch.Tensor:
    """|norm - median| / (1.4826 x MAD) per label (the paper's anomaly index)."""
    return anomaly_index(norms).abs()


@DEFENSES.register("nc")
class NeuralCleanse(Defense):
    """Neural Cleanse (Wang et al. 2019): reverse-engineer a minimal trigger per label, flag small outliers, unlearn them."""

    kind = DefenseKind.MODEL_DETECTION
    citation = ("Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao. Neural Cleanse: Identifying and Mitigating Backdoor "
                "Attacks in Neural Networks. IEEE S&P 2019.")

    def __init__(self, epochs: PositiveInt = 40, batch_size: PositiveInt = 32, lr: PositiveFloat = 0.1,
                 init_cost: PositiveFloat = 1e-3, success_threshold: OpenRate = 0.99, patience: PositiveInt = 5,
                 cost_multiplier: Annotated[float, Field(gt=1)] = 2.0, early_stop_patience: PositiveInt = 25,
                 cost_from_zero: bool = True, anomaly_threshold: float = 2.0, unlearning_fraction: OpenRate = 0.2,
                 unlearning_epochs: PositiveInt = 10, unlearning_lr: PositiveFloat = 0.01,
                 unlearning_batch_size: int = 32) -> None:
        self.success_threshold = float(success_threshold)
        self.unlearning_fraction = float(unlearning_fraction)
        self.epochs, self.batch_size, self.lr, self.init_cost = epochs, batch_size, lr, init_cost
        self.patience, self.cost_multiplier, self.early_stop_patience = patience, cost_multiplier, early_stop_patience
        self.cost_from_zero, self.anomaly_threshold = cost_from_zero, anomaly_threshold
        self.unlearning_epochs, self.unlearning_lr = unlearning_epochs, unlearning_lr
        self.unlearning_batch_size = unlearning_batch_size

    def run(self, context: DefenseContext) -> DefenseOutcome:
        outcome, triggers = self._inspect(context)
        if outcome.suspected_targets:
            outcome.model = self.unlearn(context, triggers, torch.tensor(outcome.suspected_targets))
        return outcome

    def detect(self, context: DefenseContext) -> DefenseOutcome:
        """Reverse-engineer and flag, without the unlearning repair."""
        return self._inspect(context)[0]

    def _inspect(self, context: DefenseContext) -> tuple[DefenseOutcome, ReversedTriggers]:
        triggers = reverse_engineer_triggers(
            context.model, context.clean_x, context.num_classes, context.generator("nc_reverse"),
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, init_cost=self.init_cost,
            success_threshold=self.success_threshold, patience=self.patience, cost_multiplier=self.cost_multiplier,
            early_stop_patience=self.early_stop_patience, cost_from_zero=self.cost_from_zero,
            precision=loop_precision(context.train_config, context.device))
        index = anomaly_indices(triggers.norms)
        below = triggers.norms < median(triggers.norms)
        flagged = torch.nonzero(below & (index > self.anomaly_threshold)).flatten()
        # Each label's reversed trigger as it is stamped: the pattern where the mask is, black elsewhere.
        pictures = {f"label {label}": (triggers.masks[label] * triggers.patterns[label]).clamp(0, 1)
                    for label in range(context.num_classes)}
        outcome = DefenseOutcome(detected=bool(len(flagged)),
                                 anomaly_index=float(index[below].max()) if below.any() else 0.0,
                                 suspected_targets=tuple(int(t) for t in flagged), threshold=self.anomaly_threshold,
                                 class_statistics=triggers.norms.clone(), pictures=pictures)
        return outcome, triggers

    def unlearn(self, context: DefenseContext, triggers: ReversedTriggers, flagged: torch.Tensor) -> nn.Module:
        """Fine-tune a copy of the model on the budget with `unlearning_fraction` of its images (at random)
        carrying a reversed trigger, of the flagged labels in turn, under their true labels."""
        x, y = context.clean_x, context.clean_y
        generator = context.generator("nc_unlearn")
        count = max(1, round(len(x) * self.unlearning_fraction))
        chosen = torch.randperm(len(x), generator=generator)[:count]
        labels = flagged[torch.arange(len(chosen)) % len(flagged)]
        unlearning_x = x.clone()
        unlearning_x[chosen] = triggers.stamp(x[chosen], labels)
        model = copy.deepcopy(context.model)
        return fine_tune(context, model, unlearning_x, y, epochs=self.unlearning_epochs, lr=self.unlearning_lr,
                         batch_size=self.unlearning_batch_size, purpose="nc_unlearn")
