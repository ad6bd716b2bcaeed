"""Plugin discovery and the registry of methods and backends.

Entry points of the ``peft_kernel`` group are loaded one at a time: a plugin that fails to import
or to register is recorded as ``failed`` with its error and never breaks the others. Plugins named
in ``PEFT_KERNEL_DISABLE_PLUGINS`` (comma separated entry-point or distribution names) are
``blocked`` before import. The core's own default implementations are registered exactly like an
external plugin.
"""

from __future__ import annotations

import importlib
import os
import threading
from importlib import metadata
from typing import Any, Iterable, Mapping

import attrs
import pluggy

from peft_kernel.hookspecs import PeftKernelSpecs
from peft_kernel.errors import PluginError, UnknownMethodError
from peft_kernel.known_methods import PROVIDERS
from peft_kernel.markers import PROJECT_NAME
from peft_kernel.records import BackendRecord, MethodRecord

DISABLE_ENV = "PEFT_KERNEL_DISABLE_PLUGINS"
BUILTIN_PLUGINS = ("peft_kernel.defaults",)


@attrs.define
class PluginStatus:
    """One row of ``peft-kernel list-plugins``."""

    name: str
    distribution: str
    version: str
    status: str  # "loaded" | "blocked" | "failed"
    error: str = ""
    methods: list[str] = attrs.field(factory=list)
    backends: list[str] = attrs.field(factory=list)


@attrs.define
class Registry:
    """The loaded plugin manager plus every method and backend the plugins registered."""

    pm: pluggy.PluginManager
    methods: dict[str, MethodRecord] = attrs.field(factory=dict)
    backends: dict[str, BackendRecord] = attrs.field(factory=dict)
    plugins: list[PluginStatus] = attrs.field(factory=list)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def method(self, peft_type: Any) -> MethodRecord:
        """The record for ``peft_type`` (a string or enum); a clear error when none provides it."""
        key = str(getattr(peft_type, "value", peft_type)).upper()
        if key in self.methods:
            return self.methods[key]
        installed = ", ".join(sorted(self.methods)) or "none"
        hint = PROVIDERS.get(key)
        install = f" Install it with `pip install {hint}`." if hint else " No known plugin provides it."
        raise UnknownMethodError(
            f"Unknown peft_type {key!r}: no installed peft-kernel plugin provides it "
            f"(installed methods: {installed}).{install} `peft-kernel list-plugins` shows what is installed."
        )

    def method_for_config(self, config: Any) -> MethodRecord:
        return self.method(config.peft_type)

    def export(self, name: str) -> Any:
        """A public name provided by a plugin (config classes and ``exports``), or AttributeError."""
        for record in self.methods.values():
            if record.config_class.__name__ == name:
                return record.config_class
        for record in [*self.methods.values(), *self.backends.values()]:
            if name in record.exports:
                module_name, _, attr = record.exports[name].partition(":")
                return getattr(importlib.import_module(module_name), attr)
        raise AttributeError(name)

    def exported_names(self) -> list[str]:
        names = [r.config_class.__name__ for r in self.methods.values()]
        for record in [*self.methods.values(), *self.backends.values()]:
            names.extend(record.exports)
        return sorted(names)


def _disabled_names() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=PROJECT_NAME), key=lambda ep: ep.name)


def _dist_of(ep: Any) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ep.name, ""
    return dist.metadata["Name"] or ep.name, dist.version or ""


def _collect(pm: pluggy.PluginManager, hook_name: str, plugin: object) -> list[Any]:
    """Call one plugin's registration hook and return what it registered."""
    records: list[Any] = []
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        if impl.plugin is plugin:
            impl.function(register=records.append)
    return records


def _add_records(registry: Registry, status: PluginStatus, plugin: object) -> None:
    methods = _collect(registry.pm, "peft_kernel_register_methods", plugin)
    backends = _collect(registry.pm, "peft_kernel_register_backends", plugin)
    for record in methods:
        if not isinstance(record, MethodRecord):
            raise PluginError(f"registered {record!r}, expected a peft_kernel.records.MethodRecord")
    for record in backends:
        if not isinstance(record, BackendRecord):
            raise PluginError(f"registered {record!r}, expected a peft_kernel.records.BackendRecord")
    for record in methods:
        key = record.peft_type.upper()
        for other in registry.methods.values():
            clash = (
                ("peft_type", key) if other.peft_type.upper() == key
                else ("state-dict prefix", record.prefix) if other.prefix == record.prefix
                else ("config class", record.config_class.__name__)
                if other.config_class.__name__ == record.config_class.__name__
                else None
            )
            if clash:
                raise PluginError(
                    f"two plugins provide the {clash[0]} {clash[1]!r}: {other.distribution!r} and "
                    f"{status.distribution!r}. Uninstall one, or block it with {DISABLE_ENV}={status.name}."
                )
    for record in backends:
        if record.name in registry.backends:
            other = registry.backends[record.name]
            raise PluginError(
                f"two plugins provide the backend {record.name!r}: {other.distribution!r} and "
                f"{status.distribution!r}. Uninstall one, or block it with {DISABLE_ENV}={status.name}."
            )
    for record in methods:
        registry.methods[record.peft_type.upper()] = attrs.evolve(record, distribution=status.distribution)
        status.methods.append(record.peft_type.upper())
    for record in backends:
        registry.backends[record.name] = attrs.evolve(record, distribution=status.distribution)
        status.backends.append(record.name)


def _check_hook_names(pm: pluggy.PluginManager, plugin: object) -> None:
    """A hookimpl with no spec is a typo (``peft_kernel_create_layers``): it would never run."""
    unknown = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [] if caller.spec is None)
    if unknown:
        specs = sorted(n for n in dir(PeftKernelSpecs) if n.startswith("peft_kernel_"))
        raise PluginError(f"implements unknown hook(s) {unknown}; known hooks: {specs}")


def _register(registry: Registry, status: PluginStatus, plugin: object) -> None:
    try:
        registry.pm.register(plugin, name=status.name)
        _check_hook_names(registry.pm, plugin)
        _add_records(registry, status, plugin)
    except Exception as exc:  # a broken plugin is reported, never fatal
        if registry.pm.is_registered(plugin):
            registry.pm.unregister(plugin)
        status.status, status.error = "failed", f"{type(exc).__name__}: {exc}"
        status.methods.clear()
        status.backends.clear()
    registry.plugins.append(status)


def build_registry(
    entry_points: Iterable[Any] | None = None,
    extra_plugins: Mapping[str, object] | None = None,
    disabled: Iterable[str] | None = None,
) -> Registry:
    """Build a fresh plugin manager and registry.

    ``entry_points`` defaults to the installed ``peft_kernel`` entry points; tests pass fakes
    (objects with ``name``, ``load()`` and optionally ``dist``). ``extra_plugins`` registers
    in-process plugin objects by name, as if they came from entry points.
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(PeftKernelSpecs)
    registry = Registry(pm=pm)
    blocked = _disabled_names() if disabled is None else set(disabled)
    for module_name in BUILTIN_PLUGINS:
        _register(registry, PluginStatus("core", "peft-kernel", _version("peft-kernel"), "loaded"),
                  importlib.import_module(module_name))
    for ep in _entry_points() if entry_points is None else entry_points:
        dist, version = _dist_of(ep)
        status = PluginStatus(ep.name, dist, version, "loaded")
        if ep.name in blocked or dist in blocked:
            status.status = "blocked"
            registry.plugins.append(status)
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            status.status, status.error = "failed", f"{type(exc).__name__}: {exc}"
            registry.plugins.append(status)
            continue
        _register(registry, status, plugin)
    for name, plugin in (extra_plugins or {}).items():
        _register(registry, PluginStatus(name, name, "", "loaded"), plugin)
    return registry


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = build_registry()
        return _registry


def set_registry(registry: Registry | None) -> Registry | None:
    """Replace the process-wide registry (``None`` rebuilds it on next use); returns the old one."""
    global _registry
    with _lock:
        old, _registry = _registry, registry
        return old
