"""First load (decode image files) against second load (decoded-array cache) of an image folder.

Builds an ImageNet-style folder (train/<class>/*.jpg, val/<class>/*.jpg) in a temporary directory
from real GTSRB images of ../shared/data/gtsrb32.npz, upscaled to 64x64 JPEGs (Tiny-ImageNet's
size), then loads it three ways: cold (decode every file and write the cache), from the cache in
a fresh call (memory-mapped), and through `load_dataset`'s per-process cache. Every timing
includes touching all pixels, so a lazy memory map is not flattered.

    .venv/bin/python benchmarks/dataset_cache.py [--images 10000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gtsrb32.npz"


def build_folder(root: Path, images: int) -> None:
    with np.load(SHARED) as archive:
        x, y = archive["x_train"][:images], archive["y_train"][:images]
    for i, (pixels, label) in enumerate(zip(x, y)):
        split = "val" if i % 5 == 0 else "train"
        folder = root / split / f"{label:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((64, 64), Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)


def timed(load) -> tuple[float, object]:
    start = time.perf_counter()
    dataset = load()
    int(dataset.x_train.amax()) + int(dataset.x_test.amax())  # read every pixel
    return time.perf_counter() - start, dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    args = parser.parse_args()
    if not SHARED.is_file():
        raise SystemExit(f"{SHARED} is absent; this benchmark needs it")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BDBENCH_CACHE_DIR"] = str(Path(tmp) / "cache")
        from bdbench.data import load_dataset
        from bdbench.data.official import load_imagefolder

        build_folder(Path(tmp) / "data", args.images)
        root = str(Path(tmp) / "data")
        cold, dataset = timed(lambda: load_imagefolder(root))
        cached, again = timed(lambda: load_imagefolder(root))
        assert (dataset.x_train == again.x_train).all()
        load_dataset("imagefolder", root=root)
        in_process, _ = timed(lambda: load_dataset("imagefolder", root=root))
        print(f"{dataset.describe()}; {os.cpu_count()} CPUs")
        print(f"first load (decode {args.images} JPEGs, write cache): {cold:8.2f} s")
        print(f"second load (memory-mapped cache):               {cached:8.2f} s   {cold / cached:7.1f}x faster")
        print(f"same process again (load_dataset's cache):       {in_process:8.3f} s")


if __name__ == "__main__":
    main()
