"""Plugins: attacks, defenses, models and data sets from a package of the user's own.

Two ways in, both reaching `process` and `ray` workers:

- Entry points. An installed distribution names its components in its `pyproject.toml`:

      [project.entry-points."bdbench.defenses"]
      my-defense = "my_pkg.defense:MyDefense"

  The entry point's name is the grid name and its value the class (or factory) to register; a value
  that is a module is imported instead, and whatever it registers with `DEFENSES.register(...)` counts
  as the distribution's. The groups are `bdbench.attacks`, `bdbench.defenses`, `bdbench.models` and
  `bdbench.datasets`. Each registry reads its group the first time it is asked for a name, in every
  process (so a spawned or Ray worker finds the plugin wherever the distribution is installed).
- Plugin modules: a grid's `plugins: [my_pkg.my_defense]` (or `--plugin` on the command line) imports
  modules that register components with the registries' `register` decorator. Each experiment carries
  the list to its worker, which imports them before it runs.

Every entry records where it came from (`Entry.source`): `bdbench` for the built-ins, `NAME VERSION`
for an entry-point distribution, `module M` for a plugin module. A name that is already registered is
a one-line error naming both sources.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.metadata
import inspect
from typing import TYPE_CHECKING, Iterable, Iterator

from bdbench.errors import ConfigError

if TYPE_CHECKING:
    from bdbench.registry import Registry

BUILTIN = "bdbench"
# Registry kind -> entry-point group.
GROUPS = {"attack": "bdbench.attacks", "defense": "bdbench.defenses", "model": "bdbench.models",
          "dataset": "bdbench.datasets"}

_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("bdbench_plugin_source", default=None)
_IMPORTED: set[str] = set()  # the plugin modules imported in this process


def source_of(obj: object) -> str:
    """Where an entry registered now comes from: the distribution whose entry point is being loaded, else
    bdbench for its own modules and `module M` for anyone else's (a plugin module, a script, a test)."""
    loading_now = _SOURCE.get()
    if loading_now is not None:
        return loading_now
    module = getattr(obj, "__module__", None) or ""
    return BUILTIN if module == "bdbench" or module.startswith("bdbench.") else f"module {module or '?'}"


@contextlib.contextmanager
def loading(source: str) -> Iterator[None]:
    """Attribute every registration inside the block to `source`."""
    token = _SOURCE.set(source)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _distribution(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return f"entry point {entry_point.value}"
    return f"{dist.metadata['Name']} {dist.version}"


def load_entry_points(registry: Registry) -> None:
    """Register what the installed distributions declare in the registry's entry-point group."""
    group = GROUPS.get(registry.kind)
    if group is None:
        return
    for entry_point in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
        source = _distribution(entry_point)
        with loading(source):
            try:
                obj = entry_point.load()
            except Exception as exc:  # any failure of a third-party import is the plugin's
                raise ConfigError(f"plugin {source}: entry point {entry_point.name} = {entry_point.value} in group "
                                  f"{group} cannot be loaded ({_first_line(exc)}); fix or uninstall that "
                                  f"distribution (pip uninstall {source.split()[0]})") from None
            if not inspect.ismodule(obj):  # a module registered its components itself as it was imported
                registry.register(entry_point.name, source=source)(obj)


def import_modules(modules: Iterable[str], where: str = "") -> None:
    """Import plugin modules (a grid's `plugins:`); what they register is attributed to `module M`, M the
    module that defines it. A module imported before is not imported again. `where` says which process
    failed in an error ("in a Ray worker")."""
    for name in modules:
        if not isinstance(name, str) or not name.strip() or name.startswith("."):
            raise ConfigError(f"plugins lists {name!r}; give importable module names such as my_pkg.my_defense")
        if name in _IMPORTED:
            continue
        # Every registry reads its entry points first, so that a module clashing with an installed
        # plugin is reported the same way whichever was looked at first.
        _discover_all()
        try:
            importlib.import_module(name)
        except ConfigError:
            raise
        except Exception as exc:  # an import runs arbitrary code; report it in one line
            place = f" {where}" if where else ""
            raise ConfigError(f"plugin module {name!r} cannot be imported{place} ({_first_line(exc)}); install its "
                              f"package (pip install -e PATH) or put its folder on PYTHONPATH") from None
        _IMPORTED.add(name)


def _discover_all() -> None:
    from bdbench.attacks import ATTACKS
    from bdbench.data import DATASETS
    from bdbench.defenses import DEFENSES
    from bdbench.models import MODELS

    for registry in (ATTACKS, DATASETS, DEFENSES, MODELS):
        registry.discover_plugins()

