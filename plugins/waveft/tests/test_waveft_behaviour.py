"""WaveFT-specific checks: the seeded positions (never saved, so redrawn bit-identically to HF's),
the inverse wavelet transform (against HF for the families HF can run, against PyWavelets'
``idwt2`` for every family), proportional allocation, the config, bad configs, merging, mixed
batches."""

import dataclasses
import json
import math
import tempfile

import numpy as np
import pytest
import pywt
import torch
from torch import nn

from peft_kernel import ConfigError, PeftConfig, PeftModel, TargetNotFoundError, get_peft_model
from peft_kernel_testing import check_mixed_batch_against_hf, run
from peft_kernel_testing.hf_oracle import hf_oracle, perturb
from peft_kernel_testing.models import make_inputs, make_model
from peft_kernel_waveft import WaveFTConfig
from peft_kernel_waveft.config import WAVELET_FAMILIES
from peft_kernel_waveft.layers import WaveFTLayer
from peft_kernel_waveft.wavelets import inverse_dwt2, synthesis_filters

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to:UserWarning")

HF_RUNNABLE = [*(f"db{n}" for n in range(1, 11)), *(f"sym{n}" for n in range(2, 11)), "coif1", "coif2", "coif3"]
"""The families HF PEFT 0.21.2 computes correctly: its config accepts all of WAVELET_FAMILIES, but its
transform knows only db1-10, sym2-10, coif1-5, and its coif4 / coif5 filters are wrong (see below)."""


def _layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, WaveFTLayer)}


def _hf_layers(model):
    return {name: m for name, m in model.named_modules() if hasattr(m, "waveft_spectrum")}


class Lines(nn.Module):
    """Independent linears of the given ``(in, out)`` sizes, for proportional allocation."""

    def __init__(self, sizes):
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(i, o) for i, o in sizes)

    def forward(self, x):
        return x


# ---- the positions ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind,kwargs", [
    ("mlp", dict(target_modules=["lin0", "lin1", "lin2"], n_frequency=37)),
    ("mlp", dict(target_modules=["lin0"], n_frequency=160, random_loc_seed=-5)),  # every position
    ("gpt2-conv1d", dict(target_modules=["c_fc", "c_proj"], n_frequency=50, random_loc_seed=2**40 + 3)),
    ("llama", dict(target_modules="all-linear", n_frequency=100, n_frequency_pattern={"down_proj": 7, "q_proj": 250})),
    ("llama", dict(target_modules="all-linear", n_frequency=60, proportional_parameters=True)),
])
def test_positions_and_counts_are_hfs(kind, kwargs):
    ours = get_peft_model(make_model(kind), WaveFTConfig(**kwargs))
    with hf_oracle("HF peft building a WaveFT model"):
        hf_layers = _hf_layers(peft.get_peft_model(make_model(kind), peft.WaveFTConfig(**kwargs)))
    layers = _layers(ours)
    assert layers and set(layers) == set(hf_layers)
    for name, layer in layers.items():
        expected = hf_layers[name].waveft_indices["default"]
        assert layer.waveft_indices["default"].dtype == expected.dtype
        assert torch.equal(layer.waveft_indices["default"], expected.cpu()), name
        assert layer.waveft_n_frequency["default"] == hf_layers[name].waveft_n_frequency["default"], name


def test_positions_survive_save_and_load_with_their_seed():
    config = lambda: WaveFTConfig(target_modules=["lin0", "lin1"], n_frequency=20, random_loc_seed=99, wavelet_family="sym3")  # noqa: E731
    model = get_peft_model(make_model("mlp"), config())
    perturb(model, 0)
    inputs = make_inputs("mlp")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved = json.load(open(f"{tmp}/adapter_config.json"))
        assert (saved["random_loc_seed"], saved["wavelet_family"]) == (99, "sym3")
        loaded = PeftModel.from_pretrained(make_model("mlp"), tmp)
    for name, layer in _layers(loaded).items():
        assert torch.equal(layer.waveft_indices["default"], _layers(model)[name].waveft_indices["default"])
    assert torch.equal(run(loaded, inputs), run(model, inputs))


# ---- the transform ---------------------------------------------------------------------------
def _hf_delta(family, out_features, in_features, use_idwt=True, seed=0):
    """HF's ``delta W`` (scaling 1) of a Linear with every coefficient position learned, and the
    dense coefficient matrix it came from."""
    torch.manual_seed(seed)
    with hf_oracle("HF peft computing a WaveFT delta weight"):
        model = peft.get_peft_model(Lines([(in_features, out_features)]), peft.WaveFTConfig(
            target_modules=["ls.0"], n_frequency=out_features * in_features, wavelet_family=family, scaling=1.0,
            init_weights=False, use_idwt=use_idwt))
        layer = model.base_model.model.ls[0]
        rows, cols = layer.waveft_indices["default"]
        coefficients = torch.zeros(out_features, in_features)
        coefficients[rows, cols] = layer.waveft_spectrum["default"].detach() * 100
        with torch.no_grad():
            layer.waveft_spectrum["default"].mul_(100)
        return layer.get_delta_weight("default").detach(), coefficients


@pytest.mark.parametrize("family", HF_RUNNABLE)
def test_inverse_transform_equals_hfs(family):
    for out_features, in_features in [(16, 10), (7, 13), (1, 5)]:
        expected, coefficients = _hf_delta(family, out_features, in_features)
        torch.testing.assert_close(inverse_dwt2(coefficients, family), expected, atol=1e-5, rtol=1e-5)


def test_use_idwt_false_is_the_sparse_coefficient_matrix_as_in_hf():
    expected, coefficients = _hf_delta("db4", 9, 6, use_idwt=False)
    model = get_peft_model(Lines([(6, 9)]), WaveFTConfig(target_modules=["ls.0"], n_frequency=54, use_idwt=False, scaling=1.0))
    layer = _layers(model)["base_model.model.ls.0"]
    rows, cols = layer.waveft_indices["default"]
    with torch.no_grad():
        layer.waveft_spectrum["default"].copy_(coefficients[rows, cols])
    assert torch.equal(layer.delta_weight("default"), expected)


def _pywt_reference(coefficients: np.ndarray, family: str) -> np.ndarray:
    """PyWavelets' ``idwt2`` (mode ``zero``) of the four quadrants, each padded to ``h + (L - 2) / 2``
    per axis (a first-half axis in front, a second-half one at the end); cropped to the matrix size."""
    rows, cols = coefficients.shape
    pad = (pywt.Wavelet(family).dec_len - 2) // 2
    h0, h1 = math.ceil(rows / 2), math.ceil(cols / 2)

    def block(top, left):
        part = coefficients[:h0 if top else rows][h0 * (not top):, :h1 if left else cols][:, h1 * (not left):]
        out = np.zeros((h0 + pad, h1 + pad))
        r, c = pad * top, pad * left
        out[r:r + part.shape[0], c:c + part.shape[1]] = part
        return out

    approx, detail_rows, detail_cols, diagonal = block(True, True), block(True, False), block(False, True), block(False, False)
    return pywt.idwt2((approx, (detail_rows, detail_cols, diagonal)), family, mode="zero")[:rows, :cols]


@pytest.mark.parametrize("family", WAVELET_FAMILIES)
def test_inverse_transform_equals_pywavelets_idwt2_for_every_family(family):
    generator = torch.Generator().manual_seed(len(family))
    for shape in [(16, 10), (9, 14), (1, 3)]:
        coefficients = torch.randn(shape, generator=generator, dtype=torch.float64)
        expected = torch.from_numpy(_pywt_reference(coefficients.numpy(), family))
        torch.testing.assert_close(inverse_dwt2(coefficients, family), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("family", WAVELET_FAMILIES)
def test_synthesis_filters_are_orthonormal_wavelet_filters(family):
    low, high = (torch.tensor(f, dtype=torch.float64) for f in synthesis_filters(family))
    assert len(low) == len(high) and len(low) % 2 == 0
    torch.testing.assert_close(low.sum(), torch.tensor(math.sqrt(2), dtype=torch.float64))
    torch.testing.assert_close(low.norm(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(low @ high, torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("family", ["db11", "sym20", "coif9", "coif5"])
def test_families_hf_accepts_but_cannot_run_work_here(family):
    """HF PEFT 0.21.2 bugs: its config accepts db1-38, sym2-20, coif1-17, but its transform knows only
    db1-10, sym2-10, coif1-5 ("Unknown wavelet name" at the first forward), and its coif5 gives a
    ``delta W`` of the wrong shape (a shape error). Here every accepted family runs (PyWavelets'
    filters; the transform is checked against ``pywt.idwt2`` above)."""
    config = dict(target_modules=["lin0"], n_frequency=40, wavelet_family=family, init_weights=False)
    inputs = make_inputs("mlp")
    ours = get_peft_model(make_model("mlp"), WaveFTConfig(**config))
    assert torch.isfinite(run(ours, inputs)).all() and not torch.equal(run(ours, inputs), run(make_model("mlp"), inputs))
    hf = peft.get_peft_model(make_model("mlp"), peft.WaveFTConfig(**config))
    with pytest.raises((ValueError, RuntimeError)):
        run(hf, inputs)


def test_hfs_coif4_filter_is_not_the_coiflet():
    """HF PEFT 0.21.2's coif4 filter is not an orthonormal wavelet filter (its low-pass taps sum to
    1.4485, not sqrt(2); norm 1.0049; up to 0.012 off PyWavelets' coif4), so its coif4 ``delta W``
    differs from the inverse transform by about 1e-3 of the coefficients. Here coif4 is PyWavelets'."""
    expected, coefficients = _hf_delta("coif4", 24, 20)
    ours = inverse_dwt2(coefficients, "coif4")
    reference = torch.from_numpy(_pywt_reference(coefficients.double().numpy(), "coif4")).float()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert (expected - ours).abs().max() > 1e-3 * coefficients.abs().max()


def test_a_haar_coefficient_in_each_quadrant():
    """db1 by hand: 2 x 2 blocks of +-1/2; the bottom-left quadrant is high-pass along columns."""
    unit = torch.zeros(4, 6)
    for (r, c), block in {(0, 0): [[1, 1], [1, 1]], (2, 0): [[1, -1], [1, -1]], (0, 3): [[1, 1], [-1, -1]],
                          (3, 5): [[1, -1], [-1, 1]]}.items():
        coefficients = unit.clone()
        coefficients[r, c] = 1.0
        expected = unit.clone()
        row0, col0 = 2 * (r % 2 if r < 2 else r - 2), 2 * (c % 3 if c < 3 else c - 3)
        expected[row0:row0 + 2, col0:col0 + 2] = torch.tensor(block) / 2
        torch.testing.assert_close(inverse_dwt2(coefficients, "db1"), expected)


def test_the_transform_is_differentiable():
    coefficients = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: inverse_dwt2(c, "sym2"), (coefficients,), fast_mode=True)
    model = get_peft_model(make_model("mlp"), WaveFTConfig(target_modules=["lin0"], n_frequency=30, wavelet_family="coif1"))
    model(**make_inputs("mlp")).sum().backward()
    grad = _layers(model)["base_model.model.lin0"].waveft_spectrum["default"].grad
    assert grad is not None and grad.abs().sum() > 0


# ---- proportional allocation -------------------------------------------------------------------
@pytest.mark.parametrize("sizes,n_frequency", [
    ([(10, 16), (16, 6), (6, 3)], 10),
    ([(4, 4), (4, 12)], 3),  # exact halves: round half to even
    ([(1, 10), (10, 10), (1, 10)], 14),  # ties that only HF's order of operations rounds the same
    ([(1, 14), (14, 14), (1, 14)], 12),
    ([(2, 7), (7, 10), (2, 10)], 26),
    ([(2, 7), (7, 14), (2, 14)], 15),
    ([(1, 1), (40, 40)], 5),  # at least one coefficient each
])
def test_proportional_counts_are_hfs(sizes, n_frequency):
    config = dict(target_modules=r".*ls\.\d+", n_frequency=n_frequency, proportional_parameters=True,
                  n_frequency_pattern={"ls.1": 1})  # ignored with proportional_parameters, as in HF
    ours = [layer.waveft_n_frequency["default"] for layer in _layers(get_peft_model(Lines(sizes), WaveFTConfig(**config))).values()]
    with hf_oracle("HF peft allocating WaveFT coefficients proportionally"):
        hf = [m.waveft_n_frequency["default"] for m in _hf_layers(peft.get_peft_model(Lines(sizes), peft.WaveFTConfig(**config))).values()]
    assert ours == hf


def test_proportional_counts_cover_only_the_targets():
    model = get_peft_model(Lines([(8, 8), (2, 2), (4, 4)]), WaveFTConfig(target_modules=["ls.0", "ls.1"], n_frequency=10,
                                                                         proportional_parameters=True))
    assert [layer.waveft_n_frequency["default"] for layer in _layers(model).values()] == [19, 1]  # 20 * 64 / 68, 20 * 4 / 68


def test_init_weights_false_draws_hfs_coefficients():
    torch.manual_seed(5)
    ours = get_peft_model(make_model("gpt2-conv1d"), WaveFTConfig(target_modules=["c_fc", "c_proj"], n_frequency=30, init_weights=False))
    with hf_oracle("HF peft building a WaveFT model"):
        torch.manual_seed(5)
        hf = _hf_layers(peft.get_peft_model(make_model("gpt2-conv1d"), peft.WaveFTConfig(
            target_modules=["c_fc", "c_proj"], n_frequency=30, init_weights=False)))
    torch.manual_seed(5)
    make_model("gpt2-conv1d")
    for name, layer in _layers(ours).items():
        assert torch.equal(layer.waveft_spectrum["default"], hf[name].waveft_spectrum["default"]), name
    assert 0.005 < layer.waveft_spectrum["default"].std() < 0.02


# ---- config ----------------------------------------------------------------------------------
def test_fields_and_defaults_are_hfs():
    ours = {f.name: f for f in WaveFTConfig.__attrs_attrs__}
    for field in dataclasses.fields(peft.WaveFTConfig):
        assert field.name in ours, field.name
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        ours_default = ours[field.name].default
        ours_default = ours_default.factory() if hasattr(ours_default, "factory") else ours_default
        if field.name != "peft_type":
            assert ours_default == default, field.name
    assert WaveFTConfig().peft_type == "WAVEFT"


def test_config_dicts_load_both_ways():
    kwargs = dict(target_modules=["q_proj", "v_proj"], n_frequency=123, scaling=30.5, random_loc_seed=5, wavelet_family="coif2",
                  use_idwt=False, n_frequency_pattern={"v_proj": 9}, init_weights=False, bias="waveft_only",
                  proportional_parameters=True)
    ours, hf = WaveFTConfig(**kwargs).to_dict(), peft.WaveFTConfig(**kwargs).to_dict()
    assert set(ours) == set(hf)
    for key in hf:
        if key not in ("target_modules", "peft_type", "peft_version"):
            assert ours[key] == hf[key], key
    assert isinstance(PeftConfig.from_dict(json.loads(json.dumps(hf, default=sorted))), WaveFTConfig)
    back = peft.WaveFTConfig.from_peft_type(**json.loads(json.dumps(ours)))
    assert (back.n_frequency, back.wavelet_family, back.use_idwt, back.proportional_parameters) == (123, "coif2", False, True)


def test_accepted_wavelet_families_are_hfs():
    with pytest.raises(ValueError) as refused:
        peft.WaveFTConfig(wavelet_family="haar")
    hf_list = refused.value.args[0].split("Supported wavelet families are: ")[1]
    assert hf_list == str(list(WAVELET_FAMILIES))


@pytest.mark.parametrize("kwargs,field", [
    (dict(wavelet_family="haar"), "wavelet_family"),
    (dict(wavelet_family="bior1.3"), "wavelet_family"),
    (dict(n_frequency=0), "n_frequency"),
    (dict(n_frequency=-3), "n_frequency"),
    (dict(n_frequency_pattern={"lin0": 0}), "n_frequency_pattern"),
    (dict(bias="fourier_only"), "bias"),
    (dict(random_loc_seed=None), "random_loc_seed"),
    (dict(random_loc_seed=2**64), "random_loc_seed"),
    (dict(scaling="big"), "scaling"),
    (dict(use_idwt="yes"), "use_idwt"),
    (dict(layers_pattern="layers"), "layers_to_transform"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        WaveFTConfig(**kwargs)


def test_unknown_arguments_are_refused():
    with pytest.raises(TypeError, match="n_coefficients"):
        WaveFTConfig(n_coefficients=3)


@pytest.mark.parametrize("kwargs,field,module", [
    (dict(target_modules=["lin0", "lin1"], n_frequency=161), "n_frequency", "lin0"),  # lin0 is 16 x 10
    (dict(target_modules=["lin0", "lin1"], n_frequency=100, n_frequency_pattern={"lin1": 257}), "n_frequency_pattern", "lin1"),
    (dict(target_modules=["lin0", "lin2"], n_frequency=115, proportional_parameters=True), "n_frequency", "lin0"),  # 230 * 160 / 224
])
def test_more_coefficients_than_weights_are_refused(kwargs, field, module):
    base = make_model("mlp")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"WaveFTConfig\.{field}: \d+ coefficients for module '{module}' are more than"):
        get_peft_model(base, WaveFTConfig(**kwargs))
    assert not _layers(base) and all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="n_frequency"):  # HF refuses these too
        peft.get_peft_model(make_model("mlp"), peft.WaveFTConfig(**kwargs))


@pytest.mark.parametrize("kind,target", [("embedding", "emb"), ("conv2d", "conv0")])
def test_non_linear_targets_are_refused(kind, target):
    model = make_model(kind)
    assert target in dict(model.named_modules())
    with pytest.raises(TargetNotFoundError, match=target):
        get_peft_model(model, WaveFTConfig(target_modules=[target], n_frequency=4))


def test_default_target_modules_are_hfs():
    for kind in ("gpt2", "llama", "bert"):
        ours = get_peft_model(make_model(kind), WaveFTConfig(n_frequency=8))
        hf = peft.get_peft_model(make_model(kind), peft.WaveFTConfig(n_frequency=8))
        hf_names = set(_hf_layers(hf))
        assert set(_layers(ours)) == hf_names and hf_names, kind


# ---- merging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,targets,family", [("mlp", ["lin0", "lin1"], "db6"), ("gpt2-conv1d", ["c_fc", "c_proj"], "sym5")])
def test_merge_and_unload_weights_equal_hfs(kind, targets, family):
    config = dict(target_modules=targets, n_frequency=40, wavelet_family=family)
    with tempfile.TemporaryDirectory() as tmp:
        with hf_oracle("HF peft building, saving and merging a WaveFT adapter"):
            hf = peft.get_peft_model(make_model(kind), peft.WaveFTConfig(**config))
            perturb(hf, 2)
            hf.save_pretrained(tmp)
            expected = hf.merge_and_unload().state_dict()
        merged = PeftModel.from_pretrained(make_model(kind), tmp).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_non_finite_and_leaves_the_base():
    model = get_peft_model(make_model("mlp"), WaveFTConfig(target_modules=["lin0"], n_frequency=8, init_weights=False))
    inputs = make_inputs("mlp")
    expected = run(model, inputs)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-4, rtol=0)
    model.unmerge_adapter()
    base_weight = model.base_model.model.lin0.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.base_model.model.lin0.waveft_spectrum["default"][0] = float("inf")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, base_weight)


# ---- mixed batches, dtypes ---------------------------------------------------------------------
@pytest.mark.parametrize("kind,targets", [("mlp", ["lin0", "lin1"]), ("gpt2-conv1d", ["c_fc"]), ("llama", ["q_proj", "v_proj", "up_proj"])])
def test_mixed_batch_rows_equal_hf_single_runs(kind, targets):
    check_mixed_batch_against_hf(kind, lambda: peft.WaveFTConfig(target_modules=targets, n_frequency=30, scaling=5.0, wavelet_family="db2"))


def _two_family_model():
    model = get_peft_model(make_model("mlp"), WaveFTConfig(target_modules=["lin0", "lin1"], n_frequency=16, wavelet_family="db1"),
                           adapter_name="a")
    model.add_adapter("b", WaveFTConfig(target_modules=["lin1", "lin2"], n_frequency=20, wavelet_family="coif3", random_loc_seed=3))
    model.add_adapter("c", WaveFTConfig(target_modules=["lin0"], n_frequency=12, use_idwt=False, scaling=2.0))
    for name in "abc":
        model.set_adapter(name)
        perturb(model, ord(name))
    return model.eval()


def test_mixed_batch_of_different_families_equals_single_adapter_runs():
    model = _two_family_model()
    inputs = make_inputs("mlp")
    names = ["b", "a", "__base__", "c"]
    mixed = run(model, inputs, adapter_names=names)
    singles = {}
    for name in "abc":
        model.set_adapter(name)
        singles[name] = run(model, inputs)
    with model.disable_adapter():
        singles["__base__"] = run(model, inputs)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-5, rtol=1e-5)


def test_mixed_batch_builds_each_delta_once_per_adapter_not_per_row(monkeypatch):
    model = _two_family_model()
    calls = []
    original = WaveFTLayer.spectral_delta
    monkeypatch.setattr(WaveFTLayer, "spectral_delta", lambda self, name: calls.append(name) or original(self, name))
    run(model, make_inputs("mlp"), adapter_names=["a", "c", "b", "a"])
    assert sorted(calls) == ["a", "a", "b", "b", "c"]  # one delta W per adapter per layer that holds it


def test_bfloat16_model_runs_and_keeps_its_dtype():
    model = get_peft_model(make_model("llama"), WaveFTConfig(target_modules=["q_proj"], n_frequency=20, wavelet_family="db3",
                                                             init_weights=False)).to(torch.bfloat16)
    out = model(**make_inputs("llama")).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.merge_adapter()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16


def test_saved_keys_are_hfs():
    config = dict(target_modules=["lin0", "lin1"], n_frequency=10)
    with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as hf_dir:
        get_peft_model(make_model("mlp"), WaveFTConfig(**config)).save_pretrained(ours_dir)
        peft.get_peft_model(make_model("mlp"), peft.WaveFTConfig(**config)).save_pretrained(hf_dir)
        from safetensors.torch import load_file

        ours, hf = load_file(f"{ours_dir}/adapter_model.safetensors"), load_file(f"{hf_dir}/adapter_model.safetensors")
    assert sorted(ours) == sorted(hf) == ["base_model.model.lin0.waveft_spectrum", "base_model.model.lin1.waveft_spectrum"]
