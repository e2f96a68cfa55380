"""SCAn, the Statistical Contamination Analyzer (Tang, Wang, Tang and Zhang, "Demon in the
Variant: Statistical Analysis of DNNs for Robust Backdoor Contamination Detection", USENIX
Security 2021).

A representation is modelled as r = mu_class + e, with identity vectors mu ~ N(0, S_mu) and
within-class variation e ~ N(0, S_e). 1. The global model (S_mu, S_e) is fitted by EM (the
joint-Bayesian decomposition) on the defender's clean budget, centred on the budget's mean. 2. For
each class of the training set (plus the clean budget's samples of that class, all centred on
their common mean), the untangling step splits the class into two subgroups with identities mu_1,
mu_2 by alternating the subgroup means and the assignment to the nearer one under S_e^-1. 3. The
test statistic J_c is the mean log-likelihood gain (x2) of two identities over one (the one being
the posterior identity S_mu (n S_mu + S_e)^-1 sum r). Classes are compared by the anomaly index
J* = (J_c - median) / (1.4826 MAD), and a class whose J* exceeds `threshold` is contaminated.
4. In a contaminated class the subgroup holding fewer of the clean budget's samples is the poison
(the smaller one when the budget has none of that class or splits evenly).

The threshold is e^2 = 7.389, the paper's, which its first author's own later implementation uses
too (`threshold = np.exp(2)` in BackdoorBench's detection_pretrain/scan.py). Qi et al.'s
reimplementation (backdoor-toolbox, cleansers_tool_box/scan.py, as read in session 16), whose adaptive
attacks are reported to defeat SCAn, flags at e = 2.718 instead, which flags every class whose J* lies
between the two (other copies of the same code in public repositories use e^2); `threshold=math.e` gives
that setting.

Where this differs from the authors' code (Demon-in-the-Variant, pysrc/SCAn.py), on purpose:
- S_e is estimated with Ledoit-Wolf shrinkage, because a budget of tens of images per class cannot
  give a well-conditioned covariance of the representation, and an ill-conditioned S_e makes every
  class look split (the paper assumes a larger clean set).
- The untangling starts from the sign of the leading principal direction of the class (whitened by
  S_e), not from a random split, so that the result does not depend on a draw.
- J* is one-sided: the authors' code takes |J_c - median|, which would also call contaminated a
  class that is unusually well explained by a single identity (a J_c far below the others), which
  is no evidence of a second identity.

Scores: the class's J* for samples in its suspicious subgroup, and a value below every J* for the
rest, so flagged <=> score > threshold. Every class's J* is reported too (`class_statistics`, by label, where
every label has training samples), so that a row can be read again at another threshold.
"""

from __future__ import annotations

import math

import torch

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.layers import read_activations
from bdbench.defenses.scoring import anomaly_index

_EM_STEPS = 100


def _covariance(x: torch.Tensor) -> torch.Tensor:
    return torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _shrunk_covariance(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrinkage: a clean budget of a few images per class cannot fill a full-rank
    covariance of the representation, and an ill-conditioned S_e makes every class look split."""
    from sklearn.covariance import ledoit_wolf

    return torch.from_numpy(ledoit_wolf(x.numpy())[0])


def identity_means(x: torch.Tensor, groups: torch.Tensor, s_mu: torch.Tensor, s_e: torch.Tensor) -> torch.Tensor:
    """Posterior identity vector of each group: S_mu (n S_mu + S_e)^-1 sum(x) (joint Bayesian E-step)."""
    means = []
    for g in range(int(groups.max()) + 1):
        members = x[groups == g]
        means.append(s_mu @ torch.linalg.pinv(len(members) * s_mu + s_e) @ members.sum(0))
    return torch.stack(means)


def fit_global_model(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_mu, S_e) of centred representations `x` with labels `y`, by EM from the moment estimates."""
    classes = torch.unique(y, return_inverse=True)[1]
    class_means = torch.stack([x[classes == c].mean(0) for c in range(int(classes.max()) + 1)])
    s_mu, s_e = _covariance(class_means[classes]), _shrunk_covariance(x - class_means[classes])
    for _ in range(_EM_STEPS):
        mu = identity_means(x, classes, s_mu, s_e)[classes]
        new_mu, new_e = _covariance(mu), _shrunk_covariance(x - mu)
        change = torch.linalg.norm(new_mu - s_mu) + torch.linalg.norm(new_e - s_e)
        s_mu, s_e = new_mu, new_e
        if change < 1e-5:
            break
    return s_mu, s_e


def untangle(x: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Two subgroups (0/1) of one class's centred representations: start from the sign of the
    leading whitened principal direction, then alternate the subgroup means and the assignment to
    the nearer mean under the within-class precision."""
    values, vectors = torch.linalg.eigh(precision)
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    whitened = (x - x.mean(0)) @ root
    direction = torch.linalg.svd(whitened, full_matrices=False)[2][0]
    groups = (whitened @ direction > 0).long()
    for _ in range(_EM_STEPS):
        if groups.min() == groups.max():
            break
        u = torch.stack([x[groups == 0].mean(0), x[groups == 1].mean(0)])
        distance = torch.stack([((x - u[g]) @ precision * (x - u[g])).sum(1) for g in (0, 1)], 1)
        new = distance.argmin(1)
        if torch.equal(new, groups):
            break
        groups = new
    return groups


def untangling_statistic(x: torch.Tensor, groups: torch.Tensor, s_mu: torch.Tensor, s_e: torch.Tensor,
                         precision: torch.Tensor) -> float:
    """J: mean gain in log-likelihood (x2) of two identity vectors over one for one class."""
    one = identity_means(x, torch.zeros(len(x), dtype=torch.long), s_mu, s_e)[0]
    if groups.min() == groups.max():
        return 0.0
    two = torch.stack([x[groups == g].mean(0) for g in (0, 1)])[groups]
    gain = ((x - one) @ precision * (x - one)).sum(1) - ((x - two) @ precision * (x - two)).sum(1)
    return float(gain.mean())


@DEFENSES.register("scan")
class SCAn(Defense):
    """SCAn (Tang et al. 2021): global variation model on clean data, per-class two-identity untangling test."""

    kind = DefenseKind.DATA_DETECTION
    citation = ("Tang, Wang, Tang, Zhang. Demon in the Variant: Statistical Analysis of DNNs for Robust "
                "Backdoor Contamination Detection. USENIX Security 2021.")

    def __init__(self, threshold: float = math.exp(2)) -> None:
        self.threshold = float(threshold)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        train_x, train_y = context.training_set()
        train = read_activations(context.model, train_x, "penultimate").double()
        clean = read_activations(context.model, context.clean_x, "penultimate").double()
        s_mu, s_e = fit_global_model(clean - clean.mean(0), context.clean_y)
        precision = torch.linalg.pinv(s_e)
        everything = torch.cat([train, clean])
        everything = everything - everything.mean(0)
        labels = torch.cat([train_y, context.clean_y])
        from_budget = torch.arange(len(labels)) >= len(train)
        classes = train_y.unique()
        statistics, suspicious = [], {}
        for label in classes:
            members = torch.nonzero(labels == label).flatten()
            groups = untangle(everything[members], precision)
            statistics.append(untangling_statistic(everything[members], groups, s_mu, s_e, precision))
            clean_counts = torch.bincount(groups[from_budget[members]], minlength=2)
            sizes = torch.bincount(groups, minlength=2)
            poison_group = int(clean_counts.argmin()) if clean_counts.sum() else int(sizes.argmin())
            if clean_counts[0] == clean_counts[1]:
                poison_group = int(sizes.argmin())
            suspicious[int(label)] = members[(groups == poison_group) & ~from_budget[members]]
        index = anomaly_index(torch.tensor(statistics, dtype=torch.float64))
        scores = torch.full((len(train),), float(index.min()) - 1.0, dtype=torch.float64)
        for label, value in zip(classes.tolist(), index.tolist()):
            scores[suspicious[label]] = value
        by_label = index if torch.equal(classes, torch.arange(context.num_classes)) else None
        return DefenseOutcome(sample_scores=scores, flagged=scores > self.threshold, threshold=self.threshold,
                              class_statistics=by_label)
