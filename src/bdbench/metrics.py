"""Pure metric functions. The runner computes every number; defenses never score themselves."""

from __future__ import annotations

import torch


def _share(hits: torch.Tensor) -> float | None:
    return float(hits.double().mean()) if hits.numel() else None


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float | None:
    """Share of predictions equal to the true labels (clean accuracy on clean images)."""
    return _share(pred == y)


def attack_success_rate(pred_triggered: torch.Tensor, y_target: torch.Tensor) -> float | None:
    """Share of triggered images (whose true label is not the target) predicted as the target."""
    return _share(pred_triggered == y_target)


def robust_accuracy(pred_triggered: torch.Tensor, y_true: torch.Tensor) -> float | None:
    """Share of triggered images still predicted as their true label."""
    return _share(pred_triggered == y_true)


def defense_effectiveness_rating(clean_acc_before: float, asr_before: float,
                                 clean_acc_after: float, asr_after: float) -> float:
    """BackdoorBench's DER in [0, 1]: (max(0, ASR drop) - max(0, CA drop) + 1) / 2.

    Wu et al., "BackdoorBench: A Comprehensive Benchmark of Backdoor Learning", NeurIPS 2022.
    0.5 means no change; 1 means ASR fell by 100 points at no accuracy cost.
    """
    asr_drop = max(0.0, asr_before - asr_after)
    acc_drop = max(0.0, clean_acc_before - clean_acc_after)
    return (asr_drop - acc_drop + 1.0) / 2.0


def detection_rates(flagged: torch.Tensor, is_positive: torch.Tensor) -> tuple[float | None, float | None]:
    """(TPR, FPR) of boolean flags against ground truth; None where a class has no members."""
    flagged, is_positive = flagged.bool(), is_positive.bool()
    return _share(flagged[is_positive]), _share(flagged[~is_positive])


def auroc(scores: torch.Tensor, is_positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of `scores` (higher = more suspicious), ties counted half.

    Computed as the Mann-Whitney U statistic from average ranks; None when either class is empty.
    """
    scores = scores.double().flatten()
    is_positive = is_positive.bool().flatten()
    n_pos = int(is_positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Average the ranks of tied scores.
    unique, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    rank_sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks[order])
    ranks[order] = (rank_sums / counts)[inverse]
    u = float(ranks[is_positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


# ---------------------------------------------------------------- stealthiness of a trigger

# Values (images x channels x pixels) per chunk: a few MB of float64 work arrays, whatever the number of images.
_CHUNK_VALUES = 1 << 16


def _image_chunks(n: int, values_per_image: int, chunk_values: int) -> list[slice]:
    """Slices of whole images, about `chunk_values` values each (at least one image)."""
    step = max(1, chunk_values // max(1, values_per_image))
    return [slice(start, start + step) for start in range(0, n, step)]


def psnr(clean: torch.Tensor, poisoned: torch.Tensor, data_range: float = 255.0,
         chunk_values: int = _CHUNK_VALUES) -> float | None:
    """Mean over images of the peak signal-to-noise ratio 10 log10(R^2 / MSE), in dB, of (N, C, H, W)
    batches. Images the trigger left unchanged are skipped (their PSNR is infinite); None when
    every image is unchanged or the batch is empty. Computed in float64, `chunk_values` values at a time."""
    if not len(clean):
        return None
    mse = torch.empty(len(clean), dtype=torch.float64, device=clean.device)
    for part in _image_chunks(len(clean), clean[0].numel(), chunk_values):
        mse[part] = (clean[part].double() - poisoned[part].double()).pow(2).flatten(1).mean(1)
    changed = mse > 0
    if not changed.any():
        return None
    return float((10 * torch.log10(data_range ** 2 / mse[changed])).mean())


def _gaussian_band(n: int, size: int, sigma: float) -> torch.Tensor:
    """The (n - size + 1, n) matrix that convolves a length-n signal with the normalised `size`-tap
    Gaussian at every position where it fits (valid mode)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    offset = torch.arange(n)[None, :] - torch.arange(n - size + 1)[:, None]
    inside = (offset >= 0) & (offset < size)
    return torch.where(inside, g[offset.clamp(0, size - 1)], torch.zeros((), dtype=torch.float64))


def ssim(clean: torch.Tensor, poisoned: torch.Tensor, data_range: float = 255.0,
         window: int = 11, sigma: float = 1.5, chunk_values: int = _CHUNK_VALUES) -> float | None:
    """Mean structural similarity (Wang, Bovik, Sheikh and Simoncelli, "Image Quality Assessment:
    From Error Visibility to Structural Similarity", IEEE TIP 2004) of (N, C, H, W) batches.

    Local statistics use an 11x11 Gaussian window with sigma 1.5 and K1 = 0.01, K2 = 0.03, over
    the positions where the window fits (as the paper and skimage's gaussian_weights mode);
    channels are averaged, then images. Images smaller than the window use the largest odd
    window that fits (7x7 on 8x8 digits). None for an empty batch.

    The window is the outer product of a 1-D Gaussian, so each local mean is two 1-D valid
    convolutions, done here as products with banded matrices (about 10x faster on the CPU than
    conv2d with one-channel kernels). Images go through `chunk_values` values at a time, so memory
    stays bounded whatever their number. float64 throughout: on the GTSRB test set under a blended
    trigger it matches the former whole-set 11x11 convolution to 3e-16 (2e-14 per image), where
    float32 was about twice as fast but 6e-8 off. The 7,949 GTSRB test images take 1.0 s and 10 MB
    on one thread instead of 76-104 s and 4.6 GB (benchmarks/ssim_separable_vs_2d.py).
    """
    if clean.numel() == 0:
        return None
    n, c, h, w = clean.shape
    size = min(window, h - (1 - h % 2), w - (1 - w % 2))
    down = _gaussian_band(h, size, sigma).to(clean.device)
    across = _gaussian_band(w, size, sigma).T.to(clean.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    total = 0.0
    for part in _image_chunks(n, c * h * w, chunk_values):
        x, y = clean[part].double(), poisoned[part].double()
        mu_x, mu_y, mean_xx, mean_yy, mean_xy = down @ torch.stack([x, y, x * x, y * y, x * y]) @ across
        var_x, var_y, cov = mean_xx - mu_x ** 2, mean_yy - mu_y ** 2, mean_xy - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
        total += float(ssim_map.flatten(1).mean(1).sum())
    return total / n
