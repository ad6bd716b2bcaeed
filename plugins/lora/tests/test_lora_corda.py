"""CorDA (``init_lora_weights="corda"``, ``preprocess_corda``) against HF ``peft`` on a tiny llama:
the decomposition, the adapter and the rewritten base weights, the cache / covariance files both
ways, the conversion to plain LoRA on the original base, errors and a failed injection."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peft_kernel as pk
from peft_kernel.plugin_api import UnsupportedFeatureError
from peft_kernel_lora.corda import CordaError
from peft_kernel_testing.conversion import train_and_save_converted
from peft_kernel_testing.hf_oracle import max_abs_diff, run
from peft_kernel_testing.models import make_inputs, make_model

peft = pytest.importorskip("peft")
from peft.tuners.lora.config import CordaConfig as HfCordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda as hf_preprocess_corda  # noqa: E402

TOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
LIBS = {"ours": (pk, pk.CordaConfig, pk.preprocess_corda), "hf": (peft, HfCordaConfig, hf_preprocess_corda)}


def calibration(model, kind: str = "llama"):
    """HF PEFT's hooks take one sequence per call (a batch of several fails there): feed rows one by one."""
    ids = make_inputs(kind, seed=7)["input_ids"]

    @torch.no_grad()
    def run_model():
        for row in ids:
            model(input_ids=row[None])
    return run_model


def build(lib: str, corda: dict | None = None, calibrate: bool = True, kind: str = "llama", **lora):
    module, corda_config, preprocess = LIBS[lib]
    model = make_model(kind)
    config = module.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": "corda",
                                  "corda_config": corda_config(**(corda or {})), **lora})
    preprocess(model, config, run_model=calibration(model, kind) if calibrate else None)
    return module.get_peft_model(model, config), config


def tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k or ".base_layer" in k}


@pytest.mark.parametrize("method", ["ipm", "kpm"])
@pytest.mark.parametrize("lora", [{}, {"rank_pattern": {"down_proj": 2}, "use_rslora": True}], ids=["plain", "patterns"])
def test_adapter_and_residual_base_equal_hf(method, lora):
    ours, _ = build("ours", {"corda_method": method}, **lora)
    hf, _ = build("hf", {"corda_method": method}, **lora)
    mine, theirs = tensors(ours), tensors(hf)
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert max_abs_diff(mine[key], value) <= TOL, key
    x = make_inputs("llama")
    assert max_abs_diff(run(ours, x), run(hf, x)) <= TOL
    # the model at initialisation is the base model (residual + s·B·A = W)
    assert max_abs_diff(run(ours, x), run(make_model("llama"), x)) <= 1e-4
    base = ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert not hasattr(base, "eigens") and not hasattr(base, "covariance_matrix")


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_gpt2_conv1d_equals_hf(method):
    """transformers' ``Conv1D`` stores its weight [in, out]: decomposed (and rewritten) transposed."""
    lora = {"kind": "gpt2", "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}
    mine, theirs = (tensors(build(lib, {"corda_method": method}, **lora)[0]) for lib in ("ours", "hf"))
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert max_abs_diff(mine[key], value) <= TOL, key


def test_ipm_and_kpm_take_opposite_ends_of_the_spectrum():
    model = make_model("llama")
    config = pk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="corda",
                           corda_config=pk.CordaConfig(corda_method="kpm", prune_temporary_fields=False))
    pk.preprocess_corda(model, config, run_model=calibration(model))
    layer = model.model.layers[0].self_attn.q_proj
    kpm = layer.eigens.S_WC
    config.corda_config["corda_method"] = "ipm"
    pk.preprocess_corda(model, config, run_model=calibration(model))
    ipm = layer.eigens.S_WC
    assert layer.covariance_matrix.shape == (16, 16) and layer.sample_count == 4
    assert ipm.min() > kpm.max() and torch.all(ipm[:-1] >= ipm[1:]) and torch.all(kpm[:-1] >= kpm[1:])


@pytest.mark.parametrize("writer,reader", [("hf", "ours"), ("ours", "hf")])
@pytest.mark.parametrize("kind", ["cache_file", "covariance_file"])
def test_cache_and_covariance_files_are_read_both_ways(writer, reader, kind, tmp_path):
    path = str(tmp_path / "corda" / f"{kind}.pt")  # HF PEFT fails on a bare file name (no folder)
    written, _ = build(writer, {kind: path})
    read, _ = build(reader, {kind: path}, calibrate=False)  # no run_model: everything comes from the file
    mine, theirs = tensors(read), tensors(written)
    for key, value in theirs.items():
        assert max_abs_diff(mine[key], value) <= TOL, key


def test_saved_adapters_cross_load_and_convert_to_lora_like_hf(tmp_path):
    x = make_inputs("llama")
    trained = {lib: train_and_save_converted(build(lib)[0], tmp_path, lib, "llama", save_plain=True) for lib in LIBS}
    assert max_abs_diff(trained["ours"], trained["hf"]) <= TOL
    ours, hf = load_file(tmp_path / "ours-lora/adapter_model.safetensors"), load_file(tmp_path / "hf-lora/adapter_model.safetensors")
    assert sorted(ours) == sorted(hf) and all(max_abs_diff(ours[k], hf[k]) <= TOL for k in hf)
    assert json.loads((tmp_path / "ours-lora/adapter_config.json").read_text())["r"] == 8
    for folder in ("ours-lora", "hf-lora"):  # plain LoRA on the original base, in either library
        for lib in (pk, peft):
            loaded = lib.PeftModel.from_pretrained(make_model("llama"), tmp_path / folder)
            assert max_abs_diff(run(loaded, x), trained["hf"]) <= TOL, (folder, lib.__name__)
    # unconverted, the adapter is relative to the residual base: re-preprocessing rebuilds it in either library
    for folder in ("ours-plain", "hf-plain"):
        for lib in ("ours", "hf"):
            module, corda_config, preprocess = LIBS[lib]
            model = make_model("llama")
            config = module.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                                       corda_config=corda_config())
            preprocess(model, config, run_model=calibration(model))
            loaded = module.PeftModel.from_pretrained(model, tmp_path / folder)
            assert max_abs_diff(run(loaded, x), trained["hf"]) <= TOL, (folder, lib)


def test_config_round_trip_equals_hf():
    ours = pk.LoraConfig(init_lora_weights="corda", corda_config=pk.CordaConfig(corda_method="kpm", cache_file="a/b.pt"))
    hf = peft.LoraConfig(init_lora_weights="corda", corda_config=HfCordaConfig(corda_method="kpm", cache_file="a/b.pt"))
    assert ours.to_dict()["corda_config"] == hf.to_dict()["corda_config"]
    again = pk.PeftConfig.from_dict(json.loads(json.dumps(ours.to_dict())))
    assert again.corda_config == ours.corda_config
    with pytest.warns(UserWarning, match="corda_config.*ignored"):
        pk.LoraConfig(corda_config=pk.CordaConfig())


def test_bad_configs_and_missing_preprocessing_raise_named_errors():
    with pytest.raises(pk.ConfigError, match="corda_method"):
        pk.CordaConfig(corda_method="xpm")
    with pytest.raises(pk.ConfigError, match="unknown keys.*'methd'"):
        pk.LoraConfig(init_lora_weights="corda", corda_config={"methd": "ipm"})
    config = pk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="corda")
    with pytest.raises(CordaError, match="run_model must be specified"):
        pk.preprocess_corda(make_model("llama"), config)
    with pytest.raises(CordaError, match="run `preprocess_corda` first"):
        pk.get_peft_model(make_model("llama"), config)
    model = make_model("llama")
    with pytest.raises(CordaError, match="never called"):
        pk.preprocess_corda(model, config, run_model=lambda: None)
    with pytest.raises(UnsupportedFeatureError, match="nn.Linear"):
        pk.preprocess_corda(make_model("conv2d"), pk.LoraConfig(target_modules=["conv0"], init_lora_weights="corda"),
                            run_model=lambda: None)


def test_failed_injection_restores_the_base_weights():
    model = make_model("llama")
    config = pk.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights="corda")
    pk.preprocess_corda(model, config, run_model=calibration(model))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    del model.model.layers[1].mlp.down_proj.eigens  # the last layer to be created fails
    with pytest.raises(CordaError, match="preprocess_corda"):
        pk.get_peft_model(model, config)
    state = model.state_dict()
    assert sorted(state) == sorted(original)
    assert all(torch.equal(state[k], v) for k, v in original.items())


def test_default_corda_config_warns_as_hf():
    with pytest.warns(UserWarning, match="corda_config` is not specified. Using default CorDA config"):
        config = pk.LoraConfig(init_lora_weights="corda")
    with pytest.warns(UserWarning, match="Using default CorDA config"):
        hf = peft.LoraConfig(init_lora_weights="corda")
    assert config.to_dict()["corda_config"] == hf.to_dict()["corda_config"]


@pytest.mark.parametrize("corda", [{"use_float16_for_covariance": True}, {"corda_method": "kpm"}], ids=["fp16", "kpm"])
def test_hooked_model_and_options_equal_hf(corda):
    """``hooked_model``: the calibration runs through another model (here with other weights); its
    same-named layers' inputs orient the decomposition of ``model``'s weights."""
    results = {}
    for lib, (module, corda_config, preprocess) in LIBS.items():
        model, hooked = make_model("llama"), make_model("llama", seed=5)
        config = module.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                                   corda_config=corda_config(**corda))
        preprocess(model, config, run_model=calibration(hooked), hooked_model=hooked)
        results[lib] = tensors(module.get_peft_model(model, config))
    for key, value in results["hf"].items():
        assert max_abs_diff(results["ours"][key], value) <= TOL, key


def test_public_names_fields_and_signature_are_hfs():
    import dataclasses
    import inspect

    import attrs

    ours = {f.name: f.default for f in attrs.fields(pk.CordaConfig)}
    assert ours == {f.name: f.default for f in dataclasses.fields(HfCordaConfig)}
    mine, theirs = inspect.signature(pk.preprocess_corda).parameters, inspect.signature(hf_preprocess_corda).parameters
    assert [(p.name, p.kind, p.default) for p in mine.values()] == [(p.name, p.kind, p.default) for p in theirs.values()]


def test_covariance_formula_and_batches_of_several_sequences():
    """Independent of HF: each call's inputs ``X`` (all rows of the batch; HF PEFT fails on a batch
    of several sequences) scaled by ``|max X|``, ``C`` the mean of ``XᵀX`` over calls."""
    model = make_model("llama")
    calls = [make_inputs("llama", seed=s)["input_ids"] for s in (3, 4)]
    seen = []
    layer = model.model.layers[1].mlp.down_proj
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().reshape(-1, 32)))
    config = pk.LoraConfig(r=3, target_modules=["down_proj"], init_lora_weights="corda",
                           corda_config=pk.CordaConfig(prune_temporary_fields=False))
    pk.preprocess_corda(model, config, run_model=lambda: [model(input_ids=ids) for ids in calls])
    handle.remove()
    expected = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in seen) / len(seen)
    assert layer.sample_count == 2 and max_abs_diff(layer.covariance_matrix, expected) <= 1e-6
    damped = expected + 0.01 * expected.diagonal().mean() * torch.eye(32)
    singular = torch.linalg.svdvals(layer.weight @ damped)
    assert max_abs_diff(layer.eigens.S_WC, singular[:3]) <= 1e-5


def test_merge_and_unload_gives_back_the_original_weights():
    model, _ = build("ours")
    merged = model.merge_and_unload()
    original = make_model("llama").state_dict()
    for key, value in merged.state_dict().items():
        assert max_abs_diff(value, original[key]) <= 1e-6, key
