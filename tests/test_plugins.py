"""Plugin manager: discovery, isolation of broken plugins, blocking, collisions, the hook contract."""

from __future__ import annotations

import inspect
import re
import pathlib
import types

import attrs
import pytest

import peft_kernel
from peft_kernel import hookimpl
from peft_kernel.config import PeftConfig
from peft_kernel.errors import UnknownMethodError
from peft_kernel.hookspecs import PeftKernelSpecs
from peft_kernel.plugins import build_registry, set_registry
from peft_kernel.records import BackendRecord, MethodRecord


class FakeDist:
    def __init__(self, name: str, version: str = "1.0") -> None:
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    def __init__(self, name: str, load, dist: str | None = None) -> None:
        self.name = name
        self._load = load
        self.dist = FakeDist(dist or f"dist-{name}")

    def load(self):
        return self._load()


@attrs.define(kw_only=True)
class FooConfig(PeftConfig):
    peft_type: str = "FOO"


@attrs.define(kw_only=True)
class OtherFooConfig(PeftConfig):
    peft_type: str = "FOO"


def method_plugin(peft_type: str = "FOO", prefix: str = "foo_", config_class: type = FooConfig) -> types.SimpleNamespace:
    @hookimpl
    def peft_kernel_register_methods(register):
        register(MethodRecord(peft_type=peft_type, config_class=config_class, prefix=prefix, capabilities={"mergeable"}))

    return types.SimpleNamespace(peft_kernel_register_methods=peft_kernel_register_methods)


def backend_plugin(name: str = "fake-backend") -> types.SimpleNamespace:
    @hookimpl
    def peft_kernel_register_backends(register):
        register(BackendRecord(name=name, description="a fake backend", exports={"FakeThing": "types:SimpleNamespace"}))

    return types.SimpleNamespace(peft_kernel_register_backends=peft_kernel_register_backends)


def statuses(registry):
    return {p.name: p for p in registry.plugins}


def test_entry_points_register_methods_and_backends():
    registry = build_registry(entry_points=[FakeEntryPoint("foo", method_plugin), FakeEntryPoint("be", backend_plugin)], disabled=[])
    assert registry.method("foo").config_class is FooConfig
    assert registry.method("FOO").distribution == "dist-foo"
    assert registry.backends["fake-backend"].distribution == "dist-be"
    rows = statuses(registry)
    assert rows["foo"].status == "loaded" and rows["foo"].methods == ["FOO"] and rows["foo"].version == "1.0"
    assert rows["be"].backends == ["fake-backend"]
    assert registry.export("FooConfig") is FooConfig
    assert registry.export("FakeThing") is types.SimpleNamespace


def test_plugin_failing_to_import_is_reported_not_fatal():
    def broken():
        raise ImportError("No module named 'missing_dependency'")

    registry = build_registry(entry_points=[FakeEntryPoint("broken", broken), FakeEntryPoint("foo", method_plugin)], disabled=[])
    rows = statuses(registry)
    assert rows["broken"].status == "failed"
    assert "missing_dependency" in rows["broken"].error
    assert rows["foo"].status == "loaded"
    assert "FOO" in registry.methods


def test_plugin_failing_in_registration_is_unregistered():
    @hookimpl
    def peft_kernel_register_methods(register):
        raise RuntimeError("boom while registering")

    bad = types.SimpleNamespace(peft_kernel_register_methods=peft_kernel_register_methods)
    registry = build_registry(entry_points=[FakeEntryPoint("bad", lambda: bad)], disabled=[])
    assert statuses(registry)["bad"].status == "failed"
    assert "boom while registering" in statuses(registry)["bad"].error
    assert not registry.pm.is_registered(bad)


def test_plugin_with_invalid_hookimpl_is_reported():
    @hookimpl
    def peft_kernel_create_layer(config, adapter_name, base_layer, module_name, not_an_argument):
        return None

    bad = types.SimpleNamespace(peft_kernel_create_layer=peft_kernel_create_layer)
    registry = build_registry(entry_points=[FakeEntryPoint("badsig", lambda: bad)], disabled=[])
    assert statuses(registry)["badsig"].status == "failed"
    assert "not_an_argument" in statuses(registry)["badsig"].error


def test_misspelt_hook_name_fails_the_plugin():
    @hookimpl
    def peft_kernel_create_layers(config, adapter_name, base_layer, module_name):
        return None

    typo = types.SimpleNamespace(peft_kernel_create_layers=peft_kernel_create_layers)
    registry = build_registry(entry_points=[FakeEntryPoint("typo", lambda: typo)], disabled=[])
    assert statuses(registry)["typo"].status == "failed"
    assert "unknown hook(s) ['peft_kernel_create_layers']" in statuses(registry)["typo"].error


def test_blocked_plugin_is_never_imported(monkeypatch):
    loaded = []

    def load():
        loaded.append(True)
        return method_plugin()

    monkeypatch.setenv("PEFT_KERNEL_DISABLE_PLUGINS", "other, foo")
    registry = build_registry(entry_points=[FakeEntryPoint("foo", load)])
    assert statuses(registry)["foo"].status == "blocked"
    assert loaded == []
    assert "FOO" not in registry.methods


def test_blocking_by_distribution_name():
    registry = build_registry(entry_points=[FakeEntryPoint("foo", method_plugin, dist="peft-kernel-foo")],
                              disabled=["peft-kernel-foo"])
    assert statuses(registry)["foo"].status == "blocked"


@pytest.mark.parametrize(
    "second, what",
    [
        (lambda: method_plugin(prefix="other_", config_class=OtherFooConfig), "peft_type 'FOO'"),
        (lambda: method_plugin(peft_type="BAR", config_class=OtherFooConfig), "state-dict prefix 'foo_'"),
        (lambda: method_plugin(peft_type="BAR", prefix="bar_"), "config class 'FooConfig'"),
    ],
)
def test_collisions_refuse_every_claimant_and_name_both(second, what):
    """With no known provider among them, neither plugin gets the contested name, whatever the order."""
    for order in (1, -1):
        eps = [FakeEntryPoint("first", method_plugin, dist="dist-one"), FakeEntryPoint("second", second, dist="dist-two")]
        registry = build_registry(entry_points=eps[::order], disabled=[])
        for name in ("first", "second"):
            row = statuses(registry)[name]
            assert row.status == "failed" and row.methods == []
            assert what in row.error and "dist-one" in row.error and "dist-two" in row.error
            assert "PEFT_KERNEL_DISABLE_PLUGINS=" in row.error
        assert "FOO" not in registry.methods and "BAR" not in registry.methods


def test_backend_collision_names_both():
    registry = build_registry(entry_points=[FakeEntryPoint("a", backend_plugin), FakeEntryPoint("b", backend_plugin)], disabled=[])
    for name in ("a", "b"):
        assert statuses(registry)[name].status == "failed"
        assert "dist-a" in statuses(registry)[name].error and "dist-b" in statuses(registry)[name].error
    assert "fake-backend" not in registry.backends


def test_unknown_peft_type_names_installed_methods_and_provider():
    registry = build_registry(entry_points=[FakeEntryPoint("foo", method_plugin)], disabled=[])
    with pytest.raises(UnknownMethodError) as info:
        registry.method("IA3")
    message = str(info.value)
    assert "'IA3'" in message and "FOO" in message and "pip install peft-kernel-ia3" in message
    with pytest.raises(UnknownMethodError, match="No known plugin provides it"):
        registry.method("SOMETHING_NEW")


def test_lora_plugin_is_discovered_through_its_entry_point():
    registry = build_registry(disabled=[])
    lora = registry.method("LORA")
    assert lora.distribution == "peft-kernel-lora"
    assert peft_kernel.LoraConfig is lora.config_class
    assert type(peft_kernel.LoraModel).__name__ == "type" and peft_kernel.LoraModel.__name__ == "LoraModel"
    with pytest.raises(AttributeError, match="install the plugin"):
        peft_kernel.NoSuchConfig  # noqa: B018


def test_core_imports_no_plugin():
    """The core never imports a plugin package and knows no method by name."""
    core = pathlib.Path(peft_kernel.__file__).parent
    for path in core.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) peft_kernel_\w+", text, re.M), f"{path} imports a plugin"
        assert not re.search(r"peft_type\s*==\s*['\"]", text), f"{path} branches on a method name"


def test_every_hookspec_is_documented_and_tested():
    specs = [name for name, _ in inspect.getmembers(PeftKernelSpecs, inspect.isfunction) if name.startswith("peft_kernel_")]
    assert len(specs) >= 6
    root = pathlib.Path(__file__).parents[1]
    test_files = [*root.glob("tests/test_*.py"), *root.glob("tests/core/*.py"), *root.glob("plugins/*/tests/test_*.py"), *root.glob("examples/*/tests/test_*.py")]
    tests_text = "\n".join(p.read_text() for p in test_files if p.name != pathlib.Path(__file__).name)
    for name in specs:
        doc = inspect.getdoc(getattr(PeftKernelSpecs, name)) or ""
        assert len(doc) > 200, f"hook spec {name} needs a full docstring (it is the plugin authors' contract)"
        assert name in tests_text, f"hook spec {name} is not exercised by any test"


def test_import_and_registry_stay_light():
    """`import peft_kernel` and building the registry (what list-plugins does) import no torch."""
    import subprocess
    import sys

    code = (
        "import sys, peft_kernel; from peft_kernel.plugins import get_registry; r = get_registry(); "
        "assert 'LORA' in r.methods; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize("factory", ["make_layer", "pkg.layers:", "pkg..layers:make", "pkg.layers:make.layer", "pkg layers:make", 3])
def test_malformed_layer_factory_fails_the_plugin(factory):
    @hookimpl
    def peft_kernel_register_methods(register):
        register(MethodRecord(peft_type="FOO", config_class=FooConfig, prefix="foo_", layer_factory=factory))

    plugin = types.SimpleNamespace(peft_kernel_register_methods=peft_kernel_register_methods)
    registry = build_registry(entry_points=[FakeEntryPoint("foo", lambda: plugin)], disabled=[])
    assert statuses(registry)["foo"].status == "failed"
    assert "PluginError" in statuses(registry)["foo"].error
    assert "'package.module:function'" in statuses(registry)["foo"].error
    assert "FOO" not in registry.methods


def test_tuner_class_is_generated_from_tuner_name_and_exported():
    """``tuner_name`` alone makes ``peft_kernel.<tuner_name>`` (no per-plugin tuner module, no ``exports`` entry)."""
    from peft_kernel.tuner import AdapterModel, tuner_class

    @hookimpl
    def peft_kernel_register_methods(register):
        register(MethodRecord(peft_type="FOO", config_class=FooConfig, prefix="foo_", tuner_name="FooModel"))

    plugin = types.SimpleNamespace(peft_kernel_register_methods=peft_kernel_register_methods)
    registry = build_registry(entry_points=[FakeEntryPoint("foo", lambda: plugin)], disabled=[])
    assert "FooModel" in registry.tuner_names() and "FooModel" in registry.exported_names()
    old = set_registry(registry)
    try:
        foo_model = peft_kernel.FooModel
    finally:
        set_registry(old)
    assert foo_model is tuner_class("FooModel") and issubclass(foo_model, AdapterModel)
    assert foo_model.__name__ == "FooModel"
    for record in build_registry().methods.values():
        if record.tuner_name and not record.supports("prompt_learning"):
            assert record.tuner_name not in record.exports, f"{record.peft_type} lists its generated tuner class"


def test_layer_factory_that_cannot_be_imported_is_a_named_error():
    from peft_kernel.errors import PluginError

    @hookimpl
    def peft_kernel_register_methods(register):
        register(MethodRecord(peft_type="FOO", config_class=FooConfig, prefix="foo_",
                              layer_factory="peft_kernel_no_such_plugin.layers:make_layer"))

    plugin = types.SimpleNamespace(peft_kernel_register_methods=peft_kernel_register_methods)
    registry = build_registry(entry_points=[FakeEntryPoint("foo", lambda: plugin, dist="peft-kernel-foo")], disabled=[])
    assert registry.layer_factory(OtherFooConfig()) is None  # not an instance of the record's config class
    with pytest.raises(PluginError, match=r"FOO's layer_factory 'peft_kernel_no_such_plugin.layers:make_layer' "
                                          r"\(from 'peft-kernel-foo'\) cannot be imported: ModuleNotFoundError"):
        registry.layer_factory(FooConfig())
