"""Plugin discovery, the registry of methods and backends, and run-time isolation of plugins.

Entry points of the ``peft_kernel`` group are loaded one at a time: a plugin that fails to import
or to register (an exception, even ``sys.exit()``) is recorded as ``failed`` with its error and
never breaks the others. Plugins named in ``PEFT_KERNEL_DISABLE_PLUGINS`` (comma separated
entry-point or distribution names) are ``blocked`` before import. The core's own default
implementations are registered exactly like an external plugin.

Collisions (two plugins claiming one peft_type, state-dict prefix, config class name or backend
name) do not depend on installation order: the method's provider by the naming rule
(:func:`provider_of`: ``LORA`` -> ``peft-kernel-lora``) keeps
it and the other claimants fail; with no known provider among them, all of them fail.

At run time the core calls hook implementations one by one (``Registry.call_hook``, behind the
typed facade ``Registry.create_layer``, ``.merge``...): when a plugin's
implementation raises while handling a config or layer of *another* plugin's method, that plugin
is marked ``failing`` (with the error), a :class:`~peft_kernel.errors.PluginWarning` names it, and
the call carries on with the other implementations, so one broken plugin cannot break the others.
Errors of the method's own plugin, of the core, deliberate refusals (peft-kernel errors and
``NotImplementedError``) and out-of-memory errors propagate.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import re
import threading
import warnings
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Mapping

import attrs
import pluggy

from peft_kernel.hookspecs import PeftKernelSpecs
from peft_kernel.errors import PeftKernelError, PluginError, PluginWarning, UnknownMethodError
from peft_kernel.markers import PROJECT_NAME
from peft_kernel.records import BackendRecord, MethodRecord

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import torch
    from torch import nn

    from peft_kernel.config import PeftConfig
    from peft_kernel.host import AdapterHost
    from peft_kernel.layer import AdapterLayer

DISABLE_ENV = "PEFT_KERNEL_DISABLE_PLUGINS"
BUILTIN_PLUGINS = ("peft_kernel.defaults",)
CORE = "core"
"""The plugin name of the core's own implementations (``peft_kernel.defaults``)."""


@attrs.define
class PluginStatus:
    """One row of ``peft-kernel list-plugins``."""

    name: str
    distribution: str
    version: str
    status: str  # "loaded" | "blocked" | "failed" (at load) | "failing" (a hook raised at run time)
    error: str = ""
    methods: list[str] = attrs.field(factory=list)
    backends: list[str] = attrs.field(factory=list)
    hooks: list[str] = attrs.field(factory=list)
    """The hooks it implements, ``peft_kernel_`` dropped (``register_commands``, ``create_host``...)."""


@attrs.define
class Registry:
    """The loaded plugin manager plus every method and backend the plugins registered."""

    pm: pluggy.PluginManager
    methods: dict[str, MethodRecord] = attrs.field(factory=dict)
    backends: dict[str, BackendRecord] = attrs.field(factory=dict)
    plugins: list[PluginStatus] = attrs.field(factory=list)

    _lock: threading.Lock = attrs.field(factory=threading.Lock, repr=False, eq=False)
    _factories: dict[str, Callable[..., Any]] = attrs.field(factory=dict, repr=False, eq=False)

    def status_of(self, plugin_name: str) -> PluginStatus | None:
        for status in self.plugins:
            if status.name == plugin_name:
                return status
        return None

    def call_hook(self, hook_name: str, kwargs: dict[str, Any]) -> Any:
        """Call ``hook_name`` as pluggy would (``tryfirst`` first, ``trylast`` last; first result
        or the list of results) but one implementation at a time, skipping ``failing`` plugins.

        An exception from the core's or the owning method's plugin, any
        :class:`~peft_kernel.errors.PeftKernelError` or ``NotImplementedError`` (a deliberate
        refusal) and out-of-memory errors propagate with a note
        naming the plugin and hook. Anything else raised by a plugin while handling another
        plugin's method marks that plugin ``failing`` and the call goes on without it."""
        caller = getattr(self.pm.hook, hook_name)
        firstresult = bool(caller.spec is not None and caller.spec.opts.get("firstresult"))
        owner = self._owner(kwargs)
        results = []
        for impl in reversed(caller.get_hookimpls()):
            status = self.status_of(impl.plugin_name)
            if status is not None and status.status == "failing":
                continue
            try:
                result = impl.function(*(kwargs[name] for name in impl.argnames))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                if not _isolate(status, owner, exc):
                    _note_source(exc, impl.plugin_name, status, hook_name)
                    raise
                self._mark_failing(status, hook_name, exc)
                continue
            if result is not None:
                if firstresult:
                    return result
                results.append(result)
        return None if firstresult else results

    # The typed facade: the core calls hooks through these, never through ``hook.<name>`` directly.

    def prepare_config(self, config: PeftConfig, model: nn.Module) -> None:
        """Every plugin's ``peft_kernel_prepare_config`` for ``config``."""
        self.call_hook("peft_kernel_prepare_config", {"config": config, "model": model})

    def release_config(self, config: PeftConfig, model: nn.Module, remaining: list[PeftConfig]) -> None:
        """Every plugin's ``peft_kernel_release_config`` for ``config``."""
        self.call_hook("peft_kernel_release_config", {"config": config, "model": model, "remaining": remaining})

    def match_target(self, config: PeftConfig, module_name: str, module: nn.Module, model: nn.Module) -> bool:
        """Whether ``module`` gets an adapter of ``config`` (``peft_kernel_match_target``)."""
        kwargs = {"config": config, "module_name": module_name, "module": module, "model": model}
        return bool(self.call_hook("peft_kernel_match_target", kwargs))

    def adapter_injected(self, config: PeftConfig, model: nn.Module, adapter_name: str) -> None:
        """Every plugin's ``peft_kernel_adapter_injected`` for ``config``."""
        self.call_hook("peft_kernel_adapter_injected", {"config": config, "model": model, "adapter_name": adapter_name})

    def create_layer(self, config: PeftConfig, adapter_name: str, base_layer: nn.Module,
                     module_name: str, shared: dict[str, torch.Tensor] | None = None) -> AdapterLayer | None:
        """The adapter layer wrapping ``base_layer``: the first ``peft_kernel_create_layer`` answer,
        else the ``layer_factory`` this registry's record declares for ``config`` (given ``shared=``
        only when there are shared tensors); ``None`` when neither wraps it."""
        shared = shared or {}
        kwargs = {"config": config, "adapter_name": adapter_name, "base_layer": base_layer, "module_name": module_name,
                  "shared": shared}
        layer = self.call_hook("peft_kernel_create_layer", kwargs)
        if layer is None:
            factory = self.layer_factory(config)
            extra = {"shared": shared} if shared else {}
            layer = None if factory is None else factory(config, adapter_name, base_layer, module_name, **extra)
        return layer

    def create_parameter_layer(self, config: PeftConfig, adapter_name: str, base_layer: nn.Module, module_name: str,
                               parameter_name: str) -> AdapterLayer | None:
        """The adapter layer on ``<module_name>.<parameter_name>`` (``peft_kernel_create_parameter_layer``)."""
        kwargs = {"config": config, "adapter_name": adapter_name, "base_layer": base_layer, "module_name": module_name,
                  "parameter_name": parameter_name}
        return self.call_hook("peft_kernel_create_parameter_layer", kwargs)

    def create_shared_tensors(self, config: PeftConfig, adapter_name: str,
                              targets: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
        """The new adapter's model-level tensors (``peft_kernel_create_shared_tensors``; empty when none)."""
        kwargs = {"config": config, "adapter_name": adapter_name, "targets": targets}
        return self.call_hook("peft_kernel_create_shared_tensors", kwargs) or {}

    def merge(self, layer: AdapterLayer, adapter_name: str, safe_merge: bool = False,
              direction: Literal["merge", "unmerge"] = "merge") -> bool:
        """Fold ``adapter_name`` into (or out of) ``layer``'s base weights (``peft_kernel_merge``)."""
        kwargs = {"layer": layer, "adapter_name": adapter_name, "safe_merge": safe_merge, "direction": direction}
        return bool(self.call_hook("peft_kernel_merge", kwargs))

    def map_state_dict(self, config: PeftConfig, state_dict: dict[str, torch.Tensor],
                       direction: Literal["load", "save"]) -> dict[str, torch.Tensor]:
        """``state_dict`` as ``peft_kernel_map_state_dict`` rewrites it (unchanged when no plugin does)."""
        kwargs = {"config": config, "state_dict": state_dict, "direction": direction}
        mapped = self.call_hook("peft_kernel_map_state_dict", kwargs)
        return state_dict if mapped is None else mapped

    def convert_for_original_base(self, config: PeftConfig, state_dict: dict[str, torch.Tensor],
                                  initial_state_dict: dict[str, torch.Tensor]
                                  ) -> tuple[dict[str, torch.Tensor], PeftConfig] | None:
        """``peft_kernel_convert_for_original_base``'s answer, or ``None`` when no plugin converts."""
        kwargs = {"config": config, "state_dict": state_dict, "initial_state_dict": initial_state_dict}
        return self.call_hook("peft_kernel_convert_for_original_base", kwargs)

    def combine_adapters(self, config: PeftConfig, adapters: list[str], configs: list[PeftConfig],
                         weights: list[float], combination_type: str, options: dict[str, Any]
                         ) -> tuple[PeftConfig, Callable[[AdapterLayer, str], None]] | None:
        """``peft_kernel_combine_adapters``'s plan, or ``None`` when no plugin combines ``config``'s method."""
        kwargs = {"config": config, "adapters": adapters, "configs": configs, "weights": weights,
                  "combination_type": combination_type, "options": options}
        return self.call_hook("peft_kernel_combine_adapters", kwargs)

    def create_host(self, record: MethodRecord, model: nn.Module, config: PeftConfig,
                    adapter_name: str) -> AdapterHost:
        """The adapter host of a new ``PeftModel`` (``peft_kernel_create_host``; the core's default
        is the method's tuner)."""
        kwargs = {"record": record, "model": model, "config": config, "adapter_name": adapter_name}
        return self.call_hook("peft_kernel_create_host", kwargs)

    def training_step(self, model: nn.Module, global_step: int) -> None:
        """Every plugin's ``peft_kernel_training_step``: call once per optimizer step, after
        ``optimizer.step()`` and before the gradients are zeroed."""
        self.call_hook("peft_kernel_training_step", {"model": model, "global_step": global_step})

    def register_commands(self, subparsers: Any) -> None:
        """Every plugin's ``peft_kernel_register_commands``."""
        self.call_hook("peft_kernel_register_commands", {"subparsers": subparsers})

    def _owner(self, kwargs: dict[str, Any]) -> str | None:
        """The distribution whose method this hook call is about (from ``config`` or ``layer``)."""
        subject = kwargs.get("config", kwargs.get("layer"))
        peft_type = getattr(subject, "peft_type", None)
        if not peft_type:
            return None
        record = self.methods.get(str(getattr(peft_type, "value", peft_type)).upper())
        return record.distribution if record is not None else None

    def _mark_failing(self, status: PluginStatus, hook_name: str, exc: BaseException) -> None:
        with self._lock:
            if status.status == "failing":
                return
            status.status, status.error = "failing", f"{hook_name} raised {_describe(exc)}"
        warnings.warn(
            f"plugin {status.name!r} (distribution {status.distribution!r}) failed in {hook_name}: "
            f"{_describe(exc).rstrip('.')}. It is disabled for the rest of this process and the other plugins carry on; "
            f"`peft-kernel list-plugins` lists it as failing. Update or uninstall it, or block it with "
            f"{DISABLE_ENV}={status.name}.",
            PluginWarning,
            stacklevel=4,
        )

    def method(self, peft_type: Any) -> MethodRecord:
        """The record for ``peft_type`` (a string or enum); a clear error when none provides it."""
        key = str(getattr(peft_type, "value", peft_type)).upper()
        if key in self.methods:
            return self.methods[key]
        installed = ", ".join(sorted(self.methods)) or "none"
        install = f" {install_hint(key)}"
        raise UnknownMethodError(
            f"Unknown peft_type {key!r}: no installed peft-kernel plugin provides it "
            f"(installed methods: {installed}).{install} `peft-kernel list-plugins` shows what is installed."
        )

    def method_for_config(self, config: Any) -> MethodRecord:
        return self.method(config.peft_type)

    def layer_factory(self, config: PeftConfig) -> Callable[..., AdapterLayer | None] | None:
        """The ``layer_factory`` of the method whose ``config_class`` ``config`` is an instance of
        (the most derived one when several match), imported on first use; ``None`` when no such
        method declares one. A factory that cannot be imported is a :class:`PluginError` naming it."""
        mro = type(config).__mro__
        records = [r for r in self.methods.values() if r.layer_factory and r.config_class in mro]
        if not records:
            return None
        record = min(records, key=lambda r: mro.index(r.config_class))
        factory = self._factories.get(record.layer_factory)
        if factory is None:
            try:
                factory = import_object(record.layer_factory)
            except (ImportError, AttributeError) as exc:
                raise PluginError(f"{record.peft_type}'s layer_factory {record.layer_factory!r} (from "
                                  f"{record.distribution or 'its plugin'!r}) cannot be imported: {_describe(exc)}") from exc
            self._factories[record.layer_factory] = factory
        return factory

    def tuner_names(self) -> set[str]:
        """The ``tuner_name`` of every installed layer method: the core generates and exports those
        classes (``peft_kernel.LoraModel``)."""
        return {r.tuner_name for r in self.methods.values() if r.tuner_name and not r.supports("prompt_learning")}

    def export(self, name: str) -> Any:
        """A public name provided by a plugin (config classes and ``exports``), or AttributeError."""
        for record in self.methods.values():
            if record.config_class.__name__ == name:
                return record.config_class
        for record in [*self.methods.values(), *self.backends.values()]:
            if name in record.exports:
                return import_object(record.exports[name])
        raise AttributeError(name)

    def exported_names(self) -> list[str]:
        names = [r.config_class.__name__ for r in self.methods.values()]
        names.extend(self.tuner_names())
        for record in [*self.methods.values(), *self.backends.values()]:
            names.extend(record.exports)
        return sorted(set(names))


OBJECT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
"""``"package.module:name"``, the form of ``MethodRecord.layer_factory``, ``tuner_mixin`` and of ``exports`` values."""


def import_object(path: str) -> Any:
    """The object ``path`` (``"package.module:name"``) names, importing its module."""
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def provider_of(peft_type: str) -> str:
    """The distribution that provides ``peft_type`` by the naming rule: ``peft-kernel-`` and the
    type in lower case, ``_`` as ``-`` (``PREFIX_TUNING`` -> ``peft-kernel-prefix-tuning``)."""
    return "peft-kernel-" + str(peft_type).lower().replace("_", "-")


def install_hint(peft_type: str) -> str:
    """One sentence on where an uninstalled method comes from: its plugin for HF PEFT's method
    names (:class:`~peft_kernel.enums.PeftType`), else the name such a plugin would have."""
    from peft_kernel.enums import PeftType

    key = str(getattr(peft_type, "value", peft_type)).upper()
    if key in PeftType.__members__:
        return f"Install it with `pip install {provider_of(key)}`."
    return f"No known plugin provides it (one would be named {provider_of(key)!r})."


def _isolate(status: PluginStatus | None, owner: str | None, exc: BaseException) -> bool:
    """Whether ``exc`` marks a plugin broken (isolated) rather than being the caller's error. The
    owning method's plugin and the distributions it depends on (its family library) are not
    isolated: their errors are the method's own."""
    if status is None or status.name == CORE:
        return False
    if owner is not None and _canonical(status.distribution) in _with_requirements(owner):
        return False
    if isinstance(exc, (PeftKernelError, NotImplementedError, MemoryError)) or type(exc).__name__ == "OutOfMemoryError":
        return False  # a deliberate refusal ("not supported"), or out of memory: not the plugin's fault
    return True


@functools.lru_cache(maxsize=None)
def _with_requirements(dist: str) -> frozenset[str]:
    """``dist`` and the distributions it requires, by canonical name (:func:`_canonical`)."""
    try:
        requires = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        requires = []
    names = {re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0] for req in requires}
    return frozenset({_canonical(dist), *map(_canonical, names)})


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _note_source(exc: BaseException, plugin_name: str, status: PluginStatus | None, hook_name: str) -> None:
    dist = f" (distribution {status.distribution!r})" if status is not None and status.distribution != plugin_name else ""
    note = f"raised in {hook_name} by plugin {plugin_name!r}{dist}"
    if note not in getattr(exc, "__notes__", ()):
        try:
            exc.add_note(note)
        except Exception:  # pragma: no cover - an exception type refusing notes
            pass


def _disabled_names() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=PROJECT_NAME), key=lambda ep: ep.name)


def _dist_of(ep: Any) -> tuple[str, str]:
    try:
        dist = getattr(ep, "dist", None)
        if dist is None:
            return str(ep.name), ""
        return str(dist.metadata["Name"] or ep.name), str(dist.version or "")
    except Exception:  # broken metadata: the entry point is still listed, under its own name
        return str(ep.name), ""


def _collect(pm: pluggy.PluginManager, hook_name: str, plugin: object) -> list[Any]:
    """Call one plugin's registration hook and return what it registered."""
    records: list[Any] = []
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        if impl.plugin is plugin:
            impl.function(*(records.append if a == "register" else None for a in impl.argnames))
    return records


def _known_hooks(pm: pluggy.PluginManager) -> list[str]:
    """The hooks with a spec: the core's and those plugins added (``peft_kernel_add_hookspecs``)."""
    return sorted(name for name, caller in vars(pm.hook).items()
                  if name.startswith("peft_kernel_") and getattr(caller, "spec", None) is not None)


def _check_hooks(pm: pluggy.PluginManager, plugin: object) -> None:
    """A hookimpl with no spec is a typo (``peft_kernel_create_layers``): it would never run. Hook
    wrappers are refused: the core calls implementations one by one to isolate failures."""
    callers = pm.get_hookcallers(plugin) or []
    unknown = sorted(caller.name for caller in callers if caller.spec is None)
    if unknown:
        specs = _known_hooks(pm)
        raise PluginError(f"implements unknown hook(s) {unknown}; known hooks: {specs}")
    wrappers = sorted(
        caller.name for caller in callers for impl in caller.get_hookimpls()
        if impl.plugin is plugin and (impl.hookwrapper or impl.wrapper)
    )
    if wrappers:
        raise PluginError(f"implements {wrappers} as hook wrapper(s); peft-kernel hooks take plain implementations only")


def _is_config_class(value: Any) -> bool:
    """Whether ``value`` subclasses ``PeftConfig``. A subclass exists only once ``peft_kernel.config``
    is imported, so the check reads it from ``sys.modules`` and the registry never imports the config
    module (which looks classes up in the registry: no import cycle)."""
    config = sys.modules.get("peft_kernel.config")
    return config is not None and isinstance(value, type) and issubclass(value, config.PeftConfig)


def _check_records(methods: list[Any], backends: list[Any]) -> None:
    for record in methods:
        if not isinstance(record, MethodRecord):
            raise PluginError(f"registered {record!r}, expected a peft_kernel.records.MethodRecord")
        if not _is_config_class(record.config_class):
            raise PluginError(f"registered {record.peft_type!r} with config_class {record.config_class!r}, "
                              "which is not a peft_kernel.config.PeftConfig subclass")
        for field in ("peft_type", "prefix"):
            value = getattr(record, field)
            if not isinstance(value, str) or not value:
                raise PluginError(f"registered a method whose {field} is {value!r}; it must be a non-empty string")
        factory = record.layer_factory
        if factory and not (isinstance(factory, str) and OBJECT_PATH.fullmatch(factory)):
            raise PluginError(f"registered {record.peft_type!r} with layer_factory {factory!r}; it must be "
                              "'package.module:function' (e.g. 'peft_kernel_lora.layers:make_layer')")
        mixin = record.tuner_mixin
        if mixin and not (isinstance(mixin, str) and OBJECT_PATH.fullmatch(mixin)):
            raise PluginError(f"registered {record.peft_type!r} with tuner_mixin {mixin!r}; it must be "
                              "'package.module:Class'")
    for record in backends:
        if not isinstance(record, BackendRecord):
            raise PluginError(f"registered {record!r}, expected a peft_kernel.records.BackendRecord")
        if not isinstance(record.name, str) or not record.name:
            raise PluginError(f"registered a backend named {record.name!r}; the name must be a non-empty string")


@attrs.define
class _Candidate:
    """A plugin that imported and registered, before collisions are settled."""

    status: PluginStatus
    plugin: object
    methods: list[MethodRecord]
    backends: list[BackendRecord]
    problems: list[str] = attrs.field(factory=list)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _fail(registry: Registry, status: PluginStatus, plugin: object | None, error: str) -> None:
    if plugin is not None and registry.pm.is_registered(plugin):
        registry.pm.unregister(plugin)
    status.status, status.error = "failed", error
    status.methods.clear()
    status.backends.clear()


def _add_specs(registry: Registry, status: PluginStatus, plugin: object) -> bool:
    """Let ``plugin`` add its hook specs (``peft_kernel_add_hookspecs``) before any plugin is
    registered, so implementations of added hooks are checked against their spec whatever the
    order of loading. False (the plugin reported as failed) if it raises."""
    function = getattr(plugin, "peft_kernel_add_hookspecs", None)
    if function is None or registry.pm.parse_hookimpl_opts(plugin, "peft_kernel_add_hookspecs") is None:
        return True
    try:
        function(**({"pm": registry.pm} if "pm" in inspect.signature(function).parameters else {}))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a broken plugin is reported, never fatal
        _fail(registry, status, None, _describe(exc))
        return False
    return True


def _register(registry: Registry, status: PluginStatus, plugin: object) -> _Candidate | None:
    """Register ``plugin`` and collect its records; a plugin that raises anything (``SystemExit``
    included, ``KeyboardInterrupt`` excepted) is reported as failed, never fatal."""
    try:
        registry.pm.register(plugin, name=status.name)
        _check_hooks(registry.pm, plugin)
        methods = _collect(registry.pm, "peft_kernel_register_methods", plugin)
        backends = _collect(registry.pm, "peft_kernel_register_backends", plugin)
        _check_records(methods, backends)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a broken plugin is reported, never fatal
        _fail(registry, status, plugin, _describe(exc))
        return None
    return _Candidate(status, plugin, methods, backends)


def _claims(candidate: _Candidate) -> Iterator[tuple[tuple[str, str], str | None]]:
    """Every name ``candidate`` claims, as ``((kind, value), peft_type or None for a backend)``."""
    for record in candidate.methods:
        peft_type = record.peft_type.upper()
        yield ("peft_type", peft_type), peft_type
        yield ("state-dict prefix", record.prefix), peft_type
        yield ("config class", record.config_class.__name__), peft_type
    for backend in candidate.backends:
        yield ("backend", backend.name), None


def _settle_collisions(candidates: list[_Candidate]) -> None:
    """Two plugins claiming one peft_type, state-dict prefix, config class name or backend name:
    the method's provider by the naming rule (:func:`provider_of`) keeps it and the others fail; with no
    known provider among them, every claimant fails. Order of installation never decides."""
    claims: dict[tuple[str, str], list[tuple[_Candidate, str | None]]] = {}
    for candidate in candidates:
        mine: set[tuple[str, str]] = set()
        for key, peft_type in _claims(candidate):
            if key in mine:
                candidate.problems.append(f"it registers the {key[0]} {key[1]!r} twice")
                continue
            mine.add(key)
            claims.setdefault(key, []).append((candidate, peft_type))
    for (kind, value), claimants in claims.items():
        if len(claimants) < 2:
            continue
        known = [c for c, peft_type in claimants if peft_type is not None and provider_of(peft_type) == c.status.distribution]
        names = " and ".join(f"{c.status.distribution!r} (plugin {c.status.name!r})" for c, _ in claimants)
        if len(known) == 1:
            winner = known[0]
            for candidate, _ in claimants:
                if candidate is not winner:
                    candidate.problems.append(
                        f"the {kind} {value!r} belongs to {winner.status.distribution!r}, which provides it; "
                        f"{names} both claim it. Uninstall {candidate.status.distribution!r}, or block it with "
                        f"{DISABLE_ENV}={candidate.status.name}"
                    )
        else:
            for candidate, _ in claimants:
                others = ",".join(c.status.name for c, _ in claimants if c is not candidate)
                candidate.problems.append(
                    f"two plugins claim the {kind} {value!r}: {names}; neither gets it. Uninstall one, or block "
                    f"the other with {DISABLE_ENV}={others}"
                )


def _commit(registry: Registry, candidate: _Candidate) -> None:
    if candidate.problems:
        _fail(registry, candidate.status, candidate.plugin, "PluginError: " + "; ".join(candidate.problems))
        return
    dist = candidate.status.distribution
    candidate.status.hooks = sorted(
        impl_name.removeprefix("peft_kernel_") for impl_name, caller in vars(registry.pm.hook).items()
        if impl_name.startswith("peft_kernel_") and any(i.plugin is candidate.plugin for i in caller.get_hookimpls())
    )
    for record in candidate.methods:
        registry.methods[record.peft_type.upper()] = attrs.evolve(record, distribution=dist)
        candidate.status.methods.append(record.peft_type.upper())
    for record in candidate.backends:
        registry.backends[record.name] = attrs.evolve(record, distribution=dist)
        candidate.status.backends.append(record.name)


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
    loaded: list[tuple[PluginStatus, object]] = []  # statuses listed in loading order
    for module_name in BUILTIN_PLUGINS:
        loaded.append((PluginStatus(CORE, "peft-kernel", _version("peft-kernel"), "loaded"),
                       importlib.import_module(module_name)))
        registry.plugins.append(loaded[-1][0])
    for ep in _entry_points() if entry_points is None else entry_points:
        dist, version = _dist_of(ep)
        status = PluginStatus(str(ep.name), dist, version, "loaded")
        if ep.name in blocked or dist in blocked:
            status.status = "blocked"
            registry.plugins.append(status)
            continue
        try:
            plugin = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # ImportError, a plugin calling sys.exit() at import...
            status.status, status.error = "failed", _describe(exc)
            registry.plugins.append(status)
            continue
        loaded.append((status, plugin))
        registry.plugins.append(status)
    for name, plugin in (extra_plugins or {}).items():
        loaded.append((PluginStatus(name, name, "", "loaded"), plugin))
        registry.plugins.append(loaded[-1][0])
    # every plugin's own hook specs are in before any plugin is registered and its hooks checked
    loaded = [(status, plugin) for status, plugin in loaded if _add_specs(registry, status, plugin)]
    candidates = [_register(registry, status, plugin) for status, plugin in loaded]
    settled = [c for c in candidates if c is not None]
    _settle_collisions(settled)
    for candidate in settled:
        _commit(registry, candidate)
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
