"""Benchmark: Neural Cleanse's batched trigger inversion against a loop over labels, same steps.

`defenses.nc.reverse_engineer_triggers` optimises every label's mask and pattern at once: each
batch of clean images is stamped with all K triggers and goes through the model as one pass of
K x batch images. The baseline is what most implementations do: one label at a time, each with its
own Adam optimiser over the same epochs and batches, one pass of `batch` images per step. Both use
the same per-step code (`_accumulate_label_gradients`), the same model in eval mode and the same
clean images; early stopping is out of reach (fewer epochs than its patience), so both take exactly
epochs x batches steps per label. The batched pass is timed at the default `images_per_pass`
(2,048: all ten labels of a 32-image batch in one pass) and at 128 (four labels a pass, gradients
added up before the one step). Prints seconds for each and the ratios.

Measured on this 2-core CPU (3 epochs, 320 images, 2 threads, two runs): the one big pass is
slower than the loop on cnn-small (0.69-0.75x) and about even on preact-resnet18 w0.25
(0.89-1.18x): the FLOPs are the same, and 320 images of activations fall out of the caches that
32 fit in. At 128 images a pass the shared step wins a little (1.06-1.24x). Batching pays where a
32-image pass leaves the device idle, as on a GPU (not measured here: no GPU was lent).

    python benchmarks/nc_batched_vs_per_label.py [--epochs 3] [--budget 320] [--threads N] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from bdbench.data import load_dataset
from bdbench.defenses.nc import _accumulate_label_gradients, reverse_engineer_triggers, squash, unsquash
from bdbench.models import create_model, with_normalization


def per_label(model: torch.nn.Module, x: torch.Tensor, num_classes: int, epochs: int, batch_size: int,
              generator: torch.Generator) -> torch.Tensor:
    """The same inversion, one label after another; returns the final mask norms."""
    _, channels, height, width = x.shape
    norms = []
    for label in range(num_classes):
        # Full (K, ...) tensors so that the shared step code can index them by label; only this
        # label's row ever gets a gradient, so Adam leaves the others where they are.
        mask_raw = unsquash(torch.rand(num_classes, 1, height, width, generator=generator)).to(x.device)
        pattern_raw = unsquash(torch.rand(num_classes, channels, height, width, generator=generator)).to(x.device)
        mask_raw.requires_grad_(), pattern_raw.requires_grad_()
        optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=0.1, betas=(0.5, 0.9))
        labels, cost = torch.tensor([label], device=x.device), torch.tensor([1e-3], device=x.device)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                xb = x[order[start:start + batch_size].to(x.device)].float().div(255.0)
                mask_raw.grad, pattern_raw.grad = torch.zeros_like(mask_raw), torch.zeros_like(pattern_raw)
                _accumulate_label_gradients(model, xb, mask_raw, pattern_raw, labels, cost)
                optimizer.step()
        norms.append(squash(mask_raw[label]).detach().sum())
    return torch.stack(norms)


def _elapsed(start: float, device: torch.device) -> float:
    """Seconds since `start`, once the device has finished what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--budget", type=int, default=320, help="clean images (batch 32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_dataset("mnist5k")
    x = data.x_train[:args.budget].to(device)
    print(f"{args.epochs} epochs over {len(x)} mnist5k images, batch 32, {args.threads} torch threads, on {device}")
    for name, options in (("cnn-small", {}), ("preact-resnet18", {"width": 0.25})):
        torch.manual_seed(0)
        model = with_normalization(create_model(name, 10, 1, data.image_size, **options), data.mean, data.std)
        model.to(device).eval()
        model.requires_grad_(False)
        batched = {}
        for images_per_pass in (2048, 128):
            start = time.perf_counter()
            reverse_engineer_triggers(model, x, 10, torch.Generator().manual_seed(0), epochs=args.epochs,
                                      images_per_pass=images_per_pass)
            batched[images_per_pass] = _elapsed(start, device)
        start = time.perf_counter()
        per_label(model, x, 10, args.epochs, 32, torch.Generator().manual_seed(0))
        looped = _elapsed(start, device)
        print(f"{name}: per-label loop {looped:.1f} s")
        for images_per_pass, seconds in batched.items():
            print(f"  batched, {images_per_pass:>4} images a pass: {seconds:6.1f} s   ratio loop / batched "
                  f"{looped / seconds:.2f}x")


if __name__ == "__main__":
    main()
