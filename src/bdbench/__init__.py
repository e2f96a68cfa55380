"""bdbench: evaluate backdoor attacks and defenses for image classifiers, the way a careful reviewer would.

Python API: `run_grid(config, out=...)` runs a grid and returns its rows; `load_results(out)`
returns every stored row as a pandas DataFrame; `load_model(path, arch, num_classes, ...)` reads a
user's own trained model from safetensors weights.

`import bdbench` loads nothing else: each name is imported on first use (PEP 562), so the command line,
`bdbench.schema` and any submodule start without torch, pandas or scipy, and no submodule imports back
through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The one place the version is written: pyproject.toml reads it from here (setuptools' `attr:`).
__version__ = "0.1.0"

_LAZY = {"load_model": "bdbench.models", "run_grid": "bdbench.runner", "load_results": "bdbench.store"}

if TYPE_CHECKING:
    from bdbench.models import load_model
    from bdbench.runner import run_grid
    from bdbench.store import load_results


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'bdbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["load_model", "load_results", "run_grid"]
