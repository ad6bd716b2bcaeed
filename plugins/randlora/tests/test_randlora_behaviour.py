"""RandLora specifics: HF's bit-identical bases (dense, sparse, very sparse), HF's on-disk layout
(bases at the model and again per layer), the update against the paper's sum written out by hand,
the settings every adapter of a model shares, a too-small saved base, mixed batches (no stacked
low-rank kernels; more in test_randlora_shared_mixed.py / test_randlora_dense_mixed.py), bad configs."""

import pytest
import torch
from peft_kernel_testing.models import make_inputs, make_model
from safetensors.torch import load_file

from peft_kernel import PeftModel, get_peft_model
from peft_kernel.plugin_api import AdapterLayer, CheckpointError, ConfigError, UnsupportedFeatureError
from peft_kernel_lowrank import mixed
from peft_kernel_randlora import RandLoraConfig
from peft_kernel_randlora.layers import RandLoraLinear

TARGETS = ["k_proj", "up_proj", "down_proj"]  # tiny llama: 16->8, 16->32, 32->16: A [r, 1, 32], B [32, 11, 3]


def randlora(**kwargs):
    return RandLoraConfig(**{"r": 3, "randlora_alpha": 2, "target_modules": TARGETS, **kwargs})


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, RandLoraLinear)}


def perturb(model, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model).values():
            for container in (layer.randlora_lambda, layer.randlora_gamma):
                if adapter in container:
                    container[adapter].add_(torch.randn(container[adapter].shape, generator=g) * 0.3)


def run(model, **kwargs):
    with torch.no_grad():
        return model(**make_inputs("llama"), **kwargs).logits


@pytest.mark.parametrize("kind", [{}, {"sparse": True}, {"very_sparse": True}])
def test_bases_are_hf_draws_shared_by_every_layer(tmp_path, kind):
    peft = pytest.importorskip("peft")
    hf = peft.get_peft_model(make_model("llama"), peft.RandLoraConfig(r=3, target_modules=TARGETS, projection_prng_key=9,
                                                                      **kind))
    hf.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    ours = get_peft_model(make_model("llama"), randlora(projection_prng_key=9, **kind))
    found = list(layers(ours).values())
    assert len({id(layer.randlora_A["default"]) for layer in found}) == 1
    assert torch.equal(found[0].randlora_A["default"], saved["base_model.randlora_A"])  # bit-identical
    assert torch.equal(found[0].randlora_B["default"], saved["base_model.randlora_B"])
    assert found[0].randlora_A["default"].shape == (3, 1, 32) and found[0].randlora_B["default"].shape == (32, 11, 3)


def test_checkpoint_layout_is_hfs(tmp_path):
    model = get_peft_model(make_model("llama"), randlora())
    model.save_pretrained(tmp_path / "with")
    saved = load_file(tmp_path / "with" / "adapter_model.safetensors")
    copies = [k for k in saved if k.endswith(".randlora_A") and k != "base_model.randlora_A"]
    assert len(copies) == 6  # HF PEFT writes the bases again under each of the 6 layers
    assert all(torch.equal(saved[k], saved["base_model.randlora_A"]) for k in copies)
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "with")
    assert len({id(layer.randlora_A["default"]) for layer in layers(loaded).values()}) == 1
    with pytest.warns(UserWarning, match="save_projection=False"):
        model = get_peft_model(make_model("llama"), randlora(save_projection=False))
    perturb(model, "default", 0)
    model.save_pretrained(tmp_path / "without")
    saved = load_file(tmp_path / "without" / "adapter_model.safetensors")
    assert not [k for k in saved if "randlora_A" in k or "randlora_B" in k]
    torch.testing.assert_close(run(PeftModel.from_pretrained(make_model("llama"), tmp_path / "without")), run(model),
                               rtol=0, atol=0)


def test_update_is_the_sum_over_bases():
    """``(alpha / r) * sum_i B_i diag(lambda[:, i]) A diag(gamma[i])`` on the layer's [larger, smaller]
    orientation, written out basis by basis (an oracle independent of the folded factors); HF PEFT's
    basis ``B_i`` is every ``n``-th column of ``B[:M, :n].reshape(M, n * r)`` from column ``i``."""
    model = get_peft_model(make_model("llama"), randlora(randlora_alpha=5))
    perturb(model, "default", 1)
    for layer in layers(model).values():
        lam, gamma = layer.randlora_lambda["default"], layer.randlora_gamma["default"]
        base_a, base_b = layer.randlora_A["default"], layer.randlora_B["default"]
        r, n = lam.shape
        small, large = sorted(layer.base_layer.weight.shape)
        a = base_a[:, 0, :small]
        flat = base_b[:large, :n].reshape(large, n * r)
        expected = sum(flat[:, i::n] @ torch.diag(lam[:, i]) @ a @ torch.diag(gamma[i]) for i in range(n)) * 5 / r
        if layer.base_layer.weight.shape[0] < layer.base_layer.weight.shape[1]:
            expected = expected.T
        torch.testing.assert_close(layer.delta_weight("default"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("field", "value"), [("r", 4), ("projection_prng_key", 1), ("save_projection", False),
                                              ("sparse", True), ("very_sparse", True)])
def test_adapters_of_one_model_share_the_basis_settings(field, value):
    model = get_peft_model(make_model("llama"), randlora())
    with pytest.raises(ConfigError, match=rf"RandLoraConfig\.{field} must be the same .* adapter 'default'"):
        model.add_adapter("other", randlora(target_modules=["v_proj"], **{field: value}))
    assert "other" not in model.peft_config


def test_a_saved_base_too_small_for_the_layers_is_refused_by_name(tmp_path):
    model = get_peft_model(make_model("llama"), randlora(target_modules=["k_proj"]))  # B [16, 3, 3]
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"base_model\.randlora_B: checkpoint \(16, 3, 3\) vs model \(32, 6, 3\)"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path, config=randlora(target_modules=["k_proj", "up_proj"]))


def test_mixed_batch_rows_equal_single_runs_without_the_per_group_fallback(monkeypatch):
    model = get_peft_model(make_model("llama"), randlora(), adapter_name="a")
    model.add_adapter("b", randlora())
    model.add_adapter("c", randlora(target_modules=["k_proj"]))
    for seed, name in enumerate("abc"):
        perturb(model, name, seed)
    model.eval()
    singles = {}
    for name in "abc":
        model.set_adapter(name)
        singles[name] = run(model)
    with model.disable_adapter():
        singles["__base__"] = run(model)
    monkeypatch.setattr(AdapterLayer, "mixed_forward", lambda *a, **k: pytest.fail("the per-group fallback ran"))
    names = ["b", "__base__", "a", "c"]
    out = run(model, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(out[row], singles[name][row], rtol=0, atol=1e-5)
    # RandLora's rank reaches the smaller side: dense delta W per adapter, no rank-padded stack
    assert not any(isinstance(layer.__dict__.get("_low_rank_stack"), mixed.Stack) for layer in layers(model).values())


def test_merge_and_unload_keeps_the_output():
    model = get_peft_model(make_model("llama"), randlora())
    perturb(model, "default", 0)
    expected = run(model)
    torch.testing.assert_close(run(model.merge_and_unload()), expected, rtol=0, atol=1e-5)


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match=r"RandLoraConfig: \$\.r must be an integer"):
        RandLoraConfig(r=0)
    with pytest.raises(ConfigError, match="randlora_dropout"):
        RandLoraConfig(randlora_dropout=-0.1)
    with pytest.raises(ConfigError, match="bias"):
        RandLoraConfig(bias="lora_only")
    with pytest.raises(Exception, match="module 'emb' of type Embedding .* no installed plugin can wrap it"):
        get_peft_model(make_model("embedding"), RandLoraConfig(target_modules=["emb", "lin"]))
    with pytest.raises(UnsupportedFeatureError, match=r"RandLora adapts linear layers only .* 'emb' \(Embedding\)"):
        get_peft_model(make_model("embedding"), RandLoraConfig(target_modules=["emb"]))


@pytest.mark.parametrize("save_projection", [True, False])
def test_hf_adapters_serve_a_mixed_batch_and_compose_like_hf(save_projection):
    peft = pytest.importorskip("peft")
    from peft_kernel_testing import check_mixed_batch_against_hf
    from peft_kernel_testing.hf_oracle import check_active_adapters_against_hf

    kwargs = dict(r=3, randlora_alpha=2, target_modules=["q_proj", "down_proj"], save_projection=save_projection)
    check_mixed_batch_against_hf("llama", lambda: peft.RandLoraConfig(**kwargs))
    check_active_adapters_against_hf("llama", lambda: peft.RandLoraConfig(**kwargs), lambda: RandLoraConfig(**kwargs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_matches_hf_bit_for_bit(tmp_path, dtype, autocast):
    """HF PEFT computes RandLora's update in float32 (half-precision adapters too), adds it to the
    base output and rounds once: the same here, so the outputs are HF's exactly."""
    peft = pytest.importorskip("peft")
    from peft_kernel_testing.hf_oracle import perturb as perturb_trainable

    config = peft.RandLoraConfig(r=3, randlora_alpha=2, target_modules=TARGETS, init_weights=False)
    hf = peft.get_peft_model(make_model("llama").to(dtype), config, autocast_adapter_dtype=autocast)
    perturb_trainable(hf, 0)
    hf.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make_model("llama").to(dtype), tmp_path, autocast_adapter_dtype=autocast)
    expected = run(hf)
    assert expected.isfinite().all() and torch.equal(run(ours), expected)
