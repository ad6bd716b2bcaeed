"""RoAd-specific checks: the rotation against a reference built from 2 x 2 blocks and against HF
peft, HF's parameter layouts for every variant, the config, bad configs, merging by ``W <- R W`` and
unmerging by the inverse, vectorised mixed batches (mixed variants and group sizes, half precision)."""

import dataclasses
import json
import tempfile

import pytest
import torch
from torch import nn

from peft_kernel import ConfigError, PeftConfig, PeftModel, TargetNotFoundError, get_peft_model
from peft_kernel_testing import check_mixed_batch_against_hf, run
from peft_kernel_testing.hf_oracle import check_active_adapters_against_hf, hf_oracle, perturb
from peft_kernel_testing.models import make_inputs, make_model
from peft_kernel_road import RoadConfig
from peft_kernel_road.layers import RoadLayer

peft = pytest.importorskip("peft")

VARIANTS = ["road_1", "road_2", "road_4"]


def _layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, RoadLayer)}


def _reference_matrix(variant, theta, alpha, out, g):
    """``R`` written out pair by pair, from the paper's 2 x 2 blocks and HF's parameter layouts."""
    R = torch.zeros(out, out, dtype=torch.float64)
    half = g // 2
    for group in range(out // g):
        for p in range(half):
            i, j = group * g + p, group * g + p + half
            if variant == "road_1":
                (ti, ai), (tj, aj) = (theta[group * half + p], alpha[group * half + p]), (theta[group * half + p], alpha[group * half + p])
                ci, si, cj, sj = ai * torch.cos(ti), ai * torch.sin(ti), aj * torch.cos(tj), aj * torch.sin(tj)
            elif variant == "road_2":
                ci, si = alpha[i] * torch.cos(theta[i]), alpha[i] * torch.sin(theta[i])
                cj, sj = alpha[j] * torch.cos(theta[j]), alpha[j] * torch.sin(theta[j])
            else:  # per group: [cos part (g values), sin part (g values)]
                base = group * 2 * g
                ci, cj = alpha[base + p] * torch.cos(theta[base + p]), alpha[base + p + half] * torch.cos(theta[base + p + half])
                si = alpha[base + g + p] * torch.sin(theta[base + g + p])
                sj = alpha[base + g + p + half] * torch.sin(theta[base + g + p + half])
            R[i, i], R[i, j], R[j, i], R[j, j] = ci, -si, sj, cj
    return R


# ---- the rotation --------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("out,g", [(16, 4), (12, 2), (24, 6), (8, 8)])
def test_output_is_the_pairwise_rotation_of_the_base_output(variant, out, g):
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(5, out)), RoadConfig(target_modules=["0"], variant=variant, group_size=g, init_weights=False))
    layer = _layers(model)["base_model.model.0"]
    x = torch.randn(3, 2, 5)
    theta, alpha = layer.road_theta["default"].detach().double(), layer.road_alpha["default"].detach().double()
    expected = layer.base_layer(x).detach().double() @ _reference_matrix(variant, theta, alpha, out, g).T
    torch.testing.assert_close(run(model, {"input": x}).double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_and_parameter_shapes_equal_hfs(variant):
    config = dict(target_modules=["lin0", "lin1", "lin2"], variant=variant, group_size=4, init_weights=False)
    with tempfile.TemporaryDirectory() as tmp:
        with hf_oracle("HF peft building and saving a RoAd adapter"):
            hf = peft.get_peft_model(make_model("mlp"), peft.RoadConfig(**config)).eval()
            expected = run(hf, make_inputs("mlp"))
            hf.save_pretrained(tmp)
            shapes = {n: p.shape for n, p in hf.named_parameters() if p.requires_grad}
        ours = PeftModel.from_pretrained(make_model("mlp"), tmp)
    assert {n: p.shape for n, p in get_peft_model(make_model("mlp"), RoadConfig(**config)).named_parameters() if p.requires_grad} == shapes
    torch.testing.assert_close(run(ours, make_inputs("mlp")), expected, atol=1e-6, rtol=0)


def test_identity_at_init():
    model = get_peft_model(make_model("llama"), RoadConfig(group_size=8))
    with torch.no_grad():
        torch.testing.assert_close(run(model, make_inputs("llama")), run(make_model("llama"), make_inputs("llama")), atol=1e-6, rtol=0)


# ---- config ----------------------------------------------------------------------------------
def test_fields_and_defaults_are_hfs():
    ours = {f.name: f.default for f in RoadConfig.__attrs_attrs__ if f.init}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.RoadConfig)}
    assert set(ours) == set(theirs)
    for name, default in theirs.items():
        if name != "peft_type":
            assert ours[name] == default, name
    assert RoadConfig().peft_type == "ROAD"


def test_config_dicts_load_both_ways():
    kwargs = dict(target_modules=["q_proj", "v_proj"], variant="road_4", group_size=8, init_weights=False)
    ours, hf = RoadConfig(**kwargs).to_dict(), peft.RoadConfig(**kwargs).to_dict()
    assert set(ours) == set(hf)
    assert isinstance(PeftConfig.from_dict(json.loads(json.dumps(hf, default=sorted))), RoadConfig)
    back = peft.RoadConfig.from_peft_type(**json.loads(json.dumps(ours)))
    assert (back.variant, back.group_size, back.init_weights) == ("road_4", 8, False)


@pytest.mark.parametrize("kwargs,field", [
    (dict(variant="road_3"), "variant"),
    (dict(group_size=3), "group_size"),
    (dict(group_size=0), "group_size"),
    (dict(group_size=-2), "group_size"),
    (dict(group_size=2**40), "group_size"),
    (dict(group_size="64"), "group_size"),
    (dict(init_weights=1.5), "init_weights"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        RoadConfig(**kwargs)
    with pytest.raises((ValueError, TypeError)):  # HF refuses them too (some only later, on use)
        peft.get_peft_model(make_model("mlp"), peft.RoadConfig(target_modules=["lin0"], **kwargs))


def test_unknown_kwargs_raise_as_in_hf():
    with pytest.raises(TypeError, match="layers_to_transform"):
        RoadConfig(layers_to_transform=[0])


def test_group_size_not_dividing_out_features_is_refused_naming_the_module():
    base = make_model("mlp")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=r"group_size=8 does not divide out_features=4 of module 'lin2'"):
        get_peft_model(base, RoadConfig(target_modules=["lin0", "lin2"], group_size=8))
    assert not _layers(base) and all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="divisible by group_size"):
        peft.get_peft_model(make_model("mlp"), peft.RoadConfig(target_modules=["lin2"], group_size=8))


def test_non_linear_targets_are_refused():
    for kind, target in (("gpt2-conv1d", "c_fc"), ("embedding", "emb")):
        with pytest.raises(TargetNotFoundError, match=target):
            get_peft_model(make_model(kind), RoadConfig(target_modules=[target], group_size=2))


def test_default_target_modules_are_hfs():
    for kind in ("llama", "bert"):
        ours = get_peft_model(make_model(kind), RoadConfig(group_size=8))
        hf = peft.get_peft_model(make_model(kind), peft.RoadConfig(group_size=8))
        hf_names = {n for n, m in hf.named_modules() if hasattr(m, "road_theta")}
        assert set(_layers(ours)) == hf_names and hf_names, kind


# ---- merging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_is_R_W_and_unmerge_restores_the_base(variant):
    model = get_peft_model(make_model("mlp"), RoadConfig(target_modules=["lin0", "lin1"], variant=variant, group_size=4, init_weights=False))
    layer = _layers(model)["base_model.model.lin1"]
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    theta, alpha = layer.road_theta["default"].detach().double(), layer.road_alpha["default"].detach().double()
    R = _reference_matrix(variant, theta, alpha, 16, 4)
    model.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight.double(), R @ weight.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.base_layer.bias.double(), R @ bias.double(), atol=1e-6, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.base_layer.bias, bias, atol=1e-6, rtol=0)


def test_merge_and_unload_weights_equal_hfs():
    with tempfile.TemporaryDirectory() as tmp:
        with hf_oracle("HF peft building, saving and merging a RoAd adapter"):
            hf = peft.get_peft_model(make_model("llama"), peft.RoadConfig(target_modules=["q_proj", "up_proj"], variant="road_2", group_size=4))
            perturb(hf, 2)
            hf.save_pretrained(tmp)
            expected = hf.merge_and_unload().state_dict()
        merged = PeftModel.from_pretrained(make_model("llama"), tmp).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=0)


def test_two_active_adapters_compose_in_order_as_in_hf():
    check_active_adapters_against_hf("mlp", lambda: peft.RoadConfig(target_modules=["lin0", "lin1"], variant="road_2", group_size=4),
                                     lambda: RoadConfig(target_modules=["lin0", "lin1"], variant="road_2", group_size=4))


def test_safe_merge_refuses_non_finite_and_a_singular_rotation_cannot_be_unmerged():
    model = get_peft_model(make_model("mlp"), RoadConfig(target_modules=["lin0"], group_size=4))
    layer = model.base_model.model.lin0
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.road_alpha["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, weight)
    with torch.no_grad():
        layer.road_alpha["default"][0] = 0.0
    model.merge_adapter()
    with pytest.raises(ValueError, match="singular"):
        layer.unmerge_from_base("default")


# ---- mixed batches, dtypes ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_batch_rows_equal_hf_single_runs(variant):
    check_mixed_batch_against_hf("llama", lambda: peft.RoadConfig(target_modules=["q_proj", "v_proj", "up_proj"], variant=variant, group_size=4))


def _mixed_model():
    """Three adapters of different variants and group sizes, one of them on fewer layers."""
    model = get_peft_model(make_model("mlp"), RoadConfig(target_modules=["lin0", "lin1"], variant="road_1", group_size=4), adapter_name="a")
    model.add_adapter("b", RoadConfig(target_modules=["lin0", "lin1"], variant="road_4", group_size=16))
    model.add_adapter("c", RoadConfig(target_modules=["lin1", "lin2"], variant="road_2", group_size=2))
    for seed, name in enumerate("abc"):
        model.set_adapter(name)
        perturb(model, seed)
    return model.eval()


def test_mixed_variants_and_group_sizes_in_one_batch_equal_single_runs():
    model = _mixed_model()
    inputs = make_inputs("mlp", batch=8)
    names = ["a", "b", "__base__", "c", "c", "a", "b", "__base__"]
    singles = {}
    for name in "abc":
        model.set_adapter(name)
        singles[name] = run(model, inputs)
    with model.disable_adapter():
        singles["__base__"] = run(model, inputs)
    mixed = run(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-6, rtol=0)


def test_mixed_batch_computes_coefficients_per_adapter_not_per_row(monkeypatch):
    model = get_peft_model(make_model("mlp"), RoadConfig(target_modules=["lin0", "lin1"], group_size=4), adapter_name="a")
    model.add_adapter("b", RoadConfig(target_modules=["lin0", "lin1"], group_size=4))
    model.eval()
    calls = []
    original = RoadLayer.coefficients
    monkeypatch.setattr(RoadLayer, "coefficients", lambda self, name: calls.append(name) or original(self, name))
    run(model, make_inputs("mlp", batch=16), adapter_names=["a", "b", "__base__", "a"] * 4)
    assert sorted(calls) == ["a", "a", "b", "b"]  # two layers, each adapter once


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_mixed_batch_runs(dtype):
    """HF peft 0.21.2 raises on this (``Index put requires the source and destination dtypes match``)."""
    model = get_peft_model(make_model("llama"), RoadConfig(target_modules=["q_proj", "v_proj"], group_size=4, init_weights=False),
                           adapter_name="a").to(dtype).eval()
    model.add_adapter("b", RoadConfig(target_modules=["q_proj", "v_proj"], group_size=4, init_weights=False))
    model.to(dtype)
    inputs = make_inputs("llama")
    singles = {}
    for name in "ab":
        model.set_adapter(name)
        singles[name] = run(model, inputs)
    mixed = run(model, inputs, adapter_names=["b", "a", "a", "b"])
    assert mixed.dtype == dtype
    for row, name in enumerate(["b", "a", "a", "b"]):
        assert torch.equal(mixed[row], singles[name][row])


def test_generate_with_a_mixed_batch_matches_greedy_decoding():
    from peft_kernel_testing.generation import check_generate_matches_greedy

    model = get_peft_model(make_model("llama"), RoadConfig(group_size=4, init_weights=False), adapter_name="a")
    model.add_adapter("b", RoadConfig(variant="road_4", group_size=8, init_weights=False))
    ids = make_inputs("llama")["input_ids"][:3]
    check_generate_matches_greedy(model.eval(), ids, max_new_tokens=3, adapter_names=["b", "__base__", "a"])
