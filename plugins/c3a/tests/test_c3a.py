"""C3A-specific checks: the block-circulant layout and its ``1/in_features`` scale, initialisations
and merged weights equal to HF peft's, config fields and errors, mixed batches against HF
single-adapter runs, several active adapters, ``safe_merge``, half precision."""

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

import peft_kernel as pk
from peft_kernel import ConfigError, get_peft_model
from peft_kernel_testing import check_mixed_batch_against_hf, run
from peft_kernel_testing.hf_oracle import hf_oracle, perturb
from peft_kernel_testing.models import make_inputs, make_model
from peft_kernel_c3a import C3AConfig

peft = pytest.importorskip("peft")


def single_linear(in_features, out_features, config, bias=False):
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(in_features, out_features, bias=bias)), config)
    return model, model.base_model.model[0]


def test_delta_weight_is_the_documented_block_circulant_matrix():
    """``delta_W[o*b + r, i*b + c] = k[o, i, (c - r) mod b] / in_features``, written out by loops."""
    model, layer = single_linear(12, 8, C3AConfig(target_modules=["0"], block_size=4))
    kernel = layer.c3a_kernel["default"].detach()
    expected = torch.zeros(8, 12)
    for o in range(2):
        for i in range(3):
            for r in range(4):
                for c in range(4):
                    expected[o * 4 + r, i * 4 + c] = kernel[o, i, (c - r) % 4] / 12
    torch.testing.assert_close(layer.delta_weight("default"), expected, atol=1e-7, rtol=0)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer.delta(x, "default"), x @ expected.T, atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["xavier_uniform", "kaiming_uniform", "gaussian", False, True])
def test_initialisation_draws_hf_peft_kernels(init):
    """Same seed, same kernels as HF peft (so ``init_weights=True`` is zeros, a no-op adapter)."""
    base = nn.Sequential(nn.Linear(64, 32, bias=False))
    torch.manual_seed(5)
    ours = get_peft_model(copy.deepcopy(base), C3AConfig(target_modules=["0"], block_size=8, init_weights=init))
    with hf_oracle("HF peft initialising a C3A adapter"):
        torch.manual_seed(5)
        hf = peft.get_peft_model(copy.deepcopy(base), peft.C3AConfig(target_modules=["0"], block_size=8, init_weights=init))
    mine, theirs = ours.base_model.model[0].c3a_kernel["default"], hf.base_model.model[0].c3a_kernel["default"]
    assert mine.shape == theirs.shape == (4, 8, 8)
    assert torch.equal(mine, theirs)
    assert (init is True) == (not mine.any())


def test_delta_and_merged_weights_equal_hf():
    config = dict(target_modules=["lin0", "lin1", "lin2"], block_size=2, block_size_pattern={"lin1": 8})
    inputs = make_inputs("mlp")
    with hf_oracle("HF peft building, perturbing and merging a C3A adapter"):
        hf = peft.get_peft_model(make_model("mlp"), peft.C3AConfig(**config))
        perturb(hf, 3)
        hf.eval()
        deltas = {n: hf.base_model.model.get_submodule(n).get_delta_weight("default").detach() for n in config["target_modules"]}
        expected = run(hf, inputs)
        state = peft.get_peft_model_state_dict(hf)
        merged = {k: v.detach().clone() for k, v in hf.merge_and_unload().state_dict().items()}
    ours = get_peft_model(make_model("mlp"), C3AConfig(**config)).eval()
    pk.set_peft_model_state_dict(ours, state)
    assert ours.base_model.model.lin1.c3a_kernel["default"].shape == (2, 2, 8)
    for name, delta in deltas.items():
        torch.testing.assert_close(ours.base_model.model.get_submodule(name).delta_weight("default"), delta, atol=1e-7, rtol=0)
    torch.testing.assert_close(run(ours, inputs), expected, atol=1e-5, rtol=0)
    ours_merged = ours.merge_and_unload().state_dict()
    assert sorted(ours_merged) == sorted(merged)
    for key, value in merged.items():
        torch.testing.assert_close(ours_merged[key], value, atol=1e-6, rtol=0, msg=key)


def test_config_fields_and_defaults_are_hf_peft_s():
    hf_fields = {f.name: f for f in dataclasses.fields(peft.C3AConfig)}
    ours = C3AConfig().to_dict()
    assert set(ours) == set(hf_fields)
    hf_default = peft.C3AConfig().to_dict()
    for key in hf_default:
        if key not in ("peft_type", "task_type"):
            assert ours[key] == hf_default[key], key
    assert ours["peft_type"] == "C3A" and ours["block_size"] == 256 and ours["init_weights"] == "xavier_uniform"
    config = C3AConfig(target_modules=["q", "v"], block_size=16, block_size_pattern={"v": 32}, init_weights="gaussian")
    again = C3AConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.target_modules == {"q", "v"} and again.block_size_pattern == {"v": 32} and again.init_weights == "gaussian"
    assert peft.C3AConfig(**config.to_dict()).block_size_pattern == {"v": 32}  # HF takes our dict as is


def test_exclude_modules_is_not_a_c3a_field_as_in_hf():
    with pytest.raises(TypeError, match="exclude_modules"):
        C3AConfig(exclude_modules=["lin0"])
    with pytest.raises(TypeError, match="exclude_modules"):
        peft.C3AConfig(exclude_modules=["lin0"])
    with pytest.warns(UserWarning, match="exclude_modules"):
        assert C3AConfig.from_dict({"peft_type": "C3A", "exclude_modules": ["x"]}).exclude_modules is None


@pytest.mark.parametrize("kwargs,field", [
    (dict(block_size=0), "block_size"),
    (dict(block_size=-4), "block_size"),
    (dict(block_size_pattern={"lin1": 0}), "block_size_pattern"),
    (dict(bias="lora_only"), "bias"),
])
def test_bad_values_name_the_field(kwargs, field):
    """HF peft accepts these and fails later (or never); ours refuses them up front."""
    with pytest.raises(ConfigError, match=field):
        C3AConfig(**kwargs)


@pytest.mark.parametrize("data,field", [
    ({"block_size": "16"}, "block_size"),
    ({"init_weights": "uniform"}, "init_weights"),
    ({"block_size_pattern": {"lin1": "8"}}, "block_size_pattern"),
])
def test_wrong_types_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field):
        C3AConfig.from_dict({"peft_type": "C3A", **data})


@pytest.mark.parametrize("shape,side", [((10, 16), "input"), ((16, 10), "output")])
def test_block_size_must_divide_both_sizes(shape, side):
    with pytest.raises(ConfigError, match=rf"C3AConfig\.block_size: .* must divide the {side} size 10 of module '0'"):
        single_linear(*shape, C3AConfig(target_modules=["0"], block_size=4))
    with pytest.raises(ValueError, match=f"factor of the {side} size"):  # HF raises too, at the same point
        peft.get_peft_model(nn.Sequential(nn.Linear(*shape)), peft.C3AConfig(target_modules=["0"], block_size=4))


def test_block_size_pattern_error_names_the_pattern_and_leaves_the_model_untouched():
    model = make_model("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"C3AConfig\.block_size_pattern: the block size 3 must divide the input size 10 of module 'lin0'"):
        get_peft_model(model, C3AConfig(target_modules=["lin0", "lin1"], block_size=2, block_size_pattern={"lin0": 3}))
    assert not any(isinstance(m, pk.C3ALinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind,target", [("gpt2-conv1d", "c_fc"), ("embedding", "emb")])
def test_only_linear_layers_as_in_hf(kind, target):
    with pytest.raises(ValueError, match="no installed plugin can wrap it with a C3A adapter"):
        get_peft_model(make_model(kind), C3AConfig(target_modules=[target], block_size=2))
    with pytest.raises(TypeError, match=r"only `torch.nn.Linear` is supported"):
        peft.get_peft_model(make_model(kind), peft.C3AConfig(target_modules=[target], block_size=2))


@pytest.mark.parametrize("kind,kwargs", [
    ("mlp", dict(target_modules=["lin0", "lin1", "lin2"], block_size=2)),
    ("llama", dict(target_modules=["q_proj", "k_proj", "down_proj"], block_size=8)),
])
def test_mixed_batch_rows_equal_hf_single_adapter_runs(kind, kwargs):
    check_mixed_batch_against_hf(kind, lambda: peft.C3AConfig(**kwargs))


def test_mixed_batch_computes_one_delta_per_adapter_group(monkeypatch):
    """Rows are served per adapter group (one FFT pass per group and layer), never row by row."""
    model = get_peft_model(make_model("mlp"), C3AConfig(target_modules=["lin1"], block_size=4), adapter_name="first")
    model.add_adapter("second", C3AConfig(target_modules=["lin1"], block_size=8))
    perturb(model, 1)
    model.eval()
    layer = model.base_model.model.lin1
    calls = []
    original = type(layer).delta
    monkeypatch.setattr(type(layer), "delta", lambda self, x, name: calls.append((name, x.shape[0])) or original(self, x, name))
    inputs = {"x": torch.randn(8, 10)}
    names = ["first", "second", "__base__", "first", "second", "second", "first", "__base__"]
    mixed = run(model, inputs, adapter_names=names)
    assert sorted(calls) == [("first", 3), ("second", 3)]
    monkeypatch.undo()
    for name in ("first", "second"):
        model.set_adapter(name)
        single = run(model, inputs)
        rows = [i for i, n in enumerate(names) if n == name]
        torch.testing.assert_close(mixed[rows], single[rows], atol=1e-6, rtol=0)
    with model.disable_adapter():
        base = run(model, inputs)
    torch.testing.assert_close(mixed[[2, 7]], base[[2, 7]], atol=0, rtol=0)


def test_several_active_adapters_add_and_equal_hf_merged_model():
    """Active adapters add their updates: ``base + dW1 x + dW2 x``, the model HF peft's own
    ``merge_and_unload`` builds. (HF peft 0.21.2's *unmerged* forward with several active C3A adapters
    feeds one adapter's output into the next, ``dW2 (dW1 x)``: its merged and unmerged outputs
    disagree, and on a non-square layer it raises. So the reference is HF's merged model.)"""
    kwargs = dict(target_modules=["lin0", "lin1"], block_size=2, init_weights="gaussian")
    inputs = make_inputs("mlp")
    ours = get_peft_model(make_model("mlp"), C3AConfig(**kwargs), adapter_name="first")
    ours.add_adapter("second", C3AConfig(**kwargs))
    ours.set_adapter(["first", "second"])
    ours.eval()
    both = run(ours, inputs)
    lin1 = ours.base_model.model.lin1
    h = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(lin1(h), lin1.base_layer(h) + h @ (lin1.delta_weight("first") + lin1.delta_weight("second")).T,
                                   atol=1e-5, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, inputs), both, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(run(ours, inputs), both, atol=1e-6, rtol=0)
    with hf_oracle("HF peft merging two C3A adapters"):
        hf = peft.get_peft_model(make_model("mlp"), peft.C3AConfig(**kwargs), adapter_name="first")
        hf.add_adapter("second", peft.C3AConfig(**kwargs))
        for name in ("first", "second"):
            peft.set_peft_model_state_dict(hf, pk.get_peft_model_state_dict(ours, adapter_name=name), adapter_name=name)
        hf.base_model.set_adapter(["first", "second"])
        expected = run(hf.eval().merge_and_unload(), inputs)
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(run(ours.unload(), inputs), run(make_model("mlp"), inputs), atol=1e-6, rtol=0)


def test_safe_merge_refuses_non_finite_kernels():
    model = get_peft_model(make_model("mlp"), C3AConfig(target_modules=["lin1"], block_size=4))
    before = model.base_model.model.lin1.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.base_model.model.lin1.c3a_kernel["default"][0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin1.base_layer.weight, before)
    assert not model.base_model.model.lin1.merged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_a_float32_kernel_like_hf(dtype):
    config = dict(target_modules=["lin0", "lin1"], block_size=2, init_weights="gaussian")
    inputs = {"x": make_inputs("mlp")["x"].to(dtype)}
    with hf_oracle("HF peft running C3A on a half-precision base"):
        hf = peft.get_peft_model(make_model("mlp").to(dtype), peft.C3AConfig(**config)).eval()
        expected = run(hf, inputs)
        state = peft.get_peft_model_state_dict(hf)
    ours = get_peft_model(make_model("mlp").to(dtype), C3AConfig(**config)).eval()
    assert ours.base_model.model.lin0.c3a_kernel["default"].dtype == torch.float32
    pk.set_peft_model_state_dict(ours, state)
    got = run(ours, inputs)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, inputs).float(), got.float(), atol=5e-2, rtol=5e-2)


def test_gradients_reach_the_kernel_through_the_fft():
    model, layer = single_linear(16, 8, C3AConfig(target_modules=["0"], block_size=4, init_weights="gaussian"))
    x = torch.randn(6, 16)
    model(x).pow(2).sum().backward()
    grad = layer.c3a_kernel["default"].grad
    kernel = layer.c3a_kernel["default"].detach().requires_grad_(True)
    blocks = kernel[:, :, (torch.arange(4)[None, :] - torch.arange(4)[:, None]) % 4]
    dense = blocks.permute(0, 2, 1, 3).reshape(8, 16) / 16
    (x @ (layer.base_layer.weight + dense).T).pow(2).sum().backward()
    torch.testing.assert_close(grad, kernel.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "t5", "bert"])
def test_default_target_modules_are_hf_peft_s(kind):
    ours = get_peft_model(make_model(kind), C3AConfig(block_size=8))
    with hf_oracle("HF peft resolving C3A's default target modules"):
        hf = peft.get_peft_model(make_model(kind), peft.C3AConfig(block_size=8))
    assert ours.peft_config["default"].target_modules == hf.peft_config["default"].target_modules
    assert sorted(pk.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(hf))


def test_exports():
    assert pk.C3AConfig is C3AConfig
    model = get_peft_model(make_model("mlp"), C3AConfig(target_modules=["lin1"], block_size=4))
    assert type(model.base_model).__name__ == "C3AModel"
    assert isinstance(model.base_model.model.lin1, pk.C3ALinear)
