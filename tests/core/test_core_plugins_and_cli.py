"""The core's plugin machinery and CLI on the inline toy method: the conformance suite, isolation of
a raising plugin, ``list-plugins`` and ``inspect``; and these tests import no method plugin."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import core_toy
import pytest
from core_toy import ToyConfig, make_stack, make_x

import peft_kernel
from peft_kernel import get_peft_model
from peft_kernel.cli import main
from peft_kernel.errors import PluginWarning
from peft_kernel.plugins import build_registry, set_registry
from peft_kernel_testing import ConformanceCase, conformance_suite

TestToyConformance = conformance_suite([
    ConformanceCase("mlp", lambda: ToyConfig(target_modules=["lin0", "lin1"], init_weights=False), hf=False),
    ConformanceCase("mlp", lambda: ToyConfig(target_modules=["lin1"], modules_to_save=["lin2"], init_weights=False),
                    id="mlp-modules-to-save", hf=False),
])


def test_the_registry_holds_only_the_toy(toy_registry) -> None:
    assert list(toy_registry.methods) == ["TOY"]
    assert [(p.name, p.status) for p in toy_registry.plugins] == [("core", "loaded"), ("toy", "loaded")]


def test_a_raising_plugin_is_reported_failing_and_the_toy_keeps_working(capsys) -> None:
    registry = build_registry(entry_points=[], extra_plugins={"toy": core_toy, "raiser": core_toy.raising_plugin()},
                              disabled=[])
    set_registry(registry)  # the autouse fixture puts the toy-only registry back afterwards
    base, x = make_stack(), make_x()
    with pytest.warns(PluginWarning, match=r"plugin 'raiser'.*failed in peft_kernel_create_layer: "
                                           r"RuntimeError: boom from the raising toy"):
        model = get_peft_model(make_stack(), ToyConfig(target_modules=["q", "v"], init_weights=False))
    assert len([m for m in model.modules() if isinstance(m, core_toy.ToyLinear)]) == 6
    assert (model(x) - base(x)).abs().max() > 1e-3
    get_peft_model(make_stack(), ToyConfig(target_modules=["q"]))  # skipped from now on: no second warning
    rows = {p.name: p for p in registry.plugins}
    assert rows["raiser"].status == "failing"
    assert rows["raiser"].error == "peft_kernel_create_layer raised RuntimeError: boom from the raising toy"
    assert rows["toy"].status == "loaded"
    assert main(["list-plugins"]) == 0
    assert "raiser: failing: peft_kernel_create_layer raised RuntimeError: boom from the raising toy" in capsys.readouterr().out


def test_list_plugins_shows_the_toy(capsys) -> None:
    assert main(["list-plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["methods"], r["status"]) for r in rows] == [("core", [], "loaded"), ("toy", ["TOY"], "loaded")]
    assert main(["list-plugins"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["plugin", "distribution", "version", "provides", "status"]
    toy_row = next(line.split() for line in table[2:] if line.startswith("toy "))
    assert toy_row[-2:] == ["TOY", "loaded"]


def test_inspect_reads_the_toys_checkpoint(tmp_path: Path, capsys) -> None:
    model = get_peft_model(make_stack(), ToyConfig(target_modules=["q", "head"], alpha=0.5, init_weights=False))
    model.add_adapter("other", ToyConfig(target_modules=["v"]))
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    default, other = json.loads(capsys.readouterr().out)
    assert default["adapter"] == "default" and default["peft_type"] == "TOY"
    assert default["targeted_modules"] == ["encoder.layers.0.q", "encoder.layers.1.q", "encoder.layers.2.q", "head"]
    assert default["parameters"] == 4 * (8 + 8) and default["parameters_by_dtype"] == {"float32": 64}
    assert default["tensors"]["base_model.model.head.toy_a"] == [8]
    assert default["config"]["alpha"] == 0.5 and default["config"]["init_weights"] is False
    assert default["config_defaults_known"] is True
    assert other["adapter"] == "other" and other["targeted_modules"] == [f"encoder.layers.{i}.v" for i in range(3)]
    assert "init_weights" not in other["config"]  # at its default
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "method:           TOY" in text and "encoder.layers.*.q  x3" in text
    assert "parameters:       64 in 8 tensors (64 float32)" in text


def test_core_tests_import_no_method_plugin() -> None:
    """Only the core, peft-kernel-testing, torch and the standard library: no ``peft_kernel_<plugin>``
    module and no name a plugin adds to ``peft_kernel`` (``LoraConfig``...)."""
    core_names = {*peft_kernel._LAZY, "hookimpl", "__version__"}
    for path in Path(__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
                if node.module == "peft_kernel":
                    assert {a.name for a in node.names} <= core_names, f"{path.name} imports a plugin's name"
            else:
                continue
            plugins = [m for m in modules if re.match(r"peft_kernel_(?!testing\b)", m)]
            assert plugins == [], f"{path.name} imports {plugins}"
