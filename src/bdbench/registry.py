"""One small name -> factory registry, used by datasets, models, attacks, defenses and precisions.

Every kind registers the same way, with a decorator on the class or factory function:
`@ATTACKS.register("badnets")`. A factory's parameters are typed by its signature: `build` and `check`
refuse a value that does not fit the annotation (`patch_size: int`, or a range such as
`epochs: Annotated[int, Field(ge=1)]`, see `bdbench.params`) in one line that names the parameter, before
the factory runs; a registered class checks them again whenever it is constructed, also directly. A
reference entry (`none`: no attack, no defense) says so with a class attribute `reference = True`.

An entry whose code changes what it computes (a step fixed after a review against the authors' code) raises
its `revision` (a class or function attribute, 1 when absent): the revision is part of its settings, so rows
and cached victims made by an earlier revision run again on resume, as they do when a default changes.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, TypeVar, cast

from pydantic import TypeAdapter, ValidationError

from bdbench.errors import ConfigError

T = TypeVar("T")

REVISION = "(revision)"
"""The settings key of an entry's `revision` (a name no parameter can have), held only when it is above 1."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str
    source: str = "bdbench"  # where it came from: bdbench, a plugin distribution `NAME VERSION`, or `module M`


def _first_doc_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry(Generic[T]):
    """Maps names to factories; an unknown name is a one-line error listing the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._plugins_read = False

    def register(self, name: str, description: str | None = None, source: str | None = None) -> Callable[[T], T]:
        """A decorator that registers a class or factory under `name`. A class also validates its constructor's
        parameters against their annotations on every construction. `source` says where it comes from (default:
        the plugin being loaded, else bdbench or `module M`); a name already held is a one-line error."""
        def decorate(obj: T) -> T:
            from bdbench.plugins import source_of

            origin = source or source_of(obj)
            if name in self._entries:
                held = self._entries[name]
                if held.obj is obj:  # the same object again (a plugin module's decorator and its entry point)
                    return obj
                built_in = "bdbench's built-in" if held.source == "bdbench" else f"the one from {held.source}"
                raise ConfigError(f"{self.kind} {name!r} from {origin} clashes with {built_in} {self.kind} {name!r}; "
                                  f"register it under another name")
            if inspect.isclass(obj):
                _validate_construction(obj, self.kind, name)
            self._entries[name] = Entry(name, obj, description or _first_doc_line(obj), origin)
            return obj

        return decorate

    def discover_plugins(self) -> None:
        """Register the installed plugins of this kind (entry points), once per process; every lookup calls it."""
        if not self._plugins_read:
            self._plugins_read = True
            from bdbench.plugins import load_entry_points

            load_entry_points(self)

    def is_reference(self, name: str) -> bool:
        """Whether `name` is a reference entry (no attack, no defense: `reference = True` on its class), which
        rows compare against rather than rate; False for a name not registered here (a plugin's rows read back
        without the plugin)."""
        return name in self and bool(getattr(self._entries[name].obj, "reference", False))

    def unregister(self, name: str) -> None:
        """Remove an entry (plugins and tests that register temporary ones)."""
        self.entry(name)
        del self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        self.discover_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._entries))}"
            ) from None

    def check(self, name: str, params: Mapping[str, Any] | None = None, supplied: Iterable[str] = ()) -> None:
        """Refuse unknown, missing and mistyped parameters without calling the factory. `supplied`
        names parameters that the caller adds itself (a model's `num_classes`), which `params` may
        therefore neither give nor lack."""
        factory = self.get(name)
        params = dict(params or {})
        supplied = set(supplied)
        signature = inspect.signature(cast(Callable[..., Any], factory))
        named = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        accepted = {p.name for p in named} - supplied
        unknown = sorted(set(params) - accepted)
        if unknown:
            if unknown[0] in supplied:
                raise ConfigError(f"{self.kind} {name!r} parameter {unknown[0]!r} comes from the data set; remove it")
            valid = ", ".join(sorted(accepted)) or "none"
            raise ConfigError(f"{self.kind} {name!r} has no parameter {unknown[0]!r}; valid parameters: {valid}")
        missing = [p.name for p in named if p.default is p.empty and p.name not in params and p.name not in supplied]
        if missing:
            raise ConfigError(f"{self.kind} {name!r} needs parameter {missing[0]!r}")
        _validate(_parameter_types(factory), params, self.kind, name)

    def build(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        """Call the factory with `params`, after checking them against its signature (`check`)."""
        self.check(name, params)
        return cast(Callable[..., Any], self.get(name))(**dict(params or {}))

    def defaults(self, name: str) -> dict[str, Any]:
        """The factory's parameters that have a default, with it (none for a name not registered here, e.g. a
        plugin's rows read back without the plugin)."""
        if name not in self:
            return {}
        return {p.name: p.default for p in inspect.signature(cast(Callable[..., Any], self.get(name))).parameters.values()
                if p.default is not p.empty}

    def non_default(self, name: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters of `params` that differ from the factory's defaults (all of them for a name that is
        not registered here)."""
        defaults = self.defaults(name)
        return {k: v for k, v in params.items() if k not in defaults or plain_value(v) != plain_value(defaults[k])}

    def settings(self, name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every parameter that one setting of an entry runs with: `params`, and the factory's current defaults
        for those it leaves out, as plain JSON values. Two runs of the same spec ran the same setting only if
        their settings are equal: a default changed in the code since changes them (the spec, and hence the
        experiment id, does not), and so does a raised `revision` (under `REVISION`, held only above 1, so that
        settings stored before revisions existed compare equal to revision 1). A value JSON cannot hold stands as
        its type's name, the same in every process."""
        values = {**self.defaults(name), **(params or {})}
        settings = {k: plain_value(values[k]) for k in sorted(values)}
        if (revision := self.revision(name)) > 1:
            settings[REVISION] = revision
        return cast(dict[str, Any], json.loads(json.dumps(settings, default=lambda v: f"<{type(v).__qualname__}>")))

    def revision(self, name: str) -> int:
        """The revision of an entry's code (its `revision` attribute; 1 when it has none or is not registered)."""
        if name not in self:
            return 1
        revision = getattr(self.get(name), "revision", 1)
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
            raise ConfigError(f"{self.kind} {name!r} has revision {revision!r}; a revision is an integer >= 1")
        return revision

    def variant(self, name: str, params: Mapping[str, Any] | None = None, label: str | None = None) -> str:
        """A short name for one setting of an entry: `label` where the spec gives one, else the name with its
        non-default parameters, e.g. `badnets(patch_size=4)`, or the bare name at the defaults."""
        if label:
            return str(label)
        return variant_name(name, self.non_default(name, params or {}))

    def __contains__(self, name: object) -> bool:
        self.discover_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        self.discover_plugins()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        self.discover_plugins()
        return sorted(self._entries)

    def registered(self) -> list[str]:
        """The names in the order they were registered (for precisions: fp32 first, then fewer bits)."""
        self.discover_plugins()
        return list(self._entries)


def variant_name(base: str, changed: Mapping[str, Any]) -> str:
    """`base(k=v, ...)` with the parameters in name order, or `base` alone when there are none."""
    if not changed:
        return base
    return f"{base}({', '.join(f'{k}={compact_value(v)}' for k, v in sorted(changed.items()))})"


def plain_value(value: Any) -> Any:
    """A comparable form of a parameter value: YAML gives lists where a default is a tuple, 1 where it is 1.0."""
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def compact_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return str(value)


def _validate(adapters: Mapping[str, TypeAdapter], params: Mapping[str, Any], kind: str, name: str) -> None:
    """Hold each parameter against its annotation; the first misfit is one line naming it."""
    for key, value in params.items():
        if key not in adapters:
            continue
        try:
            adapters[key].validate_python(value)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{kind} {name!r} parameter {key!r} is {value!r}: {problem[:1].lower()}"
                              f"{problem[1:]}") from None


def _validate_construction(cls: type, kind: str, name: str) -> None:
    """Make `cls(...)` validate its arguments (those `_parameter_types` can check) before its own `__init__` runs.
    Values reach `__init__` as given: validation never converts them."""
    init = cls.__init__  # type: ignore[misc]
    signature = inspect.signature(init)

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return init(self, *args, **kwargs)  # Python's own message for a wrong call
        given = {key: value for key, value in list(bound.arguments.items())[1:]
                 if signature.parameters[key].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                       inspect.Parameter.KEYWORD_ONLY)}
        _validate(_parameter_types(cls), given, kind, name)
        return init(self, *args, **kwargs)

    cls.__init__ = checked_init  # type: ignore[misc]


@functools.cache
def _parameter_types(factory: Callable[..., Any]) -> dict[str, TypeAdapter]:
    """A validator per annotated parameter of a factory (a class's `__init__`, or a function). Each annotation is
    resolved on its own, so one naming a type only imported for type checkers leaves the others checked; a type
    pydantic cannot validate (a tensor, a module) is left to the factory."""
    target = inspect.unwrap(factory.__init__ if inspect.isclass(factory) else factory)
    namespace = dict(getattr(target, "__globals__", {}))
    adapters = {}
    for key, annotation in getattr(target, "__annotations__", {}).items():
        if key == "return":
            continue
        try:
            hint = eval(annotation, namespace) if isinstance(annotation, str) else annotation
            adapters[key] = TypeAdapter(hint)
        except Exception:
            continue
    return adapters
