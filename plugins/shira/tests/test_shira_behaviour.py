"""SHiRA-specific checks against HF peft: the random mask (bit-identical positions), ``mask_fn``,
the saved positions, the config, bad configs, merging, mixed batches, half precision."""

import dataclasses
import json
import tempfile

import pytest
import torch
from safetensors.torch import load_file

from peft_kernel import ConfigError, PeftConfig, PeftModel, TargetNotFoundError, get_peft_model
from peft_kernel_testing import check_mixed_batch_against_hf, run
from peft_kernel_testing.hf_oracle import hf_oracle, perturb
from peft_kernel_testing.models import make_inputs, make_model
from peft_kernel_shira import ShiraConfig
from peft_kernel_shira.layers import ShiraLayer

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")


def _layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, ShiraLayer)}


def _first_rows_mask(base_layer, r, random_seed=None):
    """A user mask: the first r * (m + n) entries in row-major order."""
    mask = torch.zeros_like(base_layer.weight)
    mask.view(-1)[: r * sum(base_layer.weight.shape)] = 1
    return mask


# ---- the positions ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind,kwargs", [
    ("mlp", dict(target_modules=["lin0", "lin1", "lin2"], r=1, random_seed=3)),
    ("mlp", dict(target_modules=["lin0", "lin1"], r=2)),  # no seed: torch's default generator seed, as HF
    ("mlp", dict(target_modules=["lin2"], r=3, random_seed=-7)),  # 60 of 64 entries
    ("llama", dict(target_modules="all-linear", r=1, random_seed=2**40 + 1)),
])
def test_positions_are_hfs(kind, kwargs):
    ours = get_peft_model(make_model(kind), ShiraConfig(**kwargs))
    with hf_oracle("HF peft building a SHiRA model"):
        hf = peft.get_peft_model(make_model(kind), peft.ShiraConfig(**kwargs))
        hf_layers = {name: m for name, m in hf.named_modules() if hasattr(m, "shira_weight")}
    layers = _layers(ours)
    assert layers and set(layers) == set(hf_layers)
    for name, layer in layers.items():
        expected = hf_layers[name].shira_indices["default"]
        assert layer.shira_indices["default"].dtype == expected.dtype == torch.int32
        assert torch.equal(layer.shira_indices["default"], expected), name
        assert layer.shira_weight["default"].shape == hf_layers[name].shira_weight["default"].shape


def test_positions_are_saved_under_hfs_keys_and_loaded_from_the_file():
    config = ShiraConfig(target_modules=["lin0", "lin1"], r=1, random_seed=5)
    config.mask_fn = _first_rows_mask
    model = get_peft_model(make_model("mlp"), config)
    perturb(model, 0)
    inputs = make_inputs("mlp")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved = load_file(f"{tmp}/adapter_model.safetensors")
        assert sorted(saved) == ["base_model.model.lin0.shira_indices", "base_model.model.lin0.shira_weight",
                                 "base_model.model.lin1.shira_indices", "base_model.model.lin1.shira_weight"]
        assert saved["base_model.model.lin0.shira_indices"].dtype == torch.int32
        assert "mask_fn" not in json.load(open(f"{tmp}/adapter_config.json"))
        loaded = PeftModel.from_pretrained(make_model("mlp"), tmp)  # the random mask, overwritten by the file's
        hf = peft.PeftModel.from_pretrained(make_model("mlp"), tmp)
        expected = run(model, inputs)
        assert torch.equal(run(loaded, inputs), expected)
        torch.testing.assert_close(run(hf, inputs), expected, atol=1e-5, rtol=0)
    rows, cols = _layers(loaded)["base_model.model.lin0"].shira_indices["default"]
    assert rows.tolist() == [0] * 10 + [1] * 10 + [2] * 6 and cols.tolist() == list(range(10)) * 2 + list(range(6))


def test_mask_fn_gets_hfs_arguments_and_its_mask_is_used():
    calls = []

    def mask_fn(base_layer, r, **kwargs):
        calls.append((type(base_layer).__name__, r, kwargs))
        return _first_rows_mask(base_layer, r)

    config = ShiraConfig(target_modules=["lin1"], r=2, random_seed=9)
    config.mask_fn = mask_fn
    layer = _layers(get_peft_model(make_model("mlp"), config))["base_model.model.lin1"]
    assert calls == [("Linear", 2, {"random_seed": 9})]
    assert layer.shira_indices["default"][0].tolist() == [0] * 16 + [1] * 16 + [2] * 16 + [3] * 16


@pytest.mark.parametrize("mask,match", [
    (lambda base, r, **kw: torch.ones(3, 3), "shape"),
    (lambda base, r, **kw: torch.full_like(base.weight, 0.5), "binary"),
    (lambda base, r, **kw: torch.ones_like(base.weight), "exactly r \\* \\(out \\+ in\\) = 26"),
])
def test_bad_mask_fn_results_are_refused(mask, match):
    config = ShiraConfig(target_modules=["lin0"], r=1)
    config.mask_fn = mask
    with pytest.raises(ConfigError, match=f"mask_fn for module 'lin0'.*{match}"):
        get_peft_model(make_model("mlp"), config)


# ---- config ----------------------------------------------------------------------------------
def test_fields_and_defaults_are_hfs():
    ours = {f.name: f.default for f in ShiraConfig.__attrs_attrs__ if f.init}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.ShiraConfig)}
    assert set(ours) == set(theirs)
    for name, default in theirs.items():
        if name != "peft_type":
            assert ours[name] == default, name
    assert ShiraConfig().peft_type == "SHIRA" and ShiraConfig().mask_fn is None


def test_config_dicts_load_both_ways():
    kwargs = dict(target_modules=["q_proj", "v_proj"], r=4, random_seed=11, init_weights=False)
    ours, hf = ShiraConfig(**kwargs).to_dict(), peft.ShiraConfig(**kwargs).to_dict()
    assert set(ours) == set(hf) - {"mask_fn"}
    assert isinstance(PeftConfig.from_dict(json.loads(json.dumps({k: v for k, v in hf.items() if k != "mask_fn"},
                                                                  default=sorted))), ShiraConfig)
    back = peft.ShiraConfig.from_peft_type(**json.loads(json.dumps(ours)))
    assert (back.r, back.random_seed, back.init_weights, back.mask_type) == (4, 11, False, "random")


@pytest.mark.parametrize("kwargs,field", [
    (dict(r=0), "r"),
    (dict(r=-1), "r"),
    (dict(r="8"), "r"),
    (dict(random_seed=2**64), "random_seed"),
    (dict(init_weights="yes"), "init_weights"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ShiraConfig(**kwargs)


def test_unknown_kwargs_raise_as_in_hf():
    with pytest.raises(TypeError, match="exclude_modules"):
        ShiraConfig(exclude_modules=["lin0"])


def test_unknown_mask_type_warns_and_uses_the_mask_fn_or_the_saved_positions():
    with pytest.warns(UserWarning, match="mask_type='magnitude' is not recognized"):
        config = ShiraConfig(target_modules=["lin0"], r=1, mask_type="magnitude")
    with pytest.warns(UserWarning, match="no config.mask_fn is set: module 'lin0' gets random positions"):
        get_peft_model(make_model("mlp"), config)
    with tempfile.TemporaryDirectory() as tmp:
        with hf_oracle("HF peft saving a SHiRA adapter with a custom mask_type and mask_fn"):
            hf_config = peft.ShiraConfig(target_modules=["lin0"], r=1, mask_type="magnitude")
            hf_config.mask_fn = _first_rows_mask
            hf = peft.get_peft_model(make_model("mlp"), hf_config)
            perturb(hf, 0)
            hf.save_pretrained(tmp)
            expected = run(hf.eval(), make_inputs("mlp"))
        with pytest.warns(UserWarning, match="magnitude"):
            ours = PeftModel.from_pretrained(make_model("mlp"), tmp)
    assert torch.equal(_layers(ours)["base_model.model.lin0"].shira_indices["default"][0, :12], torch.tensor([0] * 10 + [1] * 2, dtype=torch.int32))
    torch.testing.assert_close(run(ours, make_inputs("mlp")), expected, atol=1e-6, rtol=0)


def test_r_larger_than_the_weight_allows_is_refused_naming_the_module():
    base = make_model("mlp")
    with pytest.raises(ConfigError, match=r"r=7 gives module 'lin0' \(16 x 10\).*182 SHiRA values, more than its 160"):
        get_peft_model(base, ShiraConfig(target_modules=["lin0"], r=7))
    assert not _layers(base)
    with pytest.raises(ValueError, match="more shira params"):  # HF refuses it too
        peft.get_peft_model(make_model("mlp"), peft.ShiraConfig(target_modules=["lin0"], r=7))


def test_conv1d_and_embedding_are_refused_as_in_hf():
    for kind, target in (("gpt2-conv1d", "c_fc"), ("embedding", "emb")):
        with pytest.raises(TargetNotFoundError, match=target):
            get_peft_model(make_model(kind), ShiraConfig(target_modules=[target], r=1))


def test_default_target_modules_are_hfs():
    for kind in ("llama", "bert", "opt"):
        ours = get_peft_model(make_model(kind), ShiraConfig(r=1))
        hf = peft.get_peft_model(make_model(kind), peft.ShiraConfig(r=1))
        hf_names = {n for n, m in hf.named_modules() if hasattr(m, "shira_weight")}
        assert set(_layers(ours)) == hf_names and hf_names, kind


# ---- merging, several active adapters --------------------------------------------------------
def test_merge_and_unload_weights_equal_hfs():
    with tempfile.TemporaryDirectory() as tmp:
        with hf_oracle("HF peft building, saving and merging a SHiRA adapter"):
            hf = peft.get_peft_model(make_model("llama"), peft.ShiraConfig(target_modules=["q_proj", "up_proj"], r=2, random_seed=1))
            perturb(hf, 2)
            hf.save_pretrained(tmp)
            expected = hf.merge_and_unload().state_dict()
        merged = PeftModel.from_pretrained(make_model("llama"), tmp).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=0)


def test_delta_weight_is_the_values_at_their_positions():
    model = get_peft_model(make_model("mlp"), ShiraConfig(target_modules=["lin1"], r=1, init_weights=False))
    layer = _layers(model)["base_model.model.lin1"]
    delta = layer.delta_weight("default").detach()
    rows, cols = layer.shira_indices["default"].long()
    assert torch.equal(delta[rows, cols], layer.shira_weight["default"].detach())
    assert delta.count_nonzero() == 32


def test_two_active_adapters_add_up_and_merge():
    config = lambda: ShiraConfig(target_modules=["lin0", "lin1"], r=1, random_seed=3)  # noqa: E731
    from peft_kernel_testing.hf_oracle import check_active_adapters_against_hf
    check_active_adapters_against_hf("mlp", lambda: peft.ShiraConfig(target_modules=["lin0", "lin1"], r=1, random_seed=3), config)


def test_safe_merge_refuses_non_finite_and_leaves_the_base():
    model = get_peft_model(make_model("mlp"), ShiraConfig(target_modules=["lin0"], r=1))
    base_weight = model.base_model.model.lin0.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.base_model.model.lin0.shira_weight["default"][0] = float("inf")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, base_weight)


# ---- mixed batches, dtypes ---------------------------------------------------------------------
@pytest.mark.parametrize("kind,targets", [("mlp", ["lin0", "lin1"]), ("llama", ["q_proj", "v_proj", "up_proj"])])
def test_mixed_batch_rows_equal_hf_single_runs(kind, targets):
    """HF peft 0.21.2 accepts ``adapter_names`` for SHiRA but serves every row with the active
    adapter; the reference is HF's single-adapter runs."""
    check_mixed_batch_against_hf(kind, lambda: peft.ShiraConfig(target_modules=targets, r=1, random_seed=0))


def test_mixed_batch_runs_one_sparse_product_per_adapter_not_per_row(monkeypatch):
    model = get_peft_model(make_model("mlp"), ShiraConfig(target_modules=["lin0", "lin1"], r=1), adapter_name="a")
    model.add_adapter("b", ShiraConfig(target_modules=["lin0", "lin1"], r=1, random_seed=1))
    perturb(model, 0)
    model.eval()
    calls = []
    original = ShiraLayer.delta
    monkeypatch.setattr(ShiraLayer, "delta", lambda self, x, name: calls.append((name, x.shape[0])) or original(self, x, name))
    inputs = make_inputs("mlp", batch=8)
    run(model, inputs, adapter_names=["a", "b", "a", "__base__", "b", "a", "a", "__base__"])
    assert sorted(calls) == [("a", 4), ("a", 4), ("b", 2), ("b", 2)]  # two layers, one product per adapter's rows


def test_sparse_delta_equals_the_dense_one_in_every_dtype():
    layer = _layers(get_peft_model(make_model("llama"), ShiraConfig(target_modules=["up_proj"], r=2, init_weights=False)))
    layer = next(iter(layer.values()))
    x = torch.randn(3, 5, 16)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        expected = x.double() @ layer.delta_weight("default").detach().double().T
        got = layer.delta(x.to(dtype), "default")
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, atol=1e-5 if dtype in (torch.float32, torch.float64) else 5e-2, rtol=1e-2)


def test_bfloat16_model_runs_merges_and_keeps_its_dtype():
    model = get_peft_model(make_model("llama"), ShiraConfig(target_modules=["q_proj"], r=1, init_weights=False)).to(torch.bfloat16).eval()
    inputs = make_inputs("llama")
    out = run(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    mixed = run(model, inputs, adapter_names=["default", "__base__", "default", "__base__"])
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed[0].float(), out[0].float(), atol=0.05, rtol=0.02)
    model.merge_adapter()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16


def test_generate_with_a_mixed_batch_matches_greedy_decoding():
    from peft_kernel_testing.generation import check_generate_matches_greedy

    model = get_peft_model(make_model("llama"), ShiraConfig(r=1, init_weights=False), adapter_name="a")
    model.add_adapter("b", ShiraConfig(r=2, random_seed=4, init_weights=False))
    ids = make_inputs("llama")["input_ids"][:3]
    check_generate_matches_greedy(model.eval(), ids, max_new_tokens=3, adapter_names=["b", "__base__", "a"])
