"""Executors run experiment specs and yield their rows as they finish; the runner alone stores them.

- `local`: in this process, one after another (`local.py`);
- `process`: N worker processes on this machine (`process.py`);
- `ray`: tasks on a Ray cluster, joined or started for the run (`ray_cluster.py`, optional extra).

All of them run a victim's experiments after the victim is trained (`base.py`), so each victim
is trained once per output folder, whichever executor and however many workers.
"""

from bdbench.executors import local, process, ray_cluster  # noqa: F401  (they register themselves)
from bdbench.executors.base import EXECUTORS, Executor, Resources

__all__ = ["EXECUTORS", "Executor", "Resources"]
