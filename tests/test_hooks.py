"""Each hook spec driven by an inline third-party plugin, through the public API."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from peft_kernel import LoraConfig, PeftModel, get_peft_model, hookimpl
from peft_kernel.errors import TargetNotFoundError, UnsupportedFeatureError
from peft_kernel.layer import AdapterLayer
from peft_kernel_testing import make_inputs, make_model


class Scale(nn.Module):
    """A layer type no installed plugin knows: y = x * weight."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return x * self.weight


class ScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.scale = Scale(6)

    def forward(self, x):
        return self.scale(self.lin(x))


class LoraScale(AdapterLayer):
    """A LoRA-style layer for ``Scale`` written by a third party: a rank-r update of the vector."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("scaling",)

    def __init__(self, base_layer: Scale) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def update_layer(self, adapter_name, config, module_name=""):
        dim = self.base_layer.weight.shape[0]
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(config.r, 1) * 0.1)
        self.lora_B[adapter_name] = nn.Parameter(torch.zeros(dim, config.r) if config.init_lora_weights else torch.randn(dim, config.r))
        self.scaling[adapter_name] = config.lora_alpha / config.r

    def delta_weight(self, adapter_name):
        return (self.lora_B[adapter_name] @ self.lora_A[adapter_name]).squeeze(1) * self.scaling[adapter_name]

    def delta(self, x, adapter_name):
        return x * self.delta_weight(adapter_name)


def scale_plugin():
    @hookimpl
    def peft_kernel_create_layer(config, adapter_name, base_layer, module_name):
        if isinstance(config, LoraConfig) and isinstance(base_layer, Scale):
            layer = LoraScale(base_layer)
            layer.update_layer(adapter_name, config, module_name)
            return layer
        return None

    return types.SimpleNamespace(peft_kernel_create_layer=peft_kernel_create_layer)


def test_create_layer_hook_adds_a_layer_type_without_touching_lora(isolated_registry, tmp_path):
    config = lambda: LoraConfig(target_modules=["lin", "scale"], init_lora_weights=False, r=2)  # noqa: E731
    isolated_registry(disabled=[])
    with pytest.raises(TargetNotFoundError, match="'scale' of type Scale.*peft_kernel_create_layer"):
        get_peft_model(ScaleNet(), config())

    isolated_registry(disabled=[], extra_plugins={"scale": scale_plugin()})
    torch.manual_seed(0)
    base = ScaleNet().eval()
    model = get_peft_model(base, config()).eval()
    assert isinstance(model.base_model.model.scale, LoraScale)
    x = torch.randn(4, 6)
    out = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(ScaleNet().eval(), tmp_path)
    torch.testing.assert_close(reloaded(x), out, atol=1e-6, rtol=0)
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    model.add_adapter("other", config())
    mixed = model(x, adapter_names=["default", "other", "__base__", "default"])
    model.set_adapter("other")
    torch.testing.assert_close(mixed[1], model(x)[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[0], out[0], atol=1e-6, rtol=0)


def test_match_target_hook_can_veto_and_defer(isolated_registry):
    seen = []

    @hookimpl(tryfirst=True)
    def peft_kernel_match_target(config, module_name, module, model):
        seen.append(module_name)
        return False if module_name == "lin1" else None  # veto one, defer the rest to the core matcher

    isolated_registry(disabled=[], extra_plugins={"veto": types.SimpleNamespace(peft_kernel_match_target=peft_kernel_match_target)})
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0", "lin1"]))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    assert wrapped == {"base_model.model.lin0"}
    assert "lin1" in seen


def test_merge_hook_takes_over_merging(isolated_registry):
    calls = []

    @hookimpl(tryfirst=True)
    def peft_kernel_merge(layer, adapter_name, safe_merge, direction):
        calls.append((direction, adapter_name, safe_merge))
        return None  # observe only: the core default still merges

    isolated_registry(disabled=[], extra_plugins={"observer": types.SimpleNamespace(peft_kernel_merge=peft_kernel_merge)})
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"], init_lora_weights=False)).eval()
    inputs = make_inputs("mlp")
    before = model(**inputs)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(model(**inputs), before, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    assert calls == [("merge", "default", True), ("unmerge", "default", False)]

    @hookimpl(tryfirst=True)
    def refuse(layer, adapter_name, safe_merge, direction):
        # a deliberate refusal is a peft-kernel error: it reaches the caller, naming the plugin
        raise UnsupportedFeatureError(f"{type(layer.base_layer).__name__} weights are read-only")

    isolated_registry(disabled=[], extra_plugins={"refuse": types.SimpleNamespace(peft_kernel_merge=refuse)})
    with pytest.raises(UnsupportedFeatureError, match="read-only") as info:
        model.merge_adapter()
    assert "raised in peft_kernel_merge by plugin 'refuse'" in "\n".join(info.value.__notes__)


def test_map_state_dict_hook_converts_foreign_keys(isolated_registry, tmp_path):
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"], init_lora_weights=False)).eval()
    inputs = make_inputs("mlp")
    expected = model(**inputs)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k.replace("base_model.model.", "foreign::"): v for k, v in tensors.items()}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(Exception, match="match no tensor"):
        PeftModel.from_pretrained(make_model("mlp"), tmp_path)

    @hookimpl
    def peft_kernel_map_state_dict(config, state_dict, direction):
        if direction == "load" and any(k.startswith("foreign::") for k in state_dict):
            return {k.replace("foreign::", "base_model.model."): v for k, v in state_dict.items()}
        return None

    isolated_registry(disabled=[], extra_plugins={"conv": types.SimpleNamespace(peft_kernel_map_state_dict=peft_kernel_map_state_dict)})
    loaded = PeftModel.from_pretrained(make_model("mlp"), tmp_path)
    torch.testing.assert_close(loaded(**inputs), expected, atol=1e-6, rtol=0)


def test_register_hooks_reach_the_registry(isolated_registry):
    from peft_kernel.records import BackendRecord

    @hookimpl
    def peft_kernel_register_backends(register):
        register(BackendRecord(name="cpu-sim", description="test backend"))

    registry = isolated_registry(disabled=[], extra_plugins={"be": types.SimpleNamespace(peft_kernel_register_backends=peft_kernel_register_backends)})
    assert "cpu-sim" in registry.backends
    assert "LORA" in registry.methods  # peft_kernel_register_methods of the installed LoRA plugin


def test_prepare_config_hook_sees_the_model_before_matching(isolated_registry):
    seen = []

    @hookimpl
    def peft_kernel_prepare_config(config, model):
        seen.append(type(model).__name__)
        if isinstance(config, LoraConfig) and config.r == 3:
            config.r = 2  # a model-dependent decision

    isolated_registry(disabled=[], extra_plugins={"prep": types.SimpleNamespace(peft_kernel_prepare_config=peft_kernel_prepare_config)})
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"], r=3))
    assert seen == ["MLP"]
    assert model.base_model.model.lin0.lora_A["default"].weight.shape[0] == 2
