"""The ``peft_kernel_register_commands`` hook: plugins add ``peft-kernel`` sub-commands; a plugin
that fails there, or takes a name already in use, is reported and the CLI keeps working."""

from __future__ import annotations

import types

import pytest

from peft_kernel.cli import CliError, main
from peft_kernel.errors import PluginWarning
from peft_kernel.markers import hookimpl


def _plugin(name: str, handler, **parser_kwargs):
    @hookimpl
    def peft_kernel_register_commands(subparsers):
        p = subparsers.add_parser(name, help=f"the {name} command", **parser_kwargs)
        p.add_argument("--times", type=int, default=1)
        p.set_defaults(func=handler)

    return types.SimpleNamespace(peft_kernel_register_commands=peft_kernel_register_commands)


def test_a_plugin_adds_a_command(isolated_registry, capsys):
    def hello(args):
        print("hello " * args.times)  # returns None: exit status 0

    isolated_registry(entry_points=[], extra_plugins={"greeter": _plugin("hello", hello)}, disabled=[])
    assert main(["hello", "--times", "2"]) == 0
    assert capsys.readouterr().out.strip() == "hello hello"
    assert main(["list-plugins"]) == 0  # the core's commands are still there


def test_a_command_reports_bad_input_as_one_line(isolated_registry, capsys):
    def fussy(args):
        raise CliError(f"--times must be positive, got {args.times}")

    isolated_registry(entry_points=[], extra_plugins={"fussy": _plugin("fussy", fussy)}, disabled=[])
    assert main(["fussy", "--times", "-1"]) == 1
    assert capsys.readouterr().err == "peft-kernel fussy: error: --times must be positive, got -1\n"


@pytest.mark.parametrize("taken", ["inspect", "hello"])
def test_a_taken_command_name_marks_the_plugin_failing(isolated_registry, capsys, taken):
    plugins = {"greeter": _plugin("hello", lambda args: 0),
               "squatter": _plugin("other", lambda args: 0, aliases=[taken])}
    registry = isolated_registry(entry_points=[], extra_plugins=plugins, disabled=[])
    owner = "the core" if taken == "inspect" else "another plugin"
    with pytest.warns(PluginWarning, match=rf"peft_kernel_register_commands: ValueError: command '{taken}' is already taken by {owner}"):
        assert main(["list-plugins"]) == 0
    statuses = {name: registry.status_of(name).status for name in plugins}
    if taken == "inspect":
        assert statuses == {"greeter": "loaded", "squatter": "failing"}
    else:  # between two plugins, the first in pluggy's call order keeps the name, the other is failing
        assert sorted(statuses.values()) == ["failing", "loaded"]
    assert main(["list-plugins"]) == 0
    assert "squatter" in capsys.readouterr().out


def test_a_raising_plugin_does_not_break_the_cli(isolated_registry, capsys):
    @hookimpl
    def peft_kernel_register_commands(subparsers):
        raise RuntimeError("broken plugin")

    isolated_registry(entry_points=[], extra_plugins={"broken": types.SimpleNamespace(peft_kernel_register_commands=peft_kernel_register_commands)},
                      disabled=[])
    with pytest.warns(PluginWarning, match="RuntimeError: broken plugin"):
        assert main(["list-plugins"]) == 0
    assert "broken" in capsys.readouterr().out


def test_a_command_without_handler_is_a_clear_error(isolated_registry, capsys):
    @hookimpl
    def peft_kernel_register_commands(subparsers):
        subparsers.add_parser("lonely")

    isolated_registry(entry_points=[], extra_plugins={"lonely": types.SimpleNamespace(peft_kernel_register_commands=peft_kernel_register_commands)},
                      disabled=[])
    assert main(["lonely"]) == 1
    assert "has no handler" in capsys.readouterr().err


def test_building_the_cli_with_every_installed_command_stays_light():
    """The parser (with every installed plugin's commands, finetune's included) imports no torch or
    transformers: `peft-kernel list-plugins` and `--help` stay fast."""
    import subprocess
    import sys

    code = ("import sys; from peft_kernel.cli import build_parser; p = build_parser(); "
            "print(sorted(p._subparsers._group_actions[0].choices)); "
            "print([m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    commands, heavy = result.stdout.strip().splitlines()
    assert "'inspect'" in commands and heavy == "[]", result.stdout + result.stderr
