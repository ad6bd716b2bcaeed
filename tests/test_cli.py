"""``peft-kernel`` CLI: list-plugins (loaded / blocked / failed), inspect (ours, HF PEFT's, bad input)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from peft_kernel import LoraConfig, get_peft_model
from peft_kernel.cli import main
from peft_kernel.markers import hookimpl
from peft_kernel.plugins import build_registry, set_registry
from peft_kernel_testing.models import make_model


class FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    def __init__(self, name: str, load, dist: str, version: str = "9.9") -> None:
        self.name = name
        self._load = load
        self.dist = FakeDist(dist, version)

    def load(self):
        return self._load()


def _broken_import():
    raise ImportError("No module named 'peft_kernel_broken'")


@pytest.fixture
def restore_registry():
    """Tests here swap the process-wide registry; put the original back afterwards."""
    old = set_registry(None)
    yield
    set_registry(old)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- list-plugins -------------------------------------------------------------------------------
def test_list_plugins_table_shows_installed_lora(capsys):
    code, out, err = run_cli(capsys, "list-plugins")
    assert code == 0, err
    header, rule, *rows = out.splitlines()
    assert header.split() == ["plugin", "distribution", "version", "provides", "status"]
    assert set(rule.replace(" ", "")) == {"-"}
    lora = next(r for r in rows if r.startswith("lora "))
    assert "peft-kernel-lora" in lora and "LORA" in lora and lora.rstrip().endswith("loaded")
    assert any(r.startswith("core ") for r in rows)
    demo = next(r for r in rows if r.startswith("demo "))  # a plugin that adds a command, not a method
    assert "hooks: register_commands" in demo


def test_list_plugins_names_the_hooks_of_a_plugin_without_methods(capsys, restore_registry):
    @hookimpl
    def peft_kernel_register_commands(subparsers):
        subparsers.add_parser("hello")

    @hookimpl
    def peft_kernel_prepare_config(config, model):
        return None

    plugin = types.SimpleNamespace(peft_kernel_register_commands=peft_kernel_register_commands,
                                   peft_kernel_prepare_config=peft_kernel_prepare_config)
    set_registry(build_registry(entry_points=[], extra_plugins={"hello": plugin}, disabled=()))
    code, out, _ = run_cli(capsys, "list-plugins")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("hello "))
    assert "hooks: prepare_config, register_commands" in row
    core = next(line for line in out.splitlines() if line.startswith("core "))
    assert "hooks: " in core and "create_host" in core and "merge" in core
    rows = {r["name"]: r for r in json.loads(run_cli(capsys, "list-plugins", "--json")[1])}
    assert rows["hello"]["hooks"] == ["prepare_config", "register_commands"] and rows["hello"]["methods"] == []


def test_list_plugins_json(capsys):
    code, out, _ = run_cli(capsys, "list-plugins", "--json")
    assert code == 0
    rows = json.loads(out)
    assert isinstance(rows, list)
    assert set(rows[0]) == {"name", "distribution", "version", "status", "error", "methods", "backends", "hooks"}
    lora = next(r for r in rows if r["name"] == "lora")
    assert lora["status"] == "loaded" and "LORA" in lora["methods"] and lora["distribution"] == "peft-kernel-lora"


def test_list_plugins_shows_a_failed_plugin_and_still_exits_zero(capsys, restore_registry):
    from peft_kernel_lora import plugin as lora_plugin

    set_registry(build_registry(entry_points=[
        FakeEntryPoint("broken", _broken_import, "peft-kernel-broken", "0.0.1"),
        FakeEntryPoint("lora", lambda: lora_plugin, "peft-kernel-lora", "0.1.0"),
    ], disabled=()))
    code, out, _ = run_cli(capsys, "list-plugins")
    assert code == 0
    broken = next(line for line in out.splitlines() if line.startswith("broken "))
    assert "peft-kernel-broken" in broken and "0.0.1" in broken and broken.rstrip().endswith("failed")
    assert "broken: failed: ImportError: No module named 'peft_kernel_broken'" in out
    assert next(line for line in out.splitlines() if line.startswith("lora ")).rstrip().endswith("loaded")

    code, out, _ = run_cli(capsys, "list-plugins", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["broken"]["status"] == "failed"
    assert rows["broken"]["error"] == "ImportError: No module named 'peft_kernel_broken'"
    assert rows["lora"]["methods"] == ["LORA"]


def test_list_plugins_shows_a_blocked_plugin(capsys, monkeypatch, restore_registry):
    monkeypatch.setenv("PEFT_KERNEL_DISABLE_PLUGINS", "lora")
    code, out, _ = run_cli(capsys, "list-plugins", "--json")
    assert code == 0
    lora = next(r for r in json.loads(out) if r["name"] == "lora")
    assert lora["status"] == "blocked" and lora["methods"] == []
    set_registry(None)
    code, out, _ = run_cli(capsys, "list-plugins")
    assert "lora: blocked by PEFT_KERNEL_DISABLE_PLUGINS" in out


# ---- inspect ------------------------------------------------------------------------------------
@pytest.fixture
def ours(tmp_path) -> Path:
    """A LoRA adapter saved by peft-kernel: 'default' at the root and 'second' in a sub-folder."""
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["o_proj"]))
    model.save_pretrained(tmp_path / "ours")
    return tmp_path / "ours"


@pytest.fixture
def hf_saved(tmp_path) -> Path:
    """A LoRA adapter saved by HF PEFT (with modules_to_save)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                             task_type="CAUSAL_LM")
    peft.get_peft_model(make_model("llama"), config).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_inspect_our_adapter_with_subfolder(capsys, ours):
    code, out, err = run_cli(capsys, "inspect", str(ours))
    assert code == 0, err
    assert "adapter 'default'" in out and "adapter 'second'" in out
    assert "LORA  (plugin peft-kernel-lora)" in out
    assert "target_modules" in out and '["q_proj", "v_proj"]' in out
    assert "model.layers.*.self_attn.q_proj  x2" in out
    assert "size on disk" in out and "adapter_model.safetensors" in out

    code, out, _ = run_cli(capsys, "inspect", str(ours), "--json")
    reports = {r["adapter"]: r for r in json.loads(out)}
    default, second = reports["default"], reports["second"]
    assert default["peft_type"] == "LORA"
    assert default["config"]["r"] == 4 and default["config"]["lora_alpha"] == 16
    assert "lora_dropout" not in default["config"]  # defaults are left out
    assert default["targeted_modules"] == [
        f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")
    ]
    base = make_model("llama")
    expected = sum(4 * (m.in_features + m.out_features) for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj")))
    assert default["parameters"] == expected  # r x (in + out) per targeted module
    assert default["size_on_disk"] == sum(p.stat().st_size for p in ours.iterdir() if p.is_file())
    assert second["targeted_modules"] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert second["config"]["r"] == 2


def test_inspect_hf_saved_adapter(capsys, hf_saved):
    code, out, err = run_cli(capsys, "inspect", str(hf_saved), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["peft_type"] == "LORA" and info["task_type"] == "CAUSAL_LM"
    assert info["config"]["r"] == 4 and info["config"]["modules_to_save"] == ["lm_head"]
    assert len(info["targeted_modules"]) == 4
    assert info["full_modules"] == ["lm_head"]
    assert info["parameters"] == sum(
        t.numel() for t in __import__("safetensors.torch").torch.load_file(str(hf_saved / "adapter_model.safetensors")).values()
    )
    code, out, _ = run_cli(capsys, "inspect", str(hf_saved / "adapter_config.json"), "--tensors")
    assert code == 0
    assert "saved in full:    lm_head" in out
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (4, " in out


def test_inspect_method_without_plugin_still_reports(capsys, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "ia3"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "SOMETHING_NEW", "target_modules": ["k_proj"], "task_type": None, "fan_in_fan_out": False,
    }))
    save_file({"base_model.model.layers.0.k_proj.something_new_l.weight": torch.ones(8)}, str(folder / "adapter_model.safetensors"))
    code, out, err = run_cli(capsys, "inspect", str(folder))
    assert code == 0, err
    assert "SOMETHING_NEW  (no installed plugin provides it)" in out
    assert "defaults are unknown" in out and "fan_in_fan_out" in out
    assert "layers.0.k_proj" in out and "parameters:       8 in 1 tensor " in out


def test_inspect_missing_path(capsys, tmp_path):
    code, out, err = run_cli(capsys, "inspect", str(tmp_path / "nope"))
    assert code == 1 and out == ""
    assert err.strip() == f"peft-kernel inspect: error: {tmp_path / 'nope'}: no such file or folder"


def test_inspect_folder_without_adapter(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 1
    assert "no adapter here: no adapter_config.json" in err and "Traceback" not in err


def test_inspect_corrupt_safetensors(capsys, ours):
    weights = ours / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    code, out, err = run_cli(capsys, "inspect", str(ours))
    assert code == 1 and out == ""
    assert "is not a readable safetensors file" in err and "corrupt or truncated" in err
    assert len(err.strip().splitlines()) == 1


def test_inspect_bad_config_json(capsys, ours):
    (ours / "adapter_config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "inspect", str(ours))
    assert code == 1 and "is not valid JSON" in err
    (ours / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "8"}))
    code, _, err = run_cli(capsys, "inspect", str(ours))
    assert code == 1 and "adapter_config.json: invalid LoraConfig: $.r: expected int, got str '8'" in err


def test_inspect_missing_weights(capsys, ours):
    (ours / "adapter_model.safetensors").unlink()
    shutil.rmtree(ours / "second")
    code, _, err = run_cli(capsys, "inspect", str(ours))
    assert code == 1 and "no adapter_model.safetensors" in err


# ---- argument errors and the console script ------------------------------------------------------
def test_bad_arguments_exit_two(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _console_script() -> Path:
    script = Path(sys.executable).parent / "peft-kernel"
    if not script.exists():
        pytest.skip("the peft-kernel console script is not installed next to this python")
    return script


def test_console_script_smoke(tmp_path):
    script = _console_script()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PEFT_KERNEL_DISABLE_PLUGINS", None)
    done = subprocess.run([str(script), "list-plugins", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert any(r["name"] == "lora" and r["status"] == "loaded" for r in json.loads(done.stdout))

    done = subprocess.run([str(script), "inspect", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("peft-kernel inspect: error:") and "Traceback" not in done.stderr

    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("peft-kernel ")
