"""BOFT specifics: the butterfly against an independent dense oracle, layer outputs against the
reference formula, HF PEFT's layouts, multi-adapter order, Conv2d beyond HF's unmerged forward,
HF's extension-less fallback, mixed batches, merge / unmerge, dropout and config errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from boft_hf_standin import hf_fbd_standin  # noqa: F401  (autouse fixture: HF's extension, per test)
from peft_kernel import PeftModel, get_peft_model
from peft_kernel import TargetNotFoundError
from peft_kernel.plugin_api import ConfigError
from peft_kernel_boft import BOFTConfig
from peft_kernel_orthogonal import butterfly

pytestmark = pytest.mark.filterwarnings("ignore:.*fbd_cuda|Failed to load the CUDA extension|Setting boft_n_butterfly")


# ---- an independent oracle: dense factor matrices from explicit index arithmetic --------------
def dense_factor(blocks: torch.Tensor, factor: int) -> torch.Tensor:
    """``G_factor`` (``x -> x G``) built entry by entry: feature ``f`` of factor ``i`` lies in
    segment ``f // (b 2^i)``; in its segment, half ``o // (b/2 2^i)``, chunk ``(o mod b/2 2^i) // (b/2)``;
    chunk ``k`` of both halves form block ``segment * 2^i + k`` (factor 0: consecutive blocks)."""
    num, b, _ = blocks.shape
    d = num * b

    def place(f: int) -> tuple[int, int]:
        if factor == 0:
            return f // b, f % b
        h, span = b // 2, 2**factor
        seg, o = divmod(f, b * span)
        half, rest = divmod(o, h * span)
        k, j = divmod(rest, h)
        return seg * span + k, half * h + j

    g = torch.zeros(d, d, dtype=blocks.dtype)
    places = [place(f) for f in range(d)]
    for f, (blk, p) in enumerate(places):
        for f2, (blk2, p2) in enumerate(places):
            if blk == blk2:
                g[f, f2] = blocks[blk, p, p2]
    return g


def dense_rotation(blocks: torch.Tensor) -> torch.Tensor:
    """``R = G_{m-1} ... G_0`` (HF's composition: factor ``m - 1`` acts on ``x`` first)."""
    rotation = torch.eye(blocks.shape[1] * blocks.shape[2], dtype=blocks.dtype)
    for i in reversed(range(blocks.shape[0])):
        rotation = rotation @ dense_factor(blocks[i], i)
    return rotation


def rotation_blocks(raw: torch.Tensor) -> torch.Tensor:
    """Exact Cayley blocks of ``boft_R``'s skew part, written out: ``(I + Q)^-1 (I - Q)``."""
    q = 0.5 * (raw - raw.transpose(-1, -2))
    eye = torch.eye(raw.shape[-1], dtype=raw.dtype)
    return torch.linalg.inv(eye + q) @ (eye - q)


LAYOUTS = [(16, 2, 3), (64, 4, 4), (48, 6, 3), (24, 8, 1), (18, 3, 1), (32, 8, 3)]


@pytest.mark.parametrize("d,b,m", LAYOUTS)
def test_butterfly_matches_dense_oracle(d: int, b: int, m: int) -> None:
    g = torch.Generator().manual_seed(0)
    blocks = rotation_blocks(torch.randn(m, d // b, b, b, generator=g, dtype=torch.float64))
    rotation = dense_rotation(blocks)
    x = torch.randn(5, 2, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(butterfly.apply_butterfly(x, blocks), x @ rotation)
    torch.testing.assert_close(butterfly.apply_butterfly(x, blocks, transpose=True), x @ rotation.T)
    torch.testing.assert_close(butterfly.butterfly_matrix(blocks), rotation)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(d, dtype=torch.float64))
    per_row = torch.stack([blocks, rotation_blocks(torch.randn(blocks.shape, generator=g, dtype=torch.float64))] * 3)[:5]
    expected = torch.stack([x[i] @ dense_rotation(per_row[i]) for i in range(5)])
    torch.testing.assert_close(butterfly.apply_row_butterfly(x, per_row), expected)


def test_butterfly_factors_connect_every_feature() -> None:
    """With ``log2(D) + 1`` factors every output feature depends on every input (dense connectivity)."""
    blocks = rotation_blocks(torch.randn(4, 8, 2, 2, dtype=torch.float64))
    assert (butterfly.butterfly_matrix(blocks).abs() > 1e-12).all()
    assert (butterfly.butterfly_matrix(blocks[:3]).abs() > 1e-12).sum() < 16 * 16


def test_butterfly_dropout_replaces_blocks_of_one_factor() -> None:
    torch.manual_seed(0)
    blocks = rotation_blocks(torch.randn(3, 8, 4, 4))
    eye = torch.eye(4)
    for _ in range(10):
        dropped = butterfly.butterfly_dropout(blocks, 0.5)
        is_eye = (dropped - eye).abs().amax((-1, -2)) < 1e-7
        assert is_eye.sum() == 4 and is_eye.any(1).sum() == 1  # int(0.5 * 8) blocks of one factor
        assert torch.equal(dropped[~is_eye], blocks[~is_eye])
    assert butterfly.butterfly_dropout(blocks, 0.1) is blocks  # int(0.1 * 8) == 0


# ---- layers against the reference formula ---------------------------------------------------
def _adapted(model: nn.Module, config: BOFTConfig, seed: int = 0, name: str = "default") -> PeftModel:
    peft_model = get_peft_model(model, config, adapter_name=name)
    _randomise(peft_model, seed)
    return peft_model.eval()


def _randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "boft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "boft_s" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def _reference_weight(weight: torch.Tensor, raw: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rotation = dense_rotation(rotation_blocks(raw.double()))
    w = weight.double().flatten(1) @ rotation.T * scale.double().reshape(-1, 1)
    return w.reshape(weight.shape).float()


@pytest.mark.parametrize("kwargs", [dict(boft_block_size=4, boft_n_butterfly_factor=3),
                                    dict(boft_block_size=0, boft_block_num=2, boft_n_butterfly_factor=2),
                                    dict(boft_block_size=16)])
@pytest.mark.parametrize("shape", [(2, 32), (3, 7, 32)], ids=["rotates-input", "folds-weight"])
def test_linear_is_reference_formula(kwargs: dict, shape: tuple[int, ...]) -> None:
    """Both forms of the forward (2 tokens < 5 outputs: the input is rotated; 21 tokens: the weight)."""
    base = nn.Sequential(nn.Linear(32, 5))
    expected_base = copy.deepcopy(base[0])
    model = _adapted(base, BOFTConfig(target_modules=["0"], **kwargs))
    layer = model.base_model.model[0]
    x = torch.randn(shape)
    weight = _reference_weight(expected_base.weight, layer.boft_R["default"].detach(), layer.boft_s["default"].detach())
    torch.testing.assert_close(model(x), F.linear(x, weight, expected_base.bias), atol=1e-5, rtol=1e-5)


CONVS = {
    "square": lambda: nn.Conv2d(4, 6, 2),
    "non-square-kernel": lambda: nn.Conv2d(4, 6, (1, 4)),
    "padding-tuple": lambda: nn.Conv2d(4, 6, 2, padding=(1, 2)),
    "stride-tuple": lambda: nn.Conv2d(4, 6, 2, stride=(1, 2)),
    "dilation": lambda: nn.Conv2d(4, 6, 2, dilation=2),
    "reflect": lambda: nn.Conv2d(4, 6, 2, padding=1, padding_mode="reflect"),
    "groups": lambda: nn.Conv2d(8, 6, 2, groups=2),
    "no-bias": lambda: nn.Conv2d(4, 6, 2, bias=False),
}


@pytest.mark.parametrize("kind", list(CONVS))
def test_conv2d_is_reference_formula(kind: str) -> None:
    """Every Conv2d setting is honoured: the rotated, scaled kernel in the base convolution."""
    torch.manual_seed(0)
    base = nn.Sequential(CONVS[kind]())
    expected_base = copy.deepcopy(base[0])
    model = _adapted(base, BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2))
    layer = model.base_model.model[0]
    x = torch.randn(2, expected_base.in_channels, 7, 7)
    weight = _reference_weight(expected_base.weight, layer.boft_R["default"].detach(), layer.boft_s["default"].detach())
    expected = expected_base._conv_forward(x, weight, expected_base.bias)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, expected_base.weight, atol=1e-6, rtol=0)


# ---- HF PEFT: shapes, Conv2d, several adapters, its fallback without the extension ----------
def _hf_model(model: nn.Module, seed: int = 0, adapter_name: str = "default", **kwargs: object) -> nn.Module:
    import peft

    hf = peft.get_peft_model(model, peft.BOFTConfig(**kwargs), adapter_name=adapter_name)
    _randomise(hf, seed)
    return hf.eval()


def _copy_adapter(hf: nn.Module, ours: nn.Module) -> None:
    theirs = {k: v for k, v in hf.state_dict().items() if "boft_" in k}
    mine = dict(ours.state_dict())
    with torch.no_grad():
        for key, value in theirs.items():
            mine[key].copy_(value)


@pytest.mark.parametrize("kind", ["square", "padding-one"])
def test_conv2d_multi_factor_matches_hf(kind: str) -> None:
    make = {"square": lambda: nn.Conv2d(4, 6, 2), "padding-one": lambda: nn.Conv2d(4, 6, 2, padding=1, stride=2)}[kind]
    torch.manual_seed(0)
    base = nn.Sequential(make())
    kwargs = dict(target_modules=["0"], boft_block_size=2, boft_n_butterfly_factor=3)
    hf = _hf_model(copy.deepcopy(base), **kwargs)
    ours = get_peft_model(base, BOFTConfig(**kwargs)).eval()
    assert {k: v.shape for k, v in hf.state_dict().items() if "boft_" in k} == \
        {k: v.shape for k, v in ours.state_dict().items() if "boft_" in k}
    _copy_adapter(hf, ours)
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(ours(x), hf(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["padding-tuple", "stride-tuple", "dilation", "reflect"])
def test_conv2d_beyond_hf_matches_hf_merged(kind: str) -> None:
    """HF 0.21.2's unmerged Conv2d forward uses only ``padding[0]``, ``stride[0]``, no dilation and
    zero padding; its merged model runs the real convolution. Ours equals HF's merged output."""
    torch.manual_seed(0)
    base = nn.Sequential(CONVS[kind]())
    kwargs = dict(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2)
    hf = _hf_model(copy.deepcopy(base), **kwargs)
    ours = get_peft_model(base, BOFTConfig(**kwargs)).eval()
    _copy_adapter(hf, ours)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        unmerged_hf = hf(x)
        hf.merge_adapter()
        merged_hf = hf(x)
    assert unmerged_hf.shape != merged_hf.shape or (unmerged_hf - merged_hf).abs().max() > 1e-3  # HF's bug
    torch.testing.assert_close(ours(x), merged_hf, atol=1e-5, rtol=1e-5)


def test_conv2d_non_square_kernel_breaks_hf_not_ours() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, (1, 4)))
    kwargs = dict(target_modules=["0"], boft_block_size=4)
    hf = _hf_model(copy.deepcopy(base), **kwargs)
    with pytest.raises(RuntimeError):  # HF sizes the rotation as in_channels * kh * kh
        hf(torch.randn(2, 4, 5, 5))
    assert get_peft_model(base, BOFTConfig(**kwargs))(torch.randn(2, 4, 5, 5)).shape == (2, 6, 5, 2)


def test_several_active_adapters_compose_as_hf() -> None:
    """HF applies active ``[a, b]`` as ``x R_b R_a`` with the scales multiplied; merged == unmerged."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 5))
    kwargs = dict(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2)
    hf = _hf_model(copy.deepcopy(base), adapter_name="one", **kwargs)
    ours = _adapted(copy.deepcopy(base), BOFTConfig(**kwargs), name="one")
    import peft

    hf.add_adapter("two", peft.BOFTConfig(**kwargs))
    ours.add_adapter("two", BOFTConfig(**kwargs))
    _randomise(hf, 1)
    _copy_adapter(hf, ours)
    hf.base_model.set_adapter(["one", "two"])
    ours.base_model.set_adapter(["one", "two"])
    hf.eval(), ours.eval()
    x = torch.randn(3, 16)
    expected = hf(x)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        ours.unmerge_adapter()
    torch.testing.assert_close(ours.base_model.model[0].base_layer.weight, base[0].weight, atol=1e-6, rtol=0)


def test_adapters_of_different_layouts_break_hf_not_ours() -> None:
    """HF keeps one permutation buffer per layer: an adapter with another factor count breaks the
    earlier adapter's forward. Ours keeps each adapter's layout."""
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 5))
    first, second = dict(boft_block_size=4, boft_n_butterfly_factor=2), dict(boft_block_size=2, boft_n_butterfly_factor=3)
    hf = _hf_model(copy.deepcopy(base), adapter_name="one", target_modules=["0"], **first)
    ours = _adapted(copy.deepcopy(base), BOFTConfig(target_modules=["0"], **first), name="one")
    x = torch.randn(3, 16)
    expected = hf(x)
    hf.add_adapter("two", peft.BOFTConfig(target_modules=["0"], **second))
    ours.add_adapter("two", BOFTConfig(target_modules=["0"], **second))
    with pytest.raises(RuntimeError):
        hf(x)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture
def hf_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF PEFT as on a machine where its fbd_cuda extension cannot be built (undone after the test)."""
    import peft.tuners.boft.layer as hf_layer

    monkeypatch.setattr(hf_layer, "_FBD_CUDA", None)
    monkeypatch.setattr(hf_layer, "get_fbd_cuda", lambda: None)


def test_hf_without_extension_uses_one_factor_and_loads_in_ours(hf_without_extension: None, tmp_path) -> None:
    """HF's fallback saves ``boft_R`` with one factor under a config that asks for more; ours loads it
    (the missing factors as identity, with a warning) and computes HF's outputs."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 5))
    kwargs = dict(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2)
    hf = _hf_model(copy.deepcopy(base), **kwargs)
    assert hf.base_model.model[0].boft_R["default"].shape == (1, 4, 4, 4)
    hf.save_pretrained(tmp_path)
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match="1 butterfly factor while boft_n_butterfly_factor=2"):
        ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert ours.base_model.model[0].boft_R["default"].shape == (2, 4, 4, 4)
    torch.testing.assert_close(ours(x), hf(x), atol=1e-5, rtol=1e-5)


def test_gradients_match_hf() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 5))
    kwargs = dict(target_modules=["0"], boft_block_size=2, boft_n_butterfly_factor=3)
    hf = _hf_model(copy.deepcopy(base), **kwargs)
    ours = get_peft_model(base, BOFTConfig(**kwargs))
    _copy_adapter(hf, ours)
    x = torch.randn(4, 16)
    hf(x).square().sum().backward()
    ours(x).square().sum().backward()
    for name in ("boft_R", "boft_s"):
        torch.testing.assert_close(getattr(ours.base_model.model[0], name)["default"].grad,
                                   getattr(hf.base_model.model[0], name)["default"].grad, atol=1e-4, rtol=1e-4)


# ---- mixed batches, merge, dropout ---------------------------------------------------------------
def _mixed_model() -> PeftModel:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    model = get_peft_model(base, BOFTConfig(target_modules=["0", "2"], boft_block_size=4, boft_n_butterfly_factor=2),
                           adapter_name="one")
    model.add_adapter("two", BOFTConfig(target_modules=["0", "2"], boft_block_size=2, boft_n_butterfly_factor=3))
    model.add_adapter("three", BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2))
    _randomise(model, 3)
    return model.eval()


NAMES = ["one", "two", "__base__", "three", "two", "one", "three", "__base__", "one"]


def _single_runs(model: PeftModel, names: list[str], x: torch.Tensor) -> torch.Tensor:
    expected = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected.append(model(x[i:i + 1]))
        else:
            model.set_adapter(name)
            expected.append(model(x[i:i + 1]))
    return torch.cat(expected)


def test_mixed_batch_rotates_rows_vectorised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Few tokens: each row's input rotated with its gathered blocks, one gather per block layout."""
    model = _mixed_model()
    x = torch.randn(len(NAMES), 1, 16)
    expected = _single_runs(model, NAMES, x)
    calls: list[int] = []
    real = butterfly.apply_row_butterfly

    def counting(h: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        calls.append(h.shape[0])
        return real(h, blocks)

    monkeypatch.setattr("peft_kernel_boft.layers.apply_row_butterfly", counting)
    torch.testing.assert_close(model(x, adapter_names=NAMES), expected, atol=1e-5, rtol=1e-5)
    assert calls == [5, 2, 3, 2]  # one gather per (layer, layout): the rows of that layout's adapters


def test_mixed_batch_folds_weights_per_adapter_with_many_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many tokens: one folded weight and one matmul per adapter group, no per-row rotation."""
    model = _mixed_model()
    x = torch.randn(len(NAMES), 40, 16)
    expected = _single_runs(model, NAMES, x)
    monkeypatch.setattr("peft_kernel_boft.layers.apply_row_butterfly", None)  # must not be called
    torch.testing.assert_close(model(x, adapter_names=NAMES), expected, atol=1e-5, rtol=1e-5)


def test_unmerge_restores_base_and_safe_merge_refuses_non_finite() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 6), nn.Conv2d(8, 4, 2))
    before = [m.weight.detach().clone() for m in base]
    model = _adapted(base, BOFTConfig(target_modules=["0", "1"], boft_block_size=4, boft_n_butterfly_factor=3))
    layers = model.base_model.model
    for _ in range(3):
        model.merge_adapter()
        assert (layers[0].base_layer.weight - before[0]).abs().max() > 1e-2
        model.unmerge_adapter()
    for layer, weight in zip(layers, before):
        torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=0)
    with torch.no_grad():
        layers[1].boft_s["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(layers[1].base_layer.weight, before[1])


def test_dropout_only_in_training_and_never_in_merges() -> None:
    torch.manual_seed(0)
    model = _adapted(nn.Sequential(nn.Linear(16, 4)), BOFTConfig(target_modules=["0"], boft_block_size=2,
                                                                  boft_n_butterfly_factor=2, boft_dropout=0.5))
    x = torch.randn(3, 16)
    evaluated = model(x)
    torch.testing.assert_close(model(x), evaluated)
    model.train()
    trained = [model(x) for _ in range(5)]
    assert all((t - evaluated).abs().max() > 1e-4 for t in trained)
    model.merge_adapter()
    model.eval()
    torch.testing.assert_close(model(x), evaluated, atol=1e-5, rtol=1e-5)


def test_half_precision_base_keeps_float32_adapters() -> None:
    model = get_peft_model(nn.Sequential(nn.Linear(16, 4)).to(torch.bfloat16),
                           BOFTConfig(target_modules=["0"], boft_block_size=4, init_weights=False))
    assert model.base_model.model[0].boft_R["default"].dtype == torch.float32
    assert model(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(boft_block_size=4, boft_block_num=4), "only specify either boft_block_size"),
    (dict(boft_block_size=0, boft_block_num=0), "must be non-zero"),
    (dict(boft_n_butterfly_factor=0), r"boft_n_butterfly_factor must be an integer from 1"),
    (dict(boft_block_size=-4), r"\$.boft_block_size must be an integer from 0"),
    (dict(boft_dropout=1.5), "boft_dropout must be a probability"),
    (dict(bias="lora_only"), "bias"),
    (dict(boft_sizes=4), "boft_sizes"),
])
def test_bad_configs_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises((ConfigError, TypeError), match=match):
        BOFTConfig(**kwargs)


@pytest.mark.parametrize("features,kwargs,match", [
    (16, dict(boft_block_size=5), r"boft_block_size=5 .* module '0' \(16 input features\).*must divide"),
    (16, dict(boft_block_size=0, boft_block_num=5), r"boft_block_num=5 .*block count \(5\) must divide"),
    (18, dict(boft_block_size=3, boft_n_butterfly_factor=2), r"boft_block_size=3 .* must be even"),
    (16, dict(boft_block_size=4, boft_n_butterfly_factor=4), r"boft_n_butterfly_factor=4 .* multiple of 2\*\*"),
    (24, dict(boft_block_size=0, boft_block_num=3, boft_n_butterfly_factor=2), r"boft_block_num=3 .*multiple of"),
])
def test_layouts_that_do_not_fit_the_layer_name_the_field(features: int, kwargs: dict, match: str) -> None:
    base = nn.Sequential(nn.Linear(features, 4))
    with pytest.raises(ConfigError, match=match):
        get_peft_model(base, BOFTConfig(target_modules=["0"], **kwargs))
    assert isinstance(base[0], nn.Linear)  # nothing was replaced


def test_conv2d_layout_error_names_kernel_features() -> None:
    with pytest.raises(ConfigError, match=r"36 kernel features: in_channels / groups \* kh \* kw"):
        get_peft_model(nn.Sequential(nn.Conv2d(4, 6, 3)), BOFTConfig(target_modules=["0"], boft_block_size=5))


def test_fan_in_fan_out_on_linear_warns_as_hf() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(nn.Sequential(nn.Linear(16, 4)), BOFTConfig(target_modules=["0"], fan_in_fan_out=True))
    assert any("Setting fan_in_fan_out to False" in str(w.message) for w in caught)


@pytest.mark.parametrize("kind", ["Embedding", "Conv1d", "Conv1D"])
def test_unsupported_layer_types_are_refused_by_name(kind: str) -> None:
    """HF PEFT wraps nn.Linear and nn.Conv2d only (not GPT-2's Conv1D either)."""
    from transformers.pytorch_utils import Conv1D

    module = {"Embedding": lambda: nn.Embedding(10, 8), "Conv1d": lambda: nn.Conv1d(4, 8, 2),
              "Conv1D": lambda: Conv1D(8, 4)}[kind]()
    with pytest.raises(TargetNotFoundError, match=f"type {kind} .*no installed plugin can wrap it"):
        get_peft_model(nn.Sequential(module), BOFTConfig(target_modules=["0"]))


# ---- mixed models (HF PEFT's PeftMixedModel refuses BOFT) ----------------------------------------
@pytest.mark.parametrize("boft_first", [False, True], ids=["boft-over-lora", "lora-over-boft"])
def test_stacks_with_lora_in_a_mixed_model(boft_first: bool) -> None:
    """BOFT over LoRA computes ``((W + dW)(x R) + b - b) s + b``; LoRA over BOFT adds ``dW x`` to
    BOFT's output. Either way merge_and_unload folds them inside out into the same function."""
    from peft_kernel import LoraConfig

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 6))
    reference = copy.deepcopy(base[0])
    configs = {"bo": BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2),
               "lo": LoraConfig(target_modules=["0"], r=2, init_lora_weights=False)}
    order = ["bo", "lo"] if boft_first else ["lo", "bo"]
    model = get_peft_model(base, configs[order[0]], adapter_name=order[0], mixed=True)
    model.add_adapter(order[1], configs[order[1]])
    model.set_adapter(order)
    _randomise(model, 0)
    model.eval()
    outer = model.base_model.model[0]
    boft = outer if not boft_first else outer.base_layer
    lora = outer.base_layer if not boft_first else outer
    x = torch.randn(3, 16)
    delta = lora.lora_B["lo"].weight @ lora.lora_A["lo"].weight * lora.scaling["lo"]
    weight = _reference_weight(reference.weight, boft.boft_R["bo"].detach(), boft.boft_s["bo"].detach())
    if boft_first:  # LoRA outermost: its delta on the raw input
        expected = F.linear(x, weight, reference.bias) + x @ delta.T
    else:
        expected = F.linear(x, _reference_weight(reference.weight + delta, boft.boft_R["bo"].detach(),
                                                 boft.boft_s["bo"].detach()), reference.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
