"""Trigger-stealth metrics on a whole test set: SSIM and PSNR as every row computed them before,
against `metrics.ssim` and `metrics.psnr` now.

Before: one 11x11 grouped `conv2d` per local statistic over the whole test set at once, in float64
(kept below as `ssim_2d`, the reference), and PSNR on the whole set converted to float64. Now: the
same window as two 1-D Gaussian passes (banded-matrix products), in chunks of about 65k values, and
PSNR in the same chunks. The triggered set is every test image of a shared .npz data set under
Blended's trigger (alpha 0.2), as in issue 26's measurement (7,949 GTSRB test images). Each
function runs once, new before old, with `--threads` torch threads (default 1). Peak memory is the
resident set size (RSS, /proc/self/statm sampled every 10 ms by `bdbench.profiling.measure`) above
what it was when the call started: torch's allocations do not pass through Python's allocator, so
`tracemalloc` would not see them. Prints seconds, peak memory, the ratio and the absolute
difference between the two values, and the largest difference over the first `--single` images
scored one at a time.

Measured on this project's 2-core machine while other jobs loaded both cores (load average about
8), one thread, two runs: GTSRB (7,949 images) SSIM 76-104 s and 4.6 GB before, 1.0 s and 10-12 MB
now (77-101x), PSNR 0.6-0.8 s and 736 MB before, 0.1 s and 1 MB now; CIFAR-10 (10,000 images) SSIM
97-125 s and 5.8 GB before, 1.2-1.5 s and 13-14 MB now (81-82x), PSNR 0.8 s and 930 MB before, 0.1 s
and 1 MB now. SSIM differs by 3e-16 on the whole set and at most 2e-14 on single images; PSNR by 0.

    python benchmarks/ssim_separable_vs_2d.py [--data ../shared/data/gtsrb32.npz] [--threads 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bdbench import metrics
from bdbench.attacks import ATTACKS, AttackWorkshop
from bdbench.data import load_dataset
from bdbench.profiling import current_rss_mb, measure

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gtsrb32.npz"


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_2d(clean: torch.Tensor, poisoned: torch.Tensor, data_range: float = 255.0,
            window: int = 11, sigma: float = 1.5) -> float | None:
    """`metrics.ssim` as it was: a 2-D window, the whole batch at once."""
    if clean.numel() == 0:
        return None
    x, y = clean.double(), poisoned.double()
    _, c, h, w = x.shape
    size = min(window, h - (1 - h % 2), w - (1 - w % 2))
    kernel = _gaussian_window(size, sigma).to(x.device).expand(c, 1, size, size)

    def blur(img: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(img, kernel, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.flatten(1).mean(1).mean())


def psnr_whole(clean: torch.Tensor, poisoned: torch.Tensor, data_range: float = 255.0) -> float | None:
    """`metrics.psnr` as it was: the whole batch in float64 at once."""
    clean, poisoned = clean.double(), poisoned.double()
    mse = (clean - poisoned).pow(2).flatten(1).mean(1)
    changed = mse > 0
    if not changed.any():
        return None
    return float((10 * torch.log10(data_range ** 2 / mse[changed])).mean())


def timed(function, clean: torch.Tensor, poisoned: torch.Tensor) -> tuple[float, float, float]:
    """(value, seconds, peak RSS in MB above the RSS at the start) of one call."""
    start_rss = current_rss_mb()
    with measure() as cost:
        value = function(clean, poisoned)
    return value, cost.seconds, cost.peak_rss_mb - start_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="an .npz with x_test (uint8 HWC)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--single", type=int, default=500, help="images compared one at a time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = load_dataset("npz", path=str(args.data))
    attack = ATTACKS.build("blended", {})
    attack.prepare(dataset, 0, AttackWorkshop(seed=0))
    clean = dataset.x_test
    poisoned = attack.trigger(clean)
    metrics.ssim(clean[:64], poisoned[:64])  # warm-up: first-call costs are not the method's
    print(f"{args.data.name}: {len(clean)} test images {tuple(clean.shape[1:])} under blended, "
          f"{args.threads} torch thread(s); peak = RSS above the start, sampled every 10 ms")
    for name, new, old in (("SSIM", metrics.ssim, ssim_2d), ("PSNR", metrics.psnr, psnr_whole)):
        new_value, new_s, new_mb = timed(new, clean, poisoned)
        old_value, old_s, old_mb = timed(old, clean, poisoned)
        print(f"{name}: before {old_s:7.2f} s {old_mb:7.0f} MB   now {new_s:6.2f} s {new_mb:5.0f} MB   "
              f"ratio before / now {old_s / new_s:6.1f}x   |difference| {abs(new_value - old_value):.1e} "
              f"(value {new_value:.6f})")
        worst = max(abs(new(clean[i:i + 1], poisoned[i:i + 1]) - old(clean[i:i + 1], poisoned[i:i + 1]))
                    for i in range(min(args.single, len(clean))))
        print(f"      largest |difference| over {min(args.single, len(clean))} single images: {worst:.1e}")


if __name__ == "__main__":
    main()
