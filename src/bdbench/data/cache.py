"""A decoded-array cache, so that a data set read from thousands of image files is decoded once.

The first load of a folder of images (GTSRB, Tiny-ImageNet, an image folder) or of a compressed
archive decodes it and writes the arrays as .npy files under the cache folder; later loads, in
any process, memory-map them instead. The key hashes the loader, its parameters and the path,
size and modification time of every source file, so an edited data set is decoded again.

The folder is `$BDBENCH_CACHE_DIR`, else `$XDG_CACHE_HOME/bdbench`, else `~/.cache/bdbench`;
`BDBENCH_CACHE_DIR=off` turns the cache off. The data root itself is never written to: it may
be read-only or shared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

log = logging.getLogger("bdbench")

_FORMAT = 1  # bump when the layout of cached arrays changes


def cache_root() -> Path | None:
    """The cache folder, or None when the cache is turned off."""
    configured = os.environ.get("BDBENCH_CACHE_DIR")
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "0", "none") else Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bdbench"


def fingerprint(files: Iterable[Path]) -> list[tuple[str, int, int]]:
    """Path, size and modification time of each source file: what decides whether the cache is stale."""
    out = []
    for path in files:
        stat = path.stat()
        # abspath, not resolve: resolving costs a system call per path component and file.
        out.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    return out


def cached_arrays(kind: str, key: Any, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays `build` returns, read from the cache when `kind` and `key` (JSON-able) were seen before.

    Cached arrays come back memory-mapped copy-on-write: pages are read when first touched and
    shared with every other process that maps the same file; writes stay private.
    """
    root = cache_root()
    if root is None:
        return build()
    digest = hashlib.sha256(json.dumps([_FORMAT, kind, key], sort_keys=True, default=str).encode()).hexdigest()
    folder = root / "datasets" / f"{kind}-{digest[:20]}"
    arrays = _read(folder)
    if arrays is not None:
        return arrays
    arrays = build()
    try:
        _write(folder, arrays)
    except OSError as exc:  # a read-only or full disk costs speed, never the run
        log.warning("could not cache decoded %s under %s (%s); it will be decoded again next time", kind, root, exc)
    return arrays


def _read(folder: Path) -> dict[str, np.ndarray] | None:
    index = folder / "index.json"
    if not index.is_file():
        return None
    try:
        names = json.loads(index.read_text())["arrays"]
        return {name: np.load(folder / f"{name}.npy", mmap_mode="c", allow_pickle=False) for name in names}
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring unreadable data cache %s (%s)", folder, exc)
        return None


def _write(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        # The index is written last: a folder without one is never read.
        (tmp / "index.json").write_text(json.dumps({"arrays": sorted(arrays)}))
        if folder.exists() and not (folder / "index.json").is_file():
            shutil.rmtree(folder)  # incomplete: its index was removed
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "index.json").is_file():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
