"""FourierFT-specific checks against HF peft: the seeded spectral positions (never saved, so they
must be redrawn bit-identically), the config, bad configs, merging, mixed batches."""

import dataclasses
import json
import tempfile

import pytest
import torch

from peft_kernel import ConfigError, PeftConfig, PeftModel, TargetNotFoundError, get_peft_model
from peft_kernel_testing import check_mixed_batch_against_hf, run
from peft_kernel_testing.hf_oracle import hf_oracle, perturb
from peft_kernel_testing.models import make_inputs, make_model
from peft_kernel_fourierft import FourierFTConfig
from peft_kernel_fourierft.layers import FourierFTLayer

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")


def _layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, FourierFTLayer)}


# ---- the positions ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind,kwargs", [
    ("mlp", dict(target_modules=["lin0", "lin1", "lin2"], n_frequency=37)),
    ("mlp", dict(target_modules=["lin0", "lin2"], n_frequency=64, random_loc_seed=0)),
    ("mlp", dict(target_modules=["lin0"], n_frequency=160, random_loc_seed=-5)),  # the full spectrum
    ("gpt2-conv1d", dict(target_modules=["c_fc", "c_proj"], n_frequency=50, random_loc_seed=2**40 + 3)),
    ("llama", dict(target_modules="all-linear", n_frequency=100, n_frequency_pattern={"down_proj": 7, "q_proj": 250})),
])
def test_positions_are_hfs(kind, kwargs):
    ours = get_peft_model(make_model(kind), FourierFTConfig(**kwargs))
    with hf_oracle("HF peft building a FourierFT model"):
        hf = peft.get_peft_model(make_model(kind), peft.FourierFTConfig(**kwargs))
        hf_layers = {name: m for name, m in hf.named_modules() if hasattr(m, "fourierft_spectrum")}
    layers = _layers(ours)
    assert layers and set(layers) == set(hf_layers)
    for name, layer in layers.items():
        expected = hf_layers[name].indices["default"]
        assert layer.indices["default"].dtype == expected.dtype
        assert torch.equal(layer.indices["default"], expected.cpu()), name
        assert layer.fourierft_spectrum["default"].shape == hf_layers[name].fourierft_spectrum["default"].shape


def test_positions_are_distinct_and_in_range():
    layer = _layers(get_peft_model(make_model("mlp"), FourierFTConfig(target_modules=["lin0"], n_frequency=160)))["base_model.model.lin0"]
    rows, cols = layer.indices["default"]
    assert rows.max() < 16 and cols.max() < 10
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 160


def test_delta_weight_is_the_scaled_inverse_dft_of_the_sparse_spectrum():
    model = get_peft_model(make_model("gpt2-conv1d"), FourierFTConfig(target_modules=["c_fc"], n_frequency=30, scaling=7.0))
    layer = _layers(model)["base_model.model.c_fc"]
    rows, cols = layer.indices["default"]
    dense = torch.zeros(16, 10, dtype=torch.complex64)
    dense[rows, cols] = layer.fourierft_spectrum["default"].detach().to(torch.complex64)
    m, n = torch.arange(16), torch.arange(10)
    # the 2-D inverse DFT written out: (1/MN) sum_{u,v} S[u,v] exp(2 pi i (u m / M + v n / N))
    left = torch.exp(2j * torch.pi * torch.outer(m, m) / 16)
    right = torch.exp(2j * torch.pi * torch.outer(n, n) / 10)
    expected = (left @ dense @ right).real / 160 * 7.0
    assert layer.delta_weight("default").shape == (10, 16)  # Conv1D layout [in, out]
    torch.testing.assert_close(layer.delta_weight("default").detach(), expected.T, atol=1e-5, rtol=1e-5)


def test_positions_survive_save_and_load_with_their_seed():
    config = lambda: FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=20, random_loc_seed=99)  # noqa: E731
    model = get_peft_model(make_model("mlp"), config())
    perturb(model, 0)
    inputs = make_inputs("mlp")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        assert json.load(open(f"{tmp}/adapter_config.json"))["random_loc_seed"] == 99
        loaded = PeftModel.from_pretrained(make_model("mlp"), tmp)
    for name, layer in _layers(loaded).items():
        assert torch.equal(layer.indices["default"], _layers(model)[name].indices["default"])
    assert torch.equal(run(loaded, inputs), run(model, inputs))


# ---- config ----------------------------------------------------------------------------------
def test_fields_and_defaults_are_hfs():
    ours = {f.name: f for f in FourierFTConfig.__attrs_attrs__}
    for field in dataclasses.fields(peft.FourierFTConfig):
        assert field.name in ours, field.name
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        ours_default = ours[field.name].default
        ours_default = ours_default.factory() if hasattr(ours_default, "factory") else ours_default
        if field.name != "peft_type":
            assert ours_default == default, field.name
    assert FourierFTConfig().peft_type == "FOURIERFT"


def test_config_dicts_load_both_ways():
    kwargs = dict(target_modules=["q_proj", "v_proj"], n_frequency=123, scaling=30.5, random_loc_seed=5,
                  n_frequency_pattern={"v_proj": 9}, init_weights=True, bias="fourier_only")
    ours, hf = FourierFTConfig(**kwargs).to_dict(), peft.FourierFTConfig(**kwargs).to_dict()
    assert set(ours) == set(hf)
    for key in hf:
        if key not in ("target_modules", "peft_type", "peft_version"):
            assert ours[key] == hf[key], key
    assert isinstance(PeftConfig.from_dict(json.loads(json.dumps(hf, default=sorted))), FourierFTConfig)
    back = peft.FourierFTConfig.from_peft_type(**json.loads(json.dumps(ours)))
    assert (back.n_frequency, back.scaling, back.random_loc_seed, back.n_frequency_pattern) == (123, 30.5, 5, {"v_proj": 9})


@pytest.mark.parametrize("kwargs,field", [
    (dict(n_frequency=0), "n_frequency"),
    (dict(n_frequency=-3), "n_frequency"),
    (dict(n_frequency_pattern={"lin0": 0}), "n_frequency_pattern"),
    (dict(bias="lora_only"), "bias"),
    (dict(random_loc_seed=2**64), "random_loc_seed"),
    (dict(scaling="big"), "scaling"),
    (dict(layers_pattern="layers"), "layers_to_transform"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        FourierFTConfig(**kwargs)


@pytest.mark.parametrize("kwargs,module", [
    (dict(target_modules=["lin0", "lin1"], n_frequency=161), "lin0"),  # lin0 is 16 x 10
    (dict(target_modules=["lin0", "lin1"], n_frequency=100, n_frequency_pattern={"lin1": 257}), "lin1"),
])
def test_n_frequency_larger_than_the_weight_is_refused(kwargs, module):
    base = make_model("mlp")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"n_frequency=\d+ is larger than the \d+ spectral positions of module '{module}'"):
        get_peft_model(base, FourierFTConfig(**kwargs))
    assert not _layers(base) and all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="n_frequency"):  # HF refuses these too
        peft.get_peft_model(make_model("mlp"), peft.FourierFTConfig(**kwargs))


def test_seed_none_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="random_loc_seed"):
        get_peft_model(make_model("mlp"), FourierFTConfig(target_modules=["lin0"], n_frequency=4, random_loc_seed=None))


def test_non_linear_targets_are_refused():
    with pytest.raises(TargetNotFoundError, match="emb"):
        get_peft_model(make_model("embedding"), FourierFTConfig(target_modules=["emb"], n_frequency=4))


def test_default_target_modules_are_hfs():
    for kind in ("gpt2", "llama", "bert"):
        ours = get_peft_model(make_model(kind), FourierFTConfig(n_frequency=8))
        hf = peft.get_peft_model(make_model(kind), peft.FourierFTConfig(n_frequency=8))
        hf_names = {n for n, m in hf.named_modules() if hasattr(m, "fourierft_spectrum")}
        assert set(_layers(ours)) == hf_names and hf_names, kind


# ---- merging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,targets", [("mlp", ["lin0", "lin1"]), ("gpt2-conv1d", ["c_fc", "c_proj"])])
def test_merge_and_unload_weights_equal_hfs(kind, targets):
    config = dict(target_modules=targets, n_frequency=40, scaling=20.0)
    with tempfile.TemporaryDirectory() as tmp:
        with hf_oracle("HF peft building, saving and merging a FourierFT adapter"):
            hf = peft.get_peft_model(make_model(kind), peft.FourierFTConfig(**config))
            perturb(hf, 2)
            hf.save_pretrained(tmp)
            expected = hf.merge_and_unload().state_dict()
        merged = PeftModel.from_pretrained(make_model(kind), tmp).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=1e-6)


def test_safe_merge_refuses_non_finite_and_leaves_the_base():
    model = get_peft_model(make_model("mlp"), FourierFTConfig(target_modules=["lin0"], n_frequency=8))
    inputs = make_inputs("mlp")
    expected = run(model, inputs)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-4, rtol=0)
    model.unmerge_adapter()
    base_weight = model.base_model.model.lin0.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.base_model.model.lin0.fourierft_spectrum["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, base_weight)


# ---- mixed batches, dtypes ---------------------------------------------------------------------
@pytest.mark.parametrize("kind,targets", [("mlp", ["lin0", "lin1"]), ("gpt2-conv1d", ["c_fc"]),
                                          ("llama", ["q_proj", "v_proj", "up_proj"])])
def test_mixed_batch_rows_equal_hf_single_runs(kind, targets):
    check_mixed_batch_against_hf(
        kind, lambda: peft.FourierFTConfig(target_modules=targets, n_frequency=30, scaling=25.0, init_weights=True))


def test_bfloat16_model_runs_and_keeps_its_dtype():
    model = get_peft_model(make_model("llama"), FourierFTConfig(target_modules=["q_proj"], n_frequency=20)).to(torch.bfloat16)
    out = model(**make_inputs("llama")).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.merge_adapter()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16


def test_mixed_batch_builds_each_delta_once_per_adapter_not_per_row(monkeypatch):
    model = get_peft_model(make_model("mlp"), FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=16), adapter_name="a")
    model.add_adapter("b", FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=16))
    perturb(model, 0)
    model.eval()
    calls = []
    original = FourierFTLayer.spectral_delta
    monkeypatch.setattr(FourierFTLayer, "spectral_delta", lambda self, name: calls.append(name) or original(self, name))
    run(model, make_inputs("mlp"), adapter_names=["a", "b", "a", "__base__"])
    assert sorted(calls) == ["a", "a", "b", "b"]  # two layers, one delta W per adapter each
