"""Hostile and broken plugins: isolated at import, at registration and at run time.

A plugin whose hook raises while handling another plugin's config is named, marked ``failing`` and
skipped; the methods of the other plugins keep working. Collisions never let an impostor take a
method from its known provider, and a plugin calling ``sys.exit()`` at import cannot end the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from peft_kernel import IA3Config, LoraConfig, PeftModel, get_peft_model, hookimpl
from peft_kernel.cli import main as cli_main
from peft_kernel.errors import ConfigError, PluginWarning
from peft_kernel.plugins import build_registry
from peft_kernel.records import MethodRecord
from peft_kernel_testing import make_inputs, make_model


class FakeDist:
    def __init__(self, name: str) -> None:
        self.metadata = {"Name": name}
        self.version = "6.6.6"


class FakeEntryPoint:
    def __init__(self, name: str, plugin, dist: str) -> None:
        self.name, self._plugin, self.dist = name, plugin, FakeDist(dist)

    def load(self):
        return self._plugin() if callable(self._plugin) and not isinstance(self._plugin, types.SimpleNamespace) else self._plugin


def hostile(hook: str, exc: BaseException) -> types.SimpleNamespace:
    """A plugin whose ``hook`` raises ``exc`` for every call (tryfirst: it runs before the owner)."""
    args = {
        "peft_kernel_create_layer": "config, adapter_name, base_layer, module_name",
        "peft_kernel_prepare_config": "config, model",
        "peft_kernel_match_target": "config, module_name, module, model",
        "peft_kernel_map_state_dict": "config, state_dict, direction",
        "peft_kernel_merge": "layer, adapter_name, safe_merge, direction",
    }[hook]
    namespace: dict = {}
    exec(f"def {hook}({args}):\n    raise exc", {"exc": exc}, namespace)  # noqa: S102 - a test fixture
    return types.SimpleNamespace(**{hook: hookimpl(tryfirst=True)(namespace[hook])})


def installed_plus(*extra: FakeEntryPoint) -> list:
    from importlib import metadata

    return [*sorted(metadata.entry_points(group="peft_kernel"), key=lambda ep: ep.name), *extra]


def row(registry, name):
    return next(p for p in registry.plugins if p.name == name)


@pytest.mark.parametrize("hook", [
    "peft_kernel_create_layer", "peft_kernel_prepare_config", "peft_kernel_match_target",
    "peft_kernel_map_state_dict", "peft_kernel_merge",
])
def test_a_raising_hook_does_not_break_lora_and_ia3(isolated_registry, tmp_path, hook, capsys):
    ep = FakeEntryPoint("evil", hostile(hook, RuntimeError("boom from evil")), dist="evil-dist")
    registry = isolated_registry(entry_points=installed_plus(ep), disabled=[])
    inputs = make_inputs("mlp")
    with pytest.warns(PluginWarning, match=rf"plugin 'evil' \(distribution 'evil-dist'\) failed in {hook}: RuntimeError: boom from evil"):
        for config in (LoraConfig(target_modules=["lin0"], init_lora_weights=False), IA3Config(target_modules=["lin0"], feedforward_modules=[])):
            model = get_peft_model(make_model("mlp"), config).eval()
            out = model(**inputs)
            model.save_pretrained(tmp_path / type(config).__name__)
            loaded = PeftModel.from_pretrained(make_model("mlp"), tmp_path / type(config).__name__).eval()
            torch.testing.assert_close(loaded(**inputs), out)
            model.merge_adapter()
            torch.testing.assert_close(model(**inputs), out, atol=1e-5, rtol=0)
    status = row(registry, "evil")
    assert status.status == "failing"
    assert status.error == f"{hook} raised RuntimeError: boom from evil"
    # list-plugins (same process) shows it, in the table and in JSON
    assert cli_main(["list-plugins"]) == 0
    out = capsys.readouterr().out
    assert "failing" in out and f"evil: failing: {hook} raised RuntimeError: boom from evil" in out
    assert cli_main(["list-plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["evil"]["status"] == "failing" and "boom from evil" in rows["evil"]["error"]
    assert rows["lora"]["status"] == "loaded" and rows["ia3"]["status"] == "loaded"


def test_a_failing_plugin_is_skipped_afterwards(isolated_registry):
    calls = []

    @hookimpl(tryfirst=True)
    def peft_kernel_create_layer(config, adapter_name, base_layer, module_name):
        calls.append(module_name)
        raise KeyError("oops")

    isolated_registry(extra_plugins={"flaky": types.SimpleNamespace(peft_kernel_create_layer=peft_kernel_create_layer)}, disabled=[])
    with pytest.warns(PluginWarning, match="KeyError"):
        get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0", "lin1"]))
    get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0", "lin1"]))
    assert calls == ["lin0"]  # called once, never again


def test_sys_exit_in_a_hook_is_isolated_too(isolated_registry):
    registry = isolated_registry(extra_plugins={"quitter": hostile("peft_kernel_create_layer", SystemExit(3))}, disabled=[])
    with pytest.warns(PluginWarning, match="SystemExit: 3"):
        get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"]))
    assert row(registry, "quitter").status == "failing"


def test_deliberate_errors_and_the_owners_errors_propagate(isolated_registry):
    # a peft-kernel error is a deliberate refusal: it reaches the caller, with a note naming the plugin
    isolated_registry(extra_plugins={"strict": hostile("peft_kernel_prepare_config", ConfigError("no thanks"))}, disabled=[])
    with pytest.raises(ConfigError, match="no thanks") as info:
        get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"]))
    assert "raised in peft_kernel_prepare_config by plugin 'strict'" in info.value.__notes__[0]
    # so is NotImplementedError: "this layer type / option is not supported" (the LSTM example's refusal)
    registry = isolated_registry(
        extra_plugins={"partial": hostile("peft_kernel_create_layer", NotImplementedError("no DoRA on LSTM"))}, disabled=[])
    with pytest.raises(NotImplementedError, match="no DoRA on LSTM"):
        get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"]))
    assert row(registry, "partial").status == "loaded"

    # the plugin providing the method: its errors are the user's errors, and it is not marked failing
    class OwnConfig(LoraConfig):
        pass

    @hookimpl
    def peft_kernel_register_methods(register):
        register(MethodRecord(peft_type="OWNED", config_class=OwnConfig, prefix="owned_"))

    @hookimpl
    def peft_kernel_create_layer(config, adapter_name, base_layer, module_name):
        if isinstance(config, OwnConfig):
            raise ValueError(f"{module_name} is too small for this method")
        return None

    plugin = types.SimpleNamespace(peft_kernel_register_methods=peft_kernel_register_methods,
                                   peft_kernel_create_layer=peft_kernel_create_layer)
    registry = isolated_registry(extra_plugins={"owner": plugin}, disabled=[])
    config = OwnConfig(target_modules=["lin0"])
    config.peft_type = "OWNED"
    with pytest.raises(ValueError, match="lin0 is too small") as info:
        get_peft_model(make_model("mlp"), config)
    assert "raised in peft_kernel_create_layer by plugin 'owner'" in info.value.__notes__[0]
    assert row(registry, "owner").status == "loaded"
    # and LoRA still works next to it
    get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"]))


def test_an_impostor_cannot_take_lora_from_its_provider():
    impostor = types.SimpleNamespace(peft_kernel_register_methods=hookimpl(
        lambda register: register(MethodRecord(peft_type="LORA", config_class=LoraConfig, prefix="evil_"))))
    # "aaa_collide" sorts before "lora", so discovery meets it first; the order must not matter
    fake = FakeEntryPoint("aaa_collide", impostor, dist="aaa-collide")
    for eps in ([fake, *installed_plus()], installed_plus(fake)):
        registry = build_registry(entry_points=eps, disabled=[])
        assert registry.method("LORA").distribution == "peft-kernel-lora"
        assert row(registry, "lora").status == "loaded"
        bad = row(registry, "aaa_collide")
        assert bad.status == "failed"
        assert "'peft-kernel-lora'" in bad.error and "'aaa-collide'" in bad.error and "peft_type 'LORA'" in bad.error
        assert "PEFT_KERNEL_DISABLE_PLUGINS=aaa_collide" in bad.error

    # a prefix clash with a known method: the known provider keeps it too
    thief = types.SimpleNamespace(peft_kernel_register_methods=hookimpl(
        lambda register: register(MethodRecord(peft_type="THIEF", config_class=type("ThiefConfig", (LoraConfig,), {}), prefix="ia3_"))))
    registry = build_registry(entry_points=[FakeEntryPoint("aaa_thief", thief, dist="thief"), *installed_plus()], disabled=[])
    assert registry.method("IA3").distribution == "peft-kernel-ia3" and "THIEF" not in registry.methods
    assert "state-dict prefix 'ia3_'" in row(registry, "aaa_thief").error


@pytest.mark.parametrize("exc", [SystemExit(0), SystemExit("bye"), GeneratorExit(), ImportError("nope")])
def test_anything_raised_at_import_is_reported(exc):
    def load():
        raise exc

    registry = build_registry(entry_points=[FakeEntryPoint("quits", load, dist="quitter"),
                                            FakeEntryPoint("fine", types.SimpleNamespace(), dist="fine")], disabled=[])
    assert row(registry, "quits").status == "failed" and type(exc).__name__ in row(registry, "quits").error
    assert row(registry, "fine").status == "loaded"


def test_keyboard_interrupt_at_import_is_not_swallowed():
    def load():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_registry(entry_points=[FakeEntryPoint("ctrl-c", load, dist="x")], disabled=[])


def test_bad_records_and_wrappers_fail_the_plugin():
    not_a_config = types.SimpleNamespace(peft_kernel_register_methods=hookimpl(
        lambda register: register(MethodRecord(peft_type="X", config_class=dict, prefix="x_"))))
    empty_prefix = types.SimpleNamespace(peft_kernel_register_methods=hookimpl(
        lambda register: register(MethodRecord(peft_type="Y", config_class=type("YConfig", (LoraConfig,), {}), prefix=""))))

    @hookimpl(wrapper=True)
    def peft_kernel_create_layer(config, adapter_name, base_layer, module_name):
        return (yield)

    wrapper = types.SimpleNamespace(peft_kernel_create_layer=peft_kernel_create_layer)
    registry = build_registry(extra_plugins={"nc": not_a_config, "ep": empty_prefix, "wr": wrapper}, disabled=[])
    assert "not a peft_kernel.config.PeftConfig subclass" in row(registry, "nc").error
    assert "prefix is ''" in row(registry, "ep").error
    assert "hook wrapper" in row(registry, "wr").error


def _fake_distribution(site, dist: str, entry: str, module: str, code: str) -> None:
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[peft_kernel]\n{entry} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(code))


def test_cli_survives_sys_exit_at_import_and_an_impostor(tmp_path):
    """Real (fake) installed distributions, the real console command."""
    _fake_distribution(tmp_path, "quitter", "quitter", "quitter_mod", "import sys\nsys.exit(3)\n")
    _fake_distribution(tmp_path, "aaa-collide", "aaa_collide", "collide_mod", """
        from peft_kernel import hookimpl
        from peft_kernel.records import MethodRecord

        @hookimpl
        def peft_kernel_register_methods(register):
            from peft_kernel_lora.config import LoraConfig
            register(MethodRecord(peft_type="LORA", config_class=LoraConfig, prefix="collide_"))
    """)
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "peft_kernel.cli", "list-plugins", "--json"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["quitter"]["status"] == "failed" and rows["quitter"]["error"] == "SystemExit: 3"
    assert rows["aaa_collide"]["status"] == "failed" and "peft-kernel-lora" in rows["aaa_collide"]["error"]
    assert rows["lora"]["status"] == "loaded" and rows["lora"]["methods"] == ["LORA"]
    table = subprocess.run([sys.executable, "-m", "peft_kernel.cli", "list-plugins"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert table.returncode == 0 and "quitter: failed: SystemExit: 3" in table.stdout
