"""Each hook spec driven by an inline third-party plugin, through the public API."""

from __future__ import annotations

import types

import attrs
import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import LoraConfig, PeftModel, get_peft_model, hookimpl
from peft_kernel.config import TargetedConfig
from peft_kernel.records import MethodRecord
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


def test_add_hookspecs_hook_lets_a_plugin_add_hooks_others_implement(isolated_registry):
    """A family library adds a hook through ``peft_kernel_add_hookspecs``: plugins implement it
    whatever the loading order, typos are still caught, and calls through the registry isolate a
    failing implementation as for the core's hooks."""
    from peft_kernel.plugin_api import hookspec
    from peft_kernel.errors import PluginWarning

    class ToySpecs:
        @hookspec
        def peft_kernel_toy_double(self, value):
            """Return twice ``value``."""

    @hookimpl
    def peft_kernel_add_hookspecs(pm):
        pm.add_hookspecs(ToySpecs)

    def implementing(result):
        @hookimpl
        def peft_kernel_toy_double(value):
            return result(value)

        return types.SimpleNamespace(peft_kernel_toy_double=peft_kernel_toy_double)

    def broken(value):
        raise RuntimeError("boom")

    @hookimpl
    def peft_kernel_toy_tripple(value):  # a typo: no plugin added this hook
        return 3 * value

    registry = isolated_registry(disabled=[], extra_plugins={
        "early": implementing(lambda v: 2 * v),  # loaded before the plugin that adds the spec
        "family": types.SimpleNamespace(peft_kernel_add_hookspecs=peft_kernel_add_hookspecs),
        "late": implementing(lambda v: 2 * v),
        "broken": implementing(broken),
        "typo": types.SimpleNamespace(peft_kernel_toy_tripple=peft_kernel_toy_tripple),
    })
    status = {s.name: s for s in registry.plugins}
    assert [status[n].status for n in ("early", "family", "late", "broken")] == ["loaded"] * 4
    assert status["typo"].status == "failed" and "peft_kernel_toy_tripple" in status["typo"].error
    assert "peft_kernel_toy_double" in status["typo"].error  # the known hooks include the added one
    with pytest.warns(PluginWarning, match="'broken'.*peft_kernel_toy_double"):
        assert registry.call_hook("peft_kernel_toy_double", {"value": 4}) == [8, 8]
    assert status["broken"].status == "failing"
    assert registry.call_hook("peft_kernel_toy_double", {"value": 5}) == [10, 10]  # skipped from now on


def test_create_host_hook_supplies_the_adapter_host(isolated_registry, tmp_path):
    """``peft_kernel_create_host`` decides what owns a new PeftModel's adapters; the PeftModel
    delegates forward and saving to it. The core's default is the method's tuner."""
    from peft_kernel.host import AdapterHost
    from peft_kernel.tuner import AdapterModel

    class CountingHost(AdapterModel):
        served = 0

        def serve(self, args, kwargs, adapter_names):
            CountingHost.served += 1
            return super().serve(args, kwargs, adapter_names)

    default = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"]))
    assert type(default.base_model).__name__ == "LoraModel" and isinstance(default._host, AdapterHost)

    @hookimpl
    def peft_kernel_create_host(record, model, config, adapter_name):
        return CountingHost(model, config, adapter_name) if record.peft_type == "LORA" else None

    isolated_registry(disabled=[], extra_plugins={"host": types.SimpleNamespace(peft_kernel_create_host=peft_kernel_create_host)})
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"], init_lora_weights=False)).eval()
    assert model.base_model is model._host and isinstance(model._host, CountingHost)
    inputs = make_inputs("mlp")
    out = model(**inputs)
    assert CountingHost.served == 1
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("mlp"), tmp_path)
    assert isinstance(loaded.base_model, CountingHost)
    torch.testing.assert_close(loaded(**inputs), out)

@attrs.define(kw_only=True)
class ToyBiasConfig(TargetedConfig):
    """A method declared without a single hook but registration: a learned bias on Linear outputs."""

    peft_type: str = "TOY_BIAS"


class ToyBias(AdapterLayer):
    adapter_layer_names = ("toy_bias",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.toy_bias = nn.ParameterDict()

    def update_layer(self, adapter_name, config, module_name=""):
        self.toy_bias[adapter_name] = nn.Parameter(torch.randn(self.base_layer.out_features) * 0.1)

    def delta(self, x, adapter_name):
        return self.toy_bias[adapter_name].to(x.dtype).expand(*x.shape[:-1], -1)


def make_toy_bias(config, adapter_name, base_layer, module_name):
    if not isinstance(base_layer, nn.Linear):
        return None
    layer = ToyBias(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer


def declared_plugin():
    @hookimpl
    def peft_kernel_register_methods(register):
        register(MethodRecord(peft_type="TOY_BIAS", config_class=ToyBiasConfig, prefix="toy_",
                              tuner_name="ToyBiasModel", layer_factory=f"{__name__}:make_toy_bias"))

    return types.SimpleNamespace(peft_kernel_register_methods=peft_kernel_register_methods)


def test_a_registry_builds_layers_from_its_own_records():
    """``Registry.create_layer`` finds the factory in the registry it is called on, not in the
    process-wide one (which here does not know the method): ``inject(..., registry=...)`` works."""
    from peft_kernel.injection import inject
    from peft_kernel.plugins import build_registry, get_registry

    registry = build_registry(entry_points=[], extra_plugins={"toy": declared_plugin()}, disabled=())
    assert "TOY_BIAS" in registry.methods and "TOY_BIAS" not in get_registry().methods
    base = nn.Linear(4, 3)
    layer = registry.create_layer(ToyBiasConfig(target_modules=["x"]), "default", base, "x")
    assert isinstance(layer, ToyBias) and layer.base_layer is base
    model = nn.Sequential(nn.Linear(4, 3))
    inject(model, ToyBiasConfig(target_modules=["0"]), "default", registry=registry)
    assert isinstance(model[0], ToyBias)


def test_layer_factory_declared_on_the_record_builds_the_layers(isolated_registry, tmp_path):
    """The core's default ``peft_kernel_create_layer`` dispatches on the config class to the record's
    ``layer_factory``; a factory's ``None`` (an unsupported layer type) is the usual named error."""
    isolated_registry(disabled=[], extra_plugins={"toy": declared_plugin()})
    torch.manual_seed(0)
    base = make_model("mlp").eval()
    inputs = make_inputs("mlp")
    expected = base(**inputs)
    model = get_peft_model(base, ToyBiasConfig(target_modules=["lin0", "lin1"])).eval()
    assert isinstance(model.base_model.model.lin0, ToyBias) and isinstance(model.base_model.model.lin1, ToyBias)
    assert type(model.base_model).__name__ == "ToyBiasModel"
    assert isinstance(model.base_model, peft_kernel.ToyBiasModel)
    out = model(**inputs)
    assert not torch.allclose(out, expected)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_model("mlp").eval(), tmp_path)
    assert isinstance(reloaded.base_model.model.lin0, ToyBias)
    torch.testing.assert_close(reloaded(**inputs), out, atol=1e-6, rtol=0)
    with pytest.raises(TargetNotFoundError, match="peft_kernel_create_layer"):
        get_peft_model(ScaleNet(), ToyBiasConfig(target_modules=["scale"]))
