import math

import pytest
import torch

from bdbench import metrics


def test_accuracy_asr_robust_accuracy_hand_computed():
    pred = torch.tensor([0, 1, 2, 0])
    y = torch.tensor([0, 1, 1, 1])
    assert metrics.accuracy(pred, y) == 0.5
    # Triggered images: true labels 1,2,3,1; the target is 0.
    pred_t = torch.tensor([0, 0, 3, 1])
    assert metrics.attack_success_rate(pred_t, torch.zeros(4, dtype=torch.long)) == 0.5
    assert metrics.robust_accuracy(pred_t, torch.tensor([1, 2, 3, 1])) == 0.5
    assert metrics.accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) is None


def test_der_follows_backdoorbench():
    # ASR 0.9 -> 0.1 (drop 0.8), CA 0.95 -> 0.93 (drop 0.02): (0.8 - 0.02 + 1) / 2
    assert metrics.defense_effectiveness_rating(0.95, 0.9, 0.93, 0.1) == pytest.approx(0.89)
    # A defense that raises ASR and accuracy gets no credit for either: exactly 0.5.
    assert metrics.defense_effectiveness_rating(0.9, 0.5, 0.95, 0.7) == 0.5
    # Perfect removal at no cost is 1; destroying accuracy without touching ASR is below 0.5.
    assert metrics.defense_effectiveness_rating(0.9, 1.0, 0.9, 0.0) == 1.0
    assert metrics.defense_effectiveness_rating(0.9, 1.0, 0.1, 1.0) == pytest.approx(0.1)


def test_detection_rates():
    flagged = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)
    truth = torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool)
    tpr, fpr = metrics.detection_rates(flagged, truth)
    assert tpr == pytest.approx(2 / 3) and fpr == 0.5
    assert metrics.detection_rates(flagged, torch.zeros(5, dtype=torch.bool)) == (None, 0.6)


def test_auroc_hand_computed_with_ties():
    assert metrics.auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert metrics.auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    # Positives 0.5 and 0.7, negatives 0.5 and 0.1: pairs (0.5 vs 0.5) tie = 0.5, others win -> 3.5/4.
    assert metrics.auroc(torch.tensor([0.5, 0.7, 0.5, 0.1]), torch.tensor([1, 1, 0, 0])) == pytest.approx(0.875)
    assert metrics.auroc(torch.tensor([0.3, 0.4]), torch.tensor([0, 0])) is None


def test_auroc_matches_sklearn_on_random_scores():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 20, (300,), generator=g).float()  # many ties
    truth = torch.rand(300, generator=g) < 0.3
    assert math.isclose(metrics.auroc(scores, truth), roc_auc_score(truth.numpy(), scores.numpy()), rel_tol=1e-9)
