"""HRA-specific checks: the config as HF PEFT's, the initialisations, the weight against an explicit
product of reflections and Gram-Schmidt against an independent reference (forward, orthogonality,
gradients; HF PEFT agrees where it is finite), several active adapters and mixed batches against
HF peft, exact merge / unmerge, Conv2d, and HRA stacked with LoRA in a mixed model."""

import json
import warnings

import pytest
import torch
from torch import nn

import peft_kernel as pk
from peft_kernel import ConfigError, TargetNotFoundError, get_peft_model
from peft_kernel_hra import HRAConfig
from peft_kernel_testing import check_mixed_batch_against_hf, run
from peft_kernel_testing.hf_oracle import check_active_adapters_against_hf, hf_oracle
from peft_kernel_testing.models import make_inputs, make_model

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:The symmetric initialization:UserWarning",
                                        "ignore:.*Gram-Schmidt:UserWarning")


def _randomize(model, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "hra_u" in name and p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def reflection_product(u: torch.Tensor) -> torch.Tensor:
    """``H(u_1) ... H(u_r)`` as dense matrices, one reflection after the other."""
    h = torch.eye(u.shape[0], dtype=u.dtype)
    for i in range(u.shape[1]):
        v = u[:, i]
        h = h @ (torch.eye(u.shape[0], dtype=u.dtype) - 2 * torch.outer(v, v) / (v @ v))
    return h


def gs_reference(u: torch.Tensor) -> torch.Tensor:
    """``I - 2 Q Q^T`` for the modified Gram-Schmidt orthonormalisation ``Q`` of ``u``'s columns."""
    q = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for prev in q:
            v = v - (prev @ v) * prev
        q.append(v / v.norm())
    q = torch.stack(q, dim=1)
    return torch.eye(u.shape[0], dtype=u.dtype) - 2 * q @ q.T


def _lin(model):
    return model.base_model.model.lin1


# ---- config --------------------------------------------------------------------------------
def test_config_fields_and_defaults_are_hf():
    ours = HRAConfig(target_modules=["q", "v"]).to_dict()
    hf = peft.HRAConfig(target_modules=["q", "v"]).to_dict()
    assert set(ours) == set(hf)
    for key in hf:
        if key not in ("target_modules", "peft_type", "task_type", "peft_version"):
            assert ours[key] == hf[key], key
    assert (ours["r"], ours["apply_GS"], ours["init_weights"], ours["bias"]) == (8, False, True, "none")
    back = HRAConfig.from_dict(json.loads(json.dumps(HRAConfig(r=6, apply_GS=True).to_dict())))
    assert (back.r, back.apply_GS) == (6, True)
    assert pk.HRAConfig is HRAConfig and pk.HRAModel.__name__ == "HRAModel"


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), r"\$\.r must be an integer from 1"),
    (dict(r=-1), r"\$\.r must be an integer from 1"),
    (dict(r=2.5), r"\$\.r: expected int"),
    (dict(r=True), r"\$\.r: expected int"),
    (dict(bias="lora_only"), r"\$\.bias: expected 'none' \| 'all' \| 'hra_only'"),
    (dict(apply_GS="yes"), r"\$\.apply_GS: expected bool"),
])
def test_bad_configs_raise_naming_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HRAConfig(target_modules=["lin0"], **kwargs)
    with pytest.raises(TypeError, match="rank"):
        HRAConfig(rank=4)


def test_unsupported_layers_are_named():
    with pytest.raises(TargetNotFoundError, match="Embedding"):
        get_peft_model(make_model("embedding"), HRAConfig(target_modules=["emb"]))
    with pytest.raises(TargetNotFoundError, match="Conv1D"):  # GPT-2's layers: HF does not wrap them either
        get_peft_model(make_model("gpt2-conv1d"), HRAConfig(target_modules=["c_fc"]))
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(NotImplementedError, match="groups > 1"):
        get_peft_model(conv, HRAConfig(target_modules=["0"]))


# ---- initialisation ----------------------------------------------------------------------
def test_even_r_starts_as_the_identity_with_paired_vectors():
    inputs = make_inputs("mlp")
    model = get_peft_model(make_model("mlp"), HRAConfig(target_modules=["lin0", "lin1"], r=4)).eval()
    u = _lin(model).hra_u["default"]
    assert u.shape == (16, 4) and torch.equal(u[:, 0], u[:, 1]) and torch.equal(u[:, 2], u[:, 3])
    assert not torch.equal(u[:, 0], u[:, 2])
    torch.testing.assert_close(run(model, inputs), run(make_model("mlp"), inputs), atol=1e-5, rtol=0)


def test_odd_r_warns_as_hf_and_does_not_start_as_the_identity():
    inputs = make_inputs("mlp")
    with pytest.warns(UserWarning, match="The symmetric initialization can NOT be performed when r is odd!"):
        model = get_peft_model(make_model("mlp"), HRAConfig(target_modules=["lin1"], r=3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(make_model("mlp"), HRAConfig(target_modules=["lin1"], r=3, init_weights=False))
    assert not torch.allclose(run(model, inputs), run(make_model("mlp"), inputs), atol=1e-4)


def test_gram_schmidt_with_the_symmetric_init_drops_the_repeated_vectors():
    """HF PEFT 0.21.2 normalises the (near-)zero residual of each repeated vector: NaN outputs, or a
    reflection in rounding noise. Here the repeats reflect nothing (a warning says the adapter does
    not start as the identity)."""
    inputs = make_inputs("mlp")
    with pytest.warns(UserWarning, match="Gram-Schmidt"):
        ours = get_peft_model(make_model("mlp"), HRAConfig(target_modules=["lin1"], r=4, apply_GS=True)).eval()
    out = run(ours, inputs)
    assert torch.isfinite(out).all()
    u = _lin(ours).hra_u["default"].detach().double()
    expected_h = gs_reference(u[:, ::2])  # the distinct vectors
    w = _lin(ours).base_layer.weight.detach().double()
    assert _effective(ours).sub(w @ expected_h).abs().max() < 1e-5


# ---- the weight: reflections, Gram-Schmidt, orthogonality, gradients --------------------
def _effective(model):
    """The adapted lin1 weight, read from its outputs (Linear: W' = (y(I) - y(0))^T)."""
    layer = _lin(model)
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        return (layer(eye) - layer(torch.zeros(1, layer.in_features))).T.double()


@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("r", [3, 4, 20])
def test_weight_is_the_base_times_the_reflections(apply_gs, r):
    model = get_peft_model(make_model("mlp"), HRAConfig(target_modules=["lin1"], r=r, apply_GS=apply_gs,
                                                        init_weights=False))
    _randomize(model, 0)
    layer = _lin(model)
    u = layer.hra_u["default"].detach().double()
    w = layer.base_layer.weight.detach().double()
    if apply_gs and r > 16:  # more vectors than dimensions: only 16 directions exist, H = -I
        h = -torch.eye(16, dtype=torch.float64)
    else:
        h = gs_reference(u) if apply_gs else reflection_product(u)
    torch.testing.assert_close(h @ h.T, torch.eye(16, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(_effective(model), w @ h, atol=2e-5, rtol=0)


@pytest.mark.parametrize("apply_gs", [False, True])
def test_gradients_equal_the_reference_formula_and_hf(apply_gs):
    inputs = make_inputs("mlp")
    config = dict(target_modules=["lin1"], r=3, apply_GS=apply_gs, init_weights=False)
    ours = get_peft_model(make_model("mlp"), HRAConfig(**config))
    with hf_oracle():
        hf = peft.get_peft_model(make_model("mlp"), peft.HRAConfig(**config))
    grads = []
    for model in (ours, hf):
        _randomize(model, 1)
        model(**inputs).square().sum().backward()
        grads.append(_lin(model).hra_u["default"].grad.double())
    base = make_model("mlp").double()
    u = _lin(ours).hra_u["default"].detach().double().requires_grad_(True)
    h = gs_reference(u) if apply_gs else reflection_product(u)
    x = inputs["x"].double()
    hidden = torch.relu(base.lin0(x))
    hidden = torch.relu(hidden @ (base.lin1.weight @ h).T + base.lin1.bias)
    base.lin2(hidden).square().sum().backward()
    scale = u.grad.abs().max().item()
    assert (grads[0] - u.grad).abs().max() <= 1e-5 * max(1.0, scale)
    assert (grads[1] - u.grad).abs().max() <= 1e-5 * max(1.0, scale)


# ---- several adapters, mixed batches ----------------------------------------------------
@pytest.mark.parametrize("kind,kwargs", [
    ("mlp", dict(target_modules=["lin0", "lin1"], r=3, init_weights=False)),
    ("mlp", dict(target_modules=["lin0", "lin1"], r=4, apply_GS=True, init_weights=False)),
    ("conv2d", dict(target_modules=["conv0", "conv1"], r=3, init_weights=False)),
])
def test_active_adapters_compose_as_hf(kind, kwargs):
    check_active_adapters_against_hf(kind, lambda: peft.HRAConfig(**kwargs), lambda: HRAConfig(**kwargs),
                                     randomize=_randomize, merge_tolerance=1e-4)


@pytest.mark.parametrize("kind,kwargs", [
    ("mlp", dict(target_modules=["lin0", "lin1", "lin2"], r=5, init_weights=False)),
    ("conv2d", dict(target_modules=["conv0", "conv1", "lin"], r=2, apply_GS=True, init_weights=False)),
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, init_weights=False)),
])
def test_mixed_batch_rows_equal_hf_single_adapter_runs(kind, kwargs):
    check_mixed_batch_against_hf(kind, lambda: peft.HRAConfig(**kwargs), randomize=_randomize)


@pytest.mark.parametrize("kind,targets", [("mlp", ["lin0", "lin1"]), ("conv2d", ["conv0", "conv1"])])
def test_mixed_batch_with_different_ranks_and_gram_schmidt_runs_each_layer_once(kind, targets):
    inputs = make_inputs(kind)
    model = get_peft_model(make_model(kind), HRAConfig(target_modules=targets, r=2, init_weights=False),
                           adapter_name="a")
    model.add_adapter("b", HRAConfig(target_modules=targets[:1], r=7, apply_GS=True, init_weights=False))
    model.add_adapter("c", HRAConfig(target_modules=targets, r=3, init_weights=False))
    _randomize(model, 2)
    model.eval()
    names = ["c", "__base__", "a", "b"]
    singles = {}
    for name in ("a", "b", "c"):
        model.set_adapter(name)
        singles[name] = run(model, inputs)
    with model.disable_adapter():
        singles["__base__"] = run(model, inputs)
    calls = []
    layer = model.base_model.model.get_submodule(targets[0])
    hook = layer.base_layer.register_forward_hook(lambda *a: calls.append(1))
    try:
        mixed = run(model, inputs, adapter_names=names)
    finally:
        hook.remove()
    if kind == "mlp":
        assert len(calls) == 1  # the base layer runs once over the whole batch
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-5, rtol=0)


def test_conv2d_mixed_batch_with_a_padding_mode():
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect", bias=False))
    x = torch.randn(3, 3, 6, 6)
    peft_model = get_peft_model(model, HRAConfig(target_modules=["0"], r=3, init_weights=False), adapter_name="a")
    peft_model.add_adapter("b", HRAConfig(target_modules=["0"], r=2, init_weights=False))
    peft_model.eval()
    singles = {}
    for name in ("a", "b"):
        peft_model.set_adapter(name)
        singles[name] = run(peft_model, {"input": x})
    mixed = run(peft_model, {"input": x}, adapter_names=["b", "a", "b"])
    for row, name in enumerate(["b", "a", "b"]):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-5, rtol=0)


# ---- merging ----------------------------------------------------------------------------
def test_merge_unmerge_cycles_restore_the_base_and_safe_merge_refuses_nan():
    inputs = make_inputs("mlp")
    model = get_peft_model(make_model("mlp"), HRAConfig(target_modules=["lin0", "lin1"], r=6, init_weights=False))
    model.add_adapter("b", HRAConfig(target_modules=["lin1"], r=3, apply_GS=True, init_weights=False))
    _randomize(model, 3)
    model.base_model.set_adapter(["default", "b"])
    model.eval()
    adapted = run(model, inputs)
    weight = _lin(model).base_layer.weight.detach().clone()
    for _ in range(5):
        model.merge_adapter()
        torch.testing.assert_close(run(model, inputs), adapted, atol=1e-5, rtol=0)
        model.unmerge_adapter()
    torch.testing.assert_close(_lin(model).base_layer.weight, weight, atol=1e-6, rtol=0)
    weight = _lin(model).base_layer.weight.detach().clone()
    with torch.no_grad():
        _lin(model).hra_u["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs detected"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(_lin(model).base_layer.weight, weight)


def test_half_precision_base_keeps_float32_adapters_and_matches_hf():
    inputs = {"x": make_inputs("mlp")["x"].to(torch.bfloat16)}
    config = dict(target_modules=["lin0", "lin1"], r=4, init_weights=False)
    ours = get_peft_model(make_model("mlp").to(torch.bfloat16), HRAConfig(**config))
    with hf_oracle():
        hf = peft.get_peft_model(make_model("mlp").to(torch.bfloat16), peft.HRAConfig(**config))
    for model in (ours, hf):
        _randomize(model, 4)
    assert _lin(ours).hra_u["default"].dtype == torch.float32
    out = run(ours.eval(), inputs)
    assert out.dtype == torch.bfloat16
    with hf_oracle():
        expected = run(hf.eval(), inputs)
    assert (out.float() - expected.float()).abs().max() <= 0.05


# ---- mixed models ------------------------------------------------------------------------
def test_hra_stacks_on_lora_in_a_mixed_model_serves_mixed_batches_and_merges_exactly():
    inputs = make_inputs("mlp")
    model = get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False),
                           adapter_name="l", mixed=True)
    model.add_adapter("h", HRAConfig(target_modules=["lin1"], r=3, init_weights=False))
    model.set_adapter(["l", "h"])
    model.eval()
    layer = model.base_model.model.lin1
    assert layer.peft_type == "HRA" and layer.base_layer.peft_type == "LORA"
    lora = layer.base_layer
    delta = (lora.lora_B["l"].weight @ lora.lora_A["l"].weight) * lora.scaling["l"]
    expected_w = (lora.base_layer.weight + delta).double() @ reflection_product(layer.hra_u["h"].detach().double())
    torch.testing.assert_close(_effective(model), expected_w, atol=1e-5, rtol=0)
    adapted = run(model, inputs)
    singles = {}
    for name in ("l", "h"):  # mixed batches across methods: each layer of the chain routes its own rows
        model.set_adapter(name)
        singles[name] = run(model, inputs)
    names = ["h", "l", "__base__", "h"]
    mixed = run(model, inputs, adapter_names=names)
    singles["__base__"] = run(make_model("mlp"), inputs)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-5, rtol=0)
    model.set_adapter(["l", "h"])
    torch.testing.assert_close(run(model.merge_and_unload(), inputs), adapted, atol=1e-5, rtol=0)


def test_hra_conv2d_refuses_to_stack_over_another_adapter():
    model = get_peft_model(make_model("conv2d"), pk.LoraConfig(target_modules=["conv1"]), mixed=True)
    with pytest.raises(ValueError, match="add the HRA adapter for Conv2d modules first"):
        model.add_adapter("h", HRAConfig(target_modules=["conv1"], r=2))
    assert sorted(model.peft_config) == ["default"]
