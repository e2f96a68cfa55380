"""bdbench: evaluate backdoor attacks and defenses for image classifiers, the way a careful reviewer would.

Python API: `run_grid(config, out=...)` runs a grid and returns its rows; `load_results(out)`
returns every stored row as a pandas DataFrame; `load_model(path, arch, num_classes, ...)` reads a
user's own trained model from safetensors weights.
"""

from bdbench.models import load_model
from bdbench.runner import run_grid
from bdbench.store import load_results

__all__ = ["load_model", "load_results", "run_grid"]
__version__ = "0.1.0"
