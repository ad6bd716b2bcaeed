"""VeRA specifics: the shared projections (HF's bit-identical draws, one tensor per adapter, saved
once or rebuilt), the settings every adapter of a model shares, a too-small saved projection,
merging, bad configs (mixed batches: test_vera_shared_mixed.py)."""

import pytest
import torch
from peft_kernel_testing.hf_oracle import perturb as perturb_trainable
from peft_kernel_testing.models import make_inputs, make_model
from safetensors.torch import load_file

from peft_kernel import PeftModel, get_peft_model
from peft_kernel.plugin_api import CheckpointError, ConfigError, UnsupportedFeatureError
from peft_kernel_vera import VeraConfig
from peft_kernel_vera.layers import VeraLinear

TARGETS = ["q_proj", "k_proj", "down_proj"]  # tiny llama: 16->16, 16->8, 32->16: A [r, 32], B [16, r]


def vera(**kwargs):
    return VeraConfig(**{"r": 4, "target_modules": TARGETS, "init_weights": False, **kwargs})


def layers(model):
    return [m for m in model.modules() if isinstance(m, VeraLinear)]


def perturb(model, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model):
            for container in (layer.vera_lambda_b, layer.vera_lambda_d):
                if adapter in container:
                    container[adapter].add_(torch.randn(container[adapter].shape, generator=g))


def run(model, **kwargs):
    with torch.no_grad():
        return model(**make_inputs("llama"), **kwargs).logits


def test_projections_are_hf_draws_shared_by_every_layer(tmp_path):
    peft = pytest.importorskip("peft")
    hf = peft.get_peft_model(make_model("llama"), peft.VeraConfig(r=4, target_modules=TARGETS, projection_prng_key=11))
    hf.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    ours = get_peft_model(make_model("llama"), vera(projection_prng_key=11))
    found = layers(ours)
    assert len({id(layer.vera_A["default"]) for layer in found}) == 1
    assert len({id(layer.vera_B["default"]) for layer in found}) == 1
    assert torch.equal(found[0].vera_A["default"], saved["base_model.vera_A"])  # bit-identical
    assert torch.equal(found[0].vera_B["default"], saved["base_model.vera_B"])
    assert found[0].vera_A["default"].shape == (4, 32) and found[0].vera_B["default"].shape == (16, 4)
    trainable, _ = ours.get_nb_trainable_parameters()
    assert trainable == 2 * ((16 + 4) + (8 + 4) + (16 + 4))  # only the vectors; the projections are buffers


def test_saved_once_or_rebuilt_from_the_key(tmp_path):
    model = get_peft_model(make_model("llama"), vera())
    perturb(model, "default", 0)
    model.save_pretrained(tmp_path / "with")
    keys = set(load_file(tmp_path / "with" / "adapter_model.safetensors"))
    assert {"base_model.vera_A", "base_model.vera_B"} <= keys
    assert len([k for k in keys if "vera_A" in k]) == 1
    with pytest.warns(UserWarning, match="save_projection=False"):
        model = get_peft_model(make_model("llama"), vera(save_projection=False, projection_prng_key=3))
    perturb(model, "default", 0)
    model.save_pretrained(tmp_path / "without")
    keys = set(load_file(tmp_path / "without" / "adapter_model.safetensors"))
    assert not [k for k in keys if "vera_A" in k or "vera_B" in k]
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "without")
    torch.testing.assert_close(run(loaded), run(model), rtol=0, atol=0)


@pytest.mark.parametrize(("field", "value"), [("r", 8), ("projection_prng_key", 1), ("save_projection", False)])
def test_adapters_of_one_model_share_the_projection_settings(field, value):
    model = get_peft_model(make_model("llama"), vera())
    with pytest.raises(ConfigError, match=rf"VeraConfig\.{field} must be the same .* adapter 'default'"):
        model.add_adapter("other", vera(target_modules=["v_proj"], **{field: value}))
    assert "other" not in model.peft_config
    assert not [n for n, _ in model.named_parameters() if ".other" in n]


def test_another_adapter_on_larger_layers_gets_its_own_projections():
    """HF PEFT refuses this ("vera_B has a size of 4 but 16 or greater is required"): its second
    adapter reuses the first adapter's projections. Here each adapter has its own, sized for its layers."""
    model = get_peft_model(make_model("llama"), vera(target_modules=["k_proj"]))  # 16 -> 8
    model.add_adapter("big", vera(target_modules=["down_proj"]))  # 32 -> 16
    small = next(layer for layer in layers(model) if "default" in layer.vera_A)
    big = next(layer for layer in layers(model) if "big" in layer.vera_A)
    assert small.vera_A["default"].shape == (4, 16) and small.vera_B["default"].shape == (8, 4)
    assert big.vera_A["big"].shape == (4, 32) and big.vera_B["big"].shape == (16, 4)
    model.set_adapter("big")
    assert run(model).isfinite().all()


def test_a_saved_projection_too_small_for_the_layers_is_refused_by_name(tmp_path):
    model = get_peft_model(make_model("llama"), vera(target_modules=["k_proj"]))  # B [8, r]
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"base_model\.vera_B: checkpoint \(8, 4\) vs model \(16, 4\)"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path, config=vera(target_modules=["k_proj", "q_proj"]))


def test_slicing_refuses_a_projection_smaller_than_the_layer():
    model = get_peft_model(make_model("llama"), vera())
    layer = layers(model)[0]
    with pytest.raises(ConfigError, match=r"shared projection vera_B has shape \(8, 4\), too small"):
        layer.update_layer("x", vera(), "model.layers.0.self_attn.q_proj",
                           shared={"vera_A": torch.zeros(4, 32), "vera_B": torch.zeros(8, 4)})


def test_merge_and_safe_merge():
    model = get_peft_model(make_model("llama"), vera())
    perturb(model, "default", 0)
    expected = run(model)
    layer = layers(model)[0]
    with torch.no_grad():
        layer.vera_lambda_b["default"][0] = float("inf")
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)
    model = get_peft_model(make_model("llama"), vera())
    perturb(model, "default", 0)
    torch.testing.assert_close(run(model.merge_and_unload()), expected, rtol=0, atol=1e-5)


def test_dropout_in_training_takes_the_generic_path():
    model = get_peft_model(make_model("llama"), vera(vera_dropout=0.5))
    layer = layers(model)[0]
    model.train()
    assert layer.low_rank_factors("default") is None
    model.eval()
    assert layer.low_rank_factors("default") is not None


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match=r"VeraConfig: \$\.r must be an integer"):
        VeraConfig(r=0)
    with pytest.raises(ConfigError, match="vera_dropout"):
        VeraConfig(vera_dropout=1.5)
    with pytest.raises(ConfigError, match="bias"):
        VeraConfig(bias="lora_only")
    with pytest.raises(TypeError):
        VeraConfig(exclude_modules=["x"])  # HF's VeraConfig has no exclude_modules
    with pytest.raises(Exception, match="no installed plugin can wrap it"):
        get_peft_model(make_model("embedding"), VeraConfig(target_modules=["emb", "lin"]))
    with pytest.raises(UnsupportedFeatureError, match=r"VeRA adapts linear layers only .* 'model.layers.0.mlp' \(LlamaMLP\)"):
        get_peft_model(make_model("llama"), VeraConfig(target_modules=["mlp"]))


@pytest.mark.parametrize("save_projection", [True, False])
def test_hf_adapters_serve_a_mixed_batch_and_compose_like_hf(save_projection):
    peft = pytest.importorskip("peft")
    from peft_kernel_testing import check_mixed_batch_against_hf
    from peft_kernel_testing.hf_oracle import check_active_adapters_against_hf

    kwargs = dict(r=4, target_modules=["q_proj", "down_proj"], save_projection=save_projection, init_weights=False)
    check_mixed_batch_against_hf("llama", lambda: peft.VeraConfig(**kwargs))
    check_active_adapters_against_hf("llama", lambda: peft.VeraConfig(**kwargs), lambda: VeraConfig(**kwargs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_matches_hf_bit_for_bit(tmp_path, dtype, autocast):
    """float32 adapters on a half-precision base add in float32 and round once; half-precision
    adapters (``autocast_adapter_dtype=False``) compute in HF's order: HF's output exactly."""
    peft = pytest.importorskip("peft")
    hf = peft.get_peft_model(make_model("llama").to(dtype), peft.VeraConfig(r=4, target_modules=TARGETS, init_weights=False),
                             autocast_adapter_dtype=autocast)
    perturb_trainable(hf, 0)
    hf.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make_model("llama").to(dtype), tmp_path, autocast_adapter_dtype=autocast)
    expected = run(hf)
    assert expected.isfinite().all() and torch.equal(run(ours), expected)


def test_mixed_batch_under_inference_mode_then_after_an_in_place_write():
    """The folded factors are normal tensors even when first built under ``torch.inference_mode``
    (the stacks check their ``_version``), and an in-place write to a lambda refreshes them."""
    model = get_peft_model(make_model("llama"), vera(), adapter_name="a")
    model.add_adapter("b", vera())
    for seed, name in enumerate("ab"):
        perturb(model, name, seed)
    model.eval()
    names = ["b", "a", "__base__", "a"]
    for step in range(2):
        with torch.inference_mode():  # first: the factors are folded under inference_mode
            out = model(**make_inputs("llama"), adapter_names=names).logits
        singles = {}
        for name in "ab":
            model.set_adapter(name)
            singles[name] = run(model)
        with model.disable_adapter():
            singles["__base__"] = run(model)
        for row, name in enumerate(names):
            torch.testing.assert_close(out[row], singles[name][row], rtol=0, atol=1e-5)
        if step == 0:
            perturb(model, "b", seed=7)
