import math

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

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


# ---------------------------------------------------------------- PSNR and SSIM

def test_psnr_hand_computed():
    from bdbench.metrics import psnr

    clean = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    shifted = clean + 10  # MSE 100 on every image: 10 log10(255^2 / 100)
    assert psnr(clean, shifted) == pytest.approx(10 * math.log10(255 ** 2 / 100))
    half = clean.clone()
    half[0] = 51  # image 0 has MSE 51^2, image 1 is unchanged and skipped
    assert psnr(clean, half) == pytest.approx(20 * math.log10(5))
    assert psnr(clean, clean) is None and psnr(clean[:0], clean[:0]) is None


def test_ssim_hand_cases_and_properties():
    from bdbench.metrics import ssim

    # Constant images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 100.0, 140.0
    c1 = (0.01 * 255) ** 2
    x = torch.full((1, 1, 16, 16), a)
    y = torch.full((1, 1, 16, 16), b)
    assert ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 3, 24, 24), generator=g).float()
    noisy = (img + 20 * torch.randn(img.shape, generator=g)).clamp(0, 255)
    noisier = (img + 60 * torch.randn(img.shape, generator=g)).clamp(0, 255)
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(img, noisy) == pytest.approx(ssim(noisy, img))  # symmetric
    assert 1 > ssim(img, noisy) > ssim(img, noisier) > -1  # falls as the distortion grows
    assert ssim(img, 255 - img) < 0  # anti-correlated structure
    assert 0 < ssim(img[:, :, :8, :8], noisy[:, :, :8, :8]) < 1  # 8x8 digits: a 7x7 window


def test_psnr_and_ssim_match_skimage():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    from bdbench.metrics import psnr, ssim

    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 256, (3, 3, 28, 28), generator=g).to(torch.uint8)
    poisoned = (clean.int() + torch.randint(-40, 41, clean.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    ref_ssim = sum(skimage_metrics.structural_similarity(
        c.numpy(), p.numpy(), channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=255) for c, p in zip(clean, poisoned)) / 3
    ref_psnr = sum(skimage_metrics.peak_signal_noise_ratio(c.numpy(), p.numpy(), data_range=255)
                   for c, p in zip(clean, poisoned)) / 3
    assert ssim(clean, poisoned) == pytest.approx(ref_ssim, abs=1e-9)
    assert psnr(clean, poisoned) == pytest.approx(ref_psnr, abs=1e-9)


def _blended(x: torch.Tensor, seed: int = 0, alpha: float = 0.2) -> torch.Tensor:
    """Blended's trigger (a fixed uniform noise pattern mixed in at `alpha`) on uint8 (N, C, H, W) images."""
    pattern = torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(seed))
    return ((1 - alpha) * x.float() / 255 + alpha * pattern).mul(255).round().to(torch.uint8)


def _skimage_mean_ssim(clean: torch.Tensor, poisoned: torch.Tensor, sigma: float = 1.5) -> float:
    """skimage's SSIM per image (its mean over the map cropped to where the window fits, channels
    averaged), then the mean over images, as `metrics.ssim` defines it."""
    from skimage.metrics import structural_similarity

    return sum(structural_similarity(c.numpy(), p.numpy(), channel_axis=0, gaussian_weights=True, sigma=sigma,
                                     use_sample_covariance=False, data_range=255)
               for c, p in zip(clean, poisoned)) / len(clean)


def test_ssim_matches_skimage_on_real_digits():
    pytest.importorskip("skimage.metrics")
    from bdbench.data import load_dataset
    from bdbench.metrics import ssim

    clean = load_dataset("digits").x_test[:100]
    poisoned = _blended(clean)
    # skimage sizes its window from sigma (radius round(3.5 sigma)), so an 8x8 image can only be compared at
    # a sigma whose window is 7 wide: at 0.9 both use the same normalised 7-tap Gaussian.
    assert ssim(clean, poisoned, sigma=0.9) == pytest.approx(_skimage_mean_ssim(clean, poisoned, sigma=0.9), abs=1e-9)
    assert 0.1 < ssim(clean, poisoned) < 0.99  # the default 7x7 window at sigma 1.5 that skimage cannot do


@pytest.mark.skipif(not (SHARED_DATA / "gtsrb32.npz").is_file(), reason="../shared/data/gtsrb32.npz is absent")
def test_ssim_and_psnr_match_skimage_on_gtsrb32():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    from bdbench.metrics import psnr, ssim

    with np.load(SHARED_DATA / "gtsrb32.npz") as archive:
        clean = torch.from_numpy(archive["x_test"][:40]).permute(0, 3, 1, 2).contiguous()
    poisoned = _blended(clean)
    ref_psnr = sum(skimage_metrics.peak_signal_noise_ratio(c.numpy(), p.numpy(), data_range=255)
                   for c, p in zip(clean, poisoned)) / len(clean)
    assert ssim(clean, poisoned) == pytest.approx(_skimage_mean_ssim(clean, poisoned), abs=1e-9)
    assert psnr(clean, poisoned) == pytest.approx(ref_psnr, abs=1e-9)


def test_chunks_give_the_value_of_one_chunk():
    from bdbench.metrics import _image_chunks, psnr, ssim

    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 256, (37, 3, 20, 20), generator=g).to(torch.uint8)
    poisoned = (clean.int() + torch.randint(-30, 31, clean.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    poisoned[5] = clean[5]  # one unchanged image, which PSNR skips
    values = 5 * 3 * 20 * 20  # five images a chunk, the last one holding two
    assert [len(range(37)[part]) for part in _image_chunks(37, 3 * 20 * 20, values)] == [5] * 7 + [2]
    for chunk_values in (1, values):  # one image a chunk, then five
        assert ssim(clean, poisoned, chunk_values=chunk_values) == pytest.approx(
            ssim(clean, poisoned, chunk_values=1 << 30), abs=1e-12)
        assert psnr(clean, poisoned, chunk_values=chunk_values) == pytest.approx(
            psnr(clean, poisoned, chunk_values=1 << 30), abs=1e-12)
