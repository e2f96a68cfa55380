"""Shared Adversarial Unlearning (Wei, Zhang, Zha and Wu, "Shared Adversarial Unlearning:
Backdoor Mitigation by Unlearning Shared Adversarial Examples", NeurIPS 2023).

A poisoned image is, to the backdoored model h0, an adversarial example whose label is the target. SAU
bounds the backdoor risk of the repaired model h by its risk on shared adversarial examples: inputs
x + eps that both h0 and h send to the same wrong class. It repairs a copy h of the deployed model
h0 (which stays frozen) by alternating, on every batch of the clean budget:

1. Shared adversarial examples (the inner maximisation): PGD under L-inf (`linf_pgd`, radius 0.2,
   step 0.2, 5 steps, from the corner x + 0.2) maximises beta1 x L_adv - beta2 x L_share, where L_adv is
   the cross-entropy to the true label of h and of h0, each summed over the images that model still
   predicts as it does on x, over 2N; and L_share is the Jensen-Shannon divergence between h's and h0's
   predicted distributions on x + eps, summed over the images that are not yet shared adversarial
   examples (fooling both models, into one class), over N. So the attack looks for perturbations that
   fool both models, and pulls their predictions together where they do not yet agree. Every image of the
   batch is perturbed.
2. Unlearning (the outer minimisation): one Adam step on lambda1 CE(h(x), y) + lambda2 CE(h(x + eps), y)
   + lambda3 L_sar, where L_sar = (1/N) sum -log(1 - p_h(x + eps)[c0]) over the images that h0
   misclassifies at x + eps into a class c0 other than both y and h0's prediction on x: h is taught not
   to follow h0 into c0. As in the authors' code the term is bounded (`bounded_unlearning_term`): an image
   where p < 0.001 adds no gradient, and 1e-6 inside the logarithm caps the term at 13.8.

Defaults are the authors' (their BackdoorBench implementation, `defense/sau.py`, and its configurations
`config/defense/sau/{cifar10,gtsrb,cifar100}.yaml`, which agree; the paper: PGD of 5 steps with bound 0.2,
three weights of 1 and one of 0.01, 100 epochs on CIFAR-10 and GTSRB, 5% of the training set as clean data): 100
epochs over the clean budget in batches of 256, Adam with AMSGrad (BackdoorBench's `argparser_opt_scheduler`
builds every Adam so) at lr 1e-4, betas (0.9, 0.999), without weight decay (a cosine schedule is configured
there but never stepped, so the rate is constant), beta1 = 0.01 (`beta_adversarial`), beta2 = 1
(`beta_share`), L-inf radius 0.2 on images in [0, 1] (they perturb the de-normalised image) with step 0.2 and
5 steps, lambda1 = 1 (`clean_weight`), lambda3 = 1 (`unlearn_weight`) and lambda2 = 0 (`adversarial_weight`:
the plain adversarial-training term, which the authors leave off by default). Their Tiny-ImageNet
configuration runs 20 epochs (`epochs=20` there); nothing else differs between data sets.
As in their code, both models stay in eval mode (BatchNorm keeps its running statistics, which they note keeps
clean accuracy higher), images are not augmented, and the last ragged batch is kept. PGD starts every pixel at
+0.2 (their `init_type='max'`), so its first gradient is taken at x + 0.2 and, with step = radius, its first
step leaves each pixel at +0.2 or 0; and the perturbed images are not clipped to [0, 1] (the clamp is
commented out in their `Shared_PGD.attack`; the models normalise inside, so values a little outside [0, 1]
are fed as they are). Also as in their code, PGD stops early (`early_stop`, on by default): after a step that
began with every image of the batch a shared adversarial example (their `Shared_PGD.attack`, whose test reads
the predictions made before that step's update). That changes no result: with every image shared, no image is
left for either term of the objective, its gradient is zero and the remaining steps could not move the images;
it saves their passes. The 16-defense study (Dunnett et al., WhoDunnett/BackdoorBenchmark) runs the same
`defense/sau.py` and configurations, changing only how the clean data are drawn.
Deviations: the Jensen-Shannon divergence is computed from log-softmaxes; the authors clamp each probability
at 1e-8 before its logarithm, which only drops the gradient through classes of probability under 1e-8 (a
contribution of that order). The training loop is SAU's own rather than the shared trainer, which offers only
SGD and trains BatchNorm in training mode. The passes run as the trainer trains the victim
(`training.loop_precision`: channels-last, bfloat16 autocast where the victim trained so; in float32 on the CPU
the same sums in another order; see `nc`), where the authors' SAU runs in float32 (their `amp` option is read
but not used by it), and the repaired model is handed back in the default layout. Nothing is tuned on data and
nothing is scaled down for the CPU, though SAU is the costliest repair here: each step runs about 25 forward and
backward passes of its batch through the two models (PGD on both, then the update), so 100 epochs of a
200-image budget on a PreAct-ResNet18 (width 0.25) take about 10 minutes on one CPU core: on the
`model-defenses` BadNets victim (seed 0, one thread, AVX2 AMD EPYC) 947.3 CPU s before the early stop and the
channels-last passes and 589.4 after (the victim trained in 247.8: 3.82x, then 2.38x), CA 0.955 / ASR 0.144
before, 0.958 / 0.184 after (the layout's rounding, carried through 100 epochs of signed-gradient steps;
`benchmarks/defense_cost.py`). Those figures were measured before PGD started at the corner, unclipped, with
AMSGrad and the bounded unlearning term; the cost per step is unchanged, the accuracies are not re-measured.
The paper's procedure demands this cost: 100 epochs of a PGD inner loop on two models. A budget smaller than a
batch gets one Adam step per epoch (100 in all, where the paper's 2500 CIFAR-10 images get 1000).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.defenses.adversarial import linf_pgd, log_one_minus_softmax
from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.params import NonNegativeFloat, PositiveFloat, PositiveInt
from bdbench.training import loop_precision, to_layout


def jensen_shannon(logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence between the softmax distributions of two (N, K) logit tensors."""
    log_p, log_q = F.log_softmax(logits, 1), F.log_softmax(other, 1)
    log_mix = torch.logsumexp(torch.stack([log_p, log_q]), 0) - torch.log(torch.tensor(2.0))
    return 0.5 * ((log_p.exp() * (log_p - log_mix)).sum(1) + (log_q.exp() * (log_q - log_mix)).sum(1))


class SharedAdversarialObjective:
    """The function of perturbed images that SAU's PGD maximises (for `x`, labels `y`): adversarial_weight x
    the cross-entropy of both models on the images each still predicts as on `x`, minus share_weight x the
    Jensen-Shannon divergence between them on the images that are not yet shared adversarial examples.
    `all_shared()` says whether every image was a shared adversarial example at the last evaluation."""

    def __init__(self, model: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 adversarial_weight: float, share_weight: float) -> None:
        self.model, self.reference, self.y, self.n = model, reference, y, len(x)
        self.weights = (adversarial_weight, share_weight)
        with torch.no_grad():
            self.clean_pred, self.clean_pred_ref = model(x).argmax(1), reference(x).argmax(1)
        self._all_shared = False

    def all_shared(self) -> bool:
        return self._all_shared

    def __call__(self, perturbed: torch.Tensor) -> torch.Tensor:
        logits, logits_ref = self.model(perturbed), self.reference(perturbed)
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = pred != self.clean_pred, pred_ref != self.clean_pred_ref
        shared = fooled & fooled_ref & (pred == pred_ref)
        self._all_shared = bool(shared.all())
        entropy = (F.cross_entropy(logits, self.y, reduction="none")[~fooled].sum()
                   + F.cross_entropy(logits_ref, self.y, reduction="none")[~fooled_ref].sum()) / (2 * self.n)
        divergence = jensen_shannon(logits, logits_ref)[~shared].sum() / self.n
        adversarial_weight, share_weight = self.weights
        return adversarial_weight * entropy - share_weight * divergence


# The authors' bounds on the unlearning term -log(1 - p): 1 - p counts at most 0.999 (so an image whose p is
# under 0.001 adds a constant and no gradient: "discard samples with p<1% to be shared", in their comment), and
# 1e-6 is added inside the logarithm (so the term is at most -log(1e-6) = 13.8 and its gradient fades where
# 1 - p falls under about 1e-6).
UNLEARN_MAX_COMPLEMENT, UNLEARN_FLOOR = 0.999, 1e-6


def bounded_unlearning_term(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per row, -log(1e-6 + min(1 - p, 0.999)) with p = softmax(logits)[i, classes[i]]: SAU's unlearning term
    -log(1 - p) (Wei et al. 2023, the shared adversarial risk's surrogate) with the bounds of the authors' code.
    1 - p is taken as exp(log_one_minus_softmax), so it keeps its precision where p is close to 1. (The authors
    average two float renderings of this one function, from 1 - p and from p; they agree up to rounding.)"""
    complement = log_one_minus_softmax(logits.float(), classes).exp()
    return -torch.log(UNLEARN_FLOOR + complement.clamp(max=UNLEARN_MAX_COMPLEMENT))


def unlearning_loss(model: nn.Module, reference: nn.Module, x: torch.Tensor, perturbed: torch.Tensor,
                    y: torch.Tensor, weights: tuple[float, float, float]) -> torch.Tensor:
    """lambda1 CE(h(x), y) + lambda2 CE(h(x + eps), y) + lambda3 x the shared adversarial unlearning term."""
    logits, logits_adv = model(torch.cat([x, perturbed])).split(len(x))
    with torch.no_grad():
        clean_ref, adv_ref = reference(x).argmax(1), reference(perturbed).argmax(1)
    potential_poison = (adv_ref != y) & (adv_ref != clean_ref)
    unlearn = bounded_unlearning_term(logits_adv, adv_ref)[potential_poison].sum() / len(x)
    clean_weight, adversarial_weight, unlearn_weight = weights
    return (clean_weight * F.cross_entropy(logits, y) + adversarial_weight * F.cross_entropy(logits_adv, y)
            + unlearn_weight * unlearn)


@DEFENSES.register("sau")
class SharedAdversarialUnlearning(Defense):
    """SAU (Wei et al. 2023): unlearn the adversarial examples the repaired model shares with the deployed one."""

    kind = DefenseKind.MODEL_REPAIR
    citation = ("Wei, Zhang, Zha, Wu. Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning "
                "Shared Adversarial Examples. NeurIPS 2023.")

    def __init__(self, epochs: PositiveInt = 100, lr: PositiveFloat = 1e-4, batch_size: PositiveInt = 256,
                 eps: PositiveFloat = 0.2, step_size: PositiveFloat = 0.2, pgd_steps: PositiveInt = 5,
                 beta_adversarial: NonNegativeFloat = 0.01, beta_share: NonNegativeFloat = 1.0,
                 clean_weight: NonNegativeFloat = 1.0, adversarial_weight: NonNegativeFloat = 0.0,
                 unlearn_weight: NonNegativeFloat = 1.0, early_stop: bool = True) -> None:
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.eps, self.step_size, self.pgd_steps = eps, step_size, pgd_steps
        self.betas = (beta_adversarial, beta_share)
        self.weights = (clean_weight, adversarial_weight, unlearn_weight)
        self.early_stop = early_stop

    def run(self, context: DefenseContext) -> DefenseOutcome:
        precision = loop_precision(context.train_config, context.device)
        layout = precision.memory_format
        reference = to_layout(copy.deepcopy(context.model), layout, context.device).eval().requires_grad_(False)
        model = to_layout(copy.deepcopy(context.model), layout, context.device).eval()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.lr, amsgrad=True)
        generator = context.generator("sau_batches")
        x_all, y_all = context.clean_x.to(context.device), context.clean_y.to(context.device)
        for _ in range(self.epochs):
            for idx in torch.randperm(len(y_all), generator=generator).to(context.device).split(self.batch_size):
                x, y = x_all[idx].float().div_(255.0).contiguous(memory_format=layout), y_all[idx]
                with precision.autocast():
                    objective = SharedAdversarialObjective(model, reference, x, y, *self.betas)
                    perturbed = linf_pgd(objective, x, eps=self.eps, step_size=self.step_size, steps=self.pgd_steps,
                                         stop=objective.all_shared if self.early_stop else None,
                                         start_offset=self.eps, clip=False)
                    loss = unlearning_loss(model, reference, x, perturbed, y, self.weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return DefenseOutcome(model=to_layout(model, torch.contiguous_format).eval())
