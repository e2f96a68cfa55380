"""SentiNet, a run-time input detector: its salient region, and its effect on a small BadNets model of 28x28
digits."""

import pytest
import torch

from bdbench.defenses import sentinet


@pytest.mark.parametrize("cam, kept", [
    (torch.ones(10, 10), 15),  # a flat map: ties at the cut still give 15% of the pixels
    (torch.zeros(10, 10).index_fill_(0, torch.tensor([0]), 1.0), 10),  # 10 salient pixels, not the image
    (torch.zeros(10, 10), 0),  # no saliency: nothing to transplant
])
def test_sentinet_region_is_at_most_its_share_of_the_salient_pixels(monkeypatch, cam, kept):
    # Grad-CAM's ReLU leaves most pixels at 0 when the model looks at a small patch; a cut at the 15th percentile
    # value must not then take every pixel tied at 0 (the whole input would be pasted on the carriers).
    monkeypatch.setattr(sentinet, "grad_cam", lambda model, images, classes: cam.expand(len(images), 10, 10))
    masks = sentinet.salient_masks(torch.nn.Identity(), torch.zeros(2, 1, 10, 10), torch.zeros(2, dtype=torch.long),
                                   0.15)
    assert masks.shape == (2, 10, 10)
    assert masks.flatten(1).sum(1).tolist() == [kept, kept]
    assert not (masks & (cam == 0)).any()


def test_sentinet_finds_the_patch_that_hijacks_clean_images(mnist_badnets, effect):
    effect.check("ASR of the model", mnist_badnets.scores(mnist_badnets.model)[1], ">", 0.9)
    _, fpr, tpr, auroc = mnist_badnets.screen_inputs("sentinet", images=500, carriers=30)
    # Seeds 0-3, one and two threads (AVX2): AUROC 0.999-1.000, TPR 0.998-1.000, FPR 0.006-0.104 (the threshold
    # is set at a 5% false rejection on the 150-image clean budget, so the test set's FPR scatters around it).
    effect.check("AUROC", auroc, ">=", 0.95)
    effect.check("TPR", tpr, ">=", 0.9)
    effect.check("FPR", fpr, "<=", 0.15)
