"""LoRA-GA (``init_lora_weights="lora_ga"``, ``preprocess_loraga``) against HF ``peft``: the estimated
gradients, the adapter and the rewritten base weights (same seed -> same randomized SVD), the cache
file both ways, saved adapters and the conversion to plain LoRA, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peft_kernel as pk
from peft_kernel.plugin_api import UnsupportedFeatureError
from peft_kernel_lora.lora_ga import LoraGAError
from peft_kernel_testing.conversion import train_and_save_converted
from peft_kernel_testing.hf_oracle import max_abs_diff, perturb, run
from peft_kernel_testing.models import make_inputs, make_model

peft = pytest.importorskip("peft")

TOL = 1e-5
LIBS = {"ours": pk, "hf": peft}
SETUPS = {  # kind: (targets, extra LoraConfig fields)
    "llama": (["q_proj", "v_proj", "down_proj"], {}),
    "mlp": (["lin0", "lin1"], {}),
    "gpt2": (["c_attn", "c_fc"], {"fan_in_fan_out": True}),
}


def train_step(model, kind: str):
    """Two backward passes (their gradients are averaged)."""
    x = make_inputs(kind, seed=7)

    def step():
        for half in (slice(0, 2), slice(2, 4)):
            inputs = {k: v[half] for k, v in x.items()}
            if "input_ids" in inputs:
                model(**inputs, labels=inputs["input_ids"]).loss.backward()
            else:
                model(**inputs).pow(2).mean().backward()
    return step


def build(lib: str, kind: str = "llama", ga: dict | None = None, preprocess: bool = True, cache_file=None, **lora):
    module = LIBS[lib]
    model = make_model(kind)
    targets, extra = SETUPS[kind]
    config = module.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": targets, "init_lora_weights": "lora_ga",
                                  "lora_ga_config": module.LoraGAConfig(**(ga or {})), **extra, **lora})
    if preprocess:
        module.preprocess_loraga(model, config, train_step(model, kind), cache_file=cache_file)
    torch.manual_seed(11)  # the randomized SVD: same random state, same adapter
    return module.get_peft_model(model, config)


def tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k or ".base_layer" in k}


def assert_same(mine: dict, theirs: dict) -> None:
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert max_abs_diff(mine[key], value) <= TOL, key


@pytest.mark.parametrize("kind", list(SETUPS))
@pytest.mark.parametrize("ga", [{}, {"direction": "ArBr", "scale": "unit"}, {"direction": "A2rBr", "scale": "gd"},
                                {"stable_gamma": 4}, {"direction": "random"}], ids=["default", "ArBr-unit", "A2rBr-gd", "gamma4", "random"])
def test_adapter_and_residual_base_equal_hf(kind, ga):
    ours, hf = build("ours", kind, ga), build("hf", kind, ga)
    assert_same(tensors(ours), tensors(hf))
    x = make_inputs(kind)
    assert max_abs_diff(run(ours, x), run(hf, x)) <= TOL
    assert max_abs_diff(run(ours, x), run(make_model(kind), x)) <= 1e-4  # W_res + s·B·A = W
    assert not any(hasattr(m, "_peft_loraga_grad") for m in ours.modules())


def test_rank_and_alpha_patterns_and_rslora_equal_hf():
    lora = {"r": 3, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 9}, "use_rslora": True}
    assert_same(tensors(build("ours", **lora)), tensors(build("hf", **lora)))


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"lora_dropout": 0.1, "bias": "lora_only"}], ids=["dora", "dropout-bias"])
def test_dora_and_other_options_equal_hf(lora):
    """DoRA's magnitude is taken on the residual base weight, as in HF PEFT."""
    ours, hf = build("ours", "mlp", **lora).eval(), build("hf", "mlp", **lora).eval()
    x = make_inputs("mlp")
    assert max_abs_diff(run(ours, x), run(hf, x)) <= TOL


def test_bfloat16_model_equals_hf():
    """The gradient is averaged in the weight's dtype, as HF PEFT does (a float32 mean moves A by ~2e-3 here)."""
    results = {}
    for lib, module in LIBS.items():
        model = make_model("llama").to(torch.bfloat16)
        config = module.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="lora_ga",
                                   lora_ga_config=module.LoraGAConfig())
        module.preprocess_loraga(model, config, train_step(model, "llama"))
        assert model.model.layers[0].self_attn.q_proj._peft_loraga_grad.dtype == torch.bfloat16
        torch.manual_seed(11)
        results[lib] = tensors(module.get_peft_model(model, config))
    assert_same(results["ours"], results["hf"])


def test_gradient_is_the_mean_over_backward_passes_and_flags_are_restored():
    model = make_model("llama")
    config = pk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="lora_ga", lora_ga_config=pk.LoraGAConfig())
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    pk.preprocess_loraga(model, config, train_step(model, "llama"))
    reference = make_model("llama")
    train_step(reference, "llama")()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        grad = model.get_submodule(name)._peft_loraga_grad
        assert max_abs_diff(grad, reference.get_submodule(name).weight.grad / 2) <= 1e-7
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert model.model.layers[1].self_attn.q_proj.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("writer,reader", [("hf", "ours"), ("ours", "hf")])
def test_cache_file_is_read_both_ways(writer, reader, tmp_path):
    path = str(tmp_path / "ga" / "grads.pt")
    written = build(writer, cache_file=path)
    model = make_model("llama")
    config = LIBS[reader].LoraConfig(r=2, lora_alpha=4, target_modules=SETUPS["llama"][0], init_lora_weights="lora_ga",
                                     lora_ga_config=LIBS[reader].LoraGAConfig())
    LIBS[reader].preprocess_loraga(model, config, lambda: None, cache_file=path)  # nothing runs: all from the file
    torch.manual_seed(11)
    assert_same(tensors(LIBS[reader].get_peft_model(model, config)), tensors(written))


def test_saved_adapters_cross_load_and_convert_to_lora_like_hf(tmp_path):
    x = make_inputs("llama")
    trained = {lib: train_and_save_converted(build(lib), tmp_path, lib, "llama", save_plain=True) for lib in LIBS}
    assert max_abs_diff(trained["ours"], trained["hf"]) <= TOL
    ours, hf = load_file(tmp_path / "ours-lora/adapter_model.safetensors"), load_file(tmp_path / "hf-lora/adapter_model.safetensors")
    assert sorted(ours) == sorted(hf) and all(max_abs_diff(ours[k], hf[k]) <= TOL for k in hf)
    saved = json.loads((tmp_path / "ours-plain/adapter_config.json").read_text())
    assert saved["lora_ga_config"] == json.loads((tmp_path / "hf-plain/adapter_config.json").read_text())["lora_ga_config"]
    for folder in ("ours-lora", "hf-lora"):  # plain LoRA on the original base, in either library
        for lib in LIBS.values():
            loaded = lib.PeftModel.from_pretrained(make_model("llama"), tmp_path / folder)
            assert max_abs_diff(run(loaded, x), trained["hf"]) <= TOL, (folder, lib.__name__)
    for folder in ("ours-plain", "hf-plain"):  # relative to the residual base: re-preprocess, then load
        for lib in LIBS:
            model = make_model("llama")
            config = LIBS[lib].PeftConfig.from_pretrained(tmp_path / folder)
            LIBS[lib].preprocess_loraga(model, config, train_step(model, "llama"))
            torch.manual_seed(11)  # the same initial adapter, so the same residual base
            loaded = LIBS[lib].PeftModel.from_pretrained(model, tmp_path / folder)
            assert max_abs_diff(run(loaded, x), trained["hf"]) <= TOL, (folder, lib)


def test_merge_and_unload_equals_the_adapted_model():
    model = build("ours")
    perturb(model, 3)
    x = make_inputs("llama")
    expected = run(model, x)
    assert max_abs_diff(run(model.merge_and_unload(), x), expected) <= TOL


def test_config_round_trip_equals_hf():
    ours = pk.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=pk.LoraGAConfig(direction="ArBr", stable_gamma=4))
    hf = peft.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig(direction="ArBr", stable_gamma=4))
    assert ours.to_dict()["lora_ga_config"] == hf.to_dict()["lora_ga_config"]
    again = pk.PeftConfig.from_dict(json.loads(json.dumps(ours.to_dict())))
    assert again.lora_ga_config == ours.lora_ga_config


def test_bad_configs_and_missing_preprocessing_raise_named_errors():
    for bad in ({"direction": "ArBx"}, {"scale": "large"}, {"stable_gamma": 0}, {"stable_gamma": "16"}):
        with pytest.raises(pk.ConfigError, match=next(iter(bad))):
            pk.LoraGAConfig(**bad)
    with pytest.raises(pk.ConfigError, match="unknown keys.*'gamma'"):
        pk.LoraConfig(init_lora_weights="lora_ga", lora_ga_config={"gamma": 2})
    with pytest.raises(pk.ConfigError, match="lora_bias=True"):
        pk.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=pk.LoraGAConfig(), lora_bias=True)
    with pytest.raises(ValueError, match="init_lora_weights='lora_ga' and lora_ga_config"):  # HF's message
        pk.get_peft_model(make_model("llama"), pk.LoraConfig(target_modules=["q_proj"], init_lora_weights="lora_ga"))
    with pytest.raises(ValueError, match="init_lora_weights='lora_ga'"):
        pk.preprocess_loraga(make_model("llama"), pk.LoraConfig(target_modules=["q_proj"]), lambda: None)
    config = pk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="lora_ga", lora_ga_config=pk.LoraGAConfig())
    with pytest.raises(LoraGAError, match="run `preprocess_loraga`"):
        pk.get_peft_model(make_model("llama"), config)
    with pytest.raises(LoraGAError, match="never ran a backward"):
        pk.preprocess_loraga(make_model("llama"), config, lambda: None)
    with pytest.raises(UnsupportedFeatureError, match="nn.Linear"):
        pk.preprocess_loraga(make_model("conv2d"), pk.LoraConfig(target_modules=["conv0"], init_lora_weights="lora_ga",
                                                                 lora_ga_config=pk.LoraGAConfig()), lambda: None)
    with pytest.raises(LoraGAError, match="2r=18"):
        build("ours", "mlp", r=9)
    with pytest.raises(UnsupportedFeatureError, match="scale='weight_svd'"):
        build("ours", "mlp", {"scale": "weight_svd"})


def test_failed_injection_restores_the_base_weights():
    model = make_model("llama")
    config = pk.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights="lora_ga",
                           lora_ga_config=pk.LoraGAConfig())
    pk.preprocess_loraga(model, config, train_step(model, "llama"))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    del model.model.layers[1].mlp.down_proj._peft_loraga_grad  # the last layer to be created fails
    with pytest.raises(LoraGAError, match="preprocess_loraga"):
        pk.get_peft_model(model, config)
    state = model.state_dict()
    assert sorted(state) == sorted(original) and all(torch.equal(state[k], v) for k, v in original.items())
