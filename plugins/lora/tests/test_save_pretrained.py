"""``PeftModel.save_pretrained``'s keyword arguments, against HF ``peft``: the signature,
``path_initial_model_for_weight_conversion`` (PiSSA / OLoRA -> plain LoRA on the original base),
``state_dict=`` and the cheap ones (``selected_adapters``, ``safe_serialization``, ``is_main_process``).
"""

from __future__ import annotations

import inspect
import json
import types

import pytest
import torch
from safetensors.torch import load_file

import peft_kernel as pk
from peft_kernel import hookimpl
from peft_kernel_testing.conversion import train_and_save_converted
from peft_kernel_testing.hf_oracle import max_abs_diff, perturb, run
from peft_kernel_testing.models import make_inputs, make_model

peft = pytest.importorskip("peft")

TOL = 1e-5
WEIGHTS = "adapter_model.safetensors"


def read(folder) -> tuple[dict[str, torch.Tensor], dict]:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.pop("peft_version", None)
    if isinstance(config.get("target_modules"), list):  # a set in both libraries: its order is arbitrary
        config["target_modules"] = sorted(config["target_modules"])
    return load_file(folder / WEIGHTS), config


def assert_same_files(ours, hf) -> None:
    (our_tensors, our_config), (hf_tensors, hf_config) = read(ours), read(hf)
    assert sorted(our_tensors) == sorted(hf_tensors)
    for key, value in hf_tensors.items():
        assert our_tensors[key].shape == value.shape, key
        assert max_abs_diff(our_tensors[key], value) <= TOL, key
    assert our_config == hf_config


# ---- the signature ---------------------------------------------------------------------------
def test_signature_is_hfs():
    ours = inspect.signature(pk.PeftModel.save_pretrained).parameters
    theirs = inspect.signature(peft.PeftModel.save_pretrained).parameters
    assert list(ours) == list(theirs)
    for name, param in theirs.items():
        assert ours[name].kind == param.kind, name
        assert ours[name].default == param.default, name


def test_unknown_keyword_is_a_type_error_naming_it(tmp_path):
    model = pk.get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(TypeError, match="'safe_serialisation'"):
        model.save_pretrained(tmp_path, safe_serialisation=False)
    with pytest.raises(TypeError, match="'convert_pissa_to_lora'.*path_initial_model_for_weight_conversion"):
        model.save_pretrained(tmp_path, convert_pissa_to_lora=str(tmp_path / "init"))
    assert not any(tmp_path.iterdir())  # nothing written


# ---- PiSSA / OLoRA conversion ------------------------------------------------------------------
CONVERSIONS = {
    "pissa": dict(init_lora_weights="pissa"),
    "pissa-niter": dict(init_lora_weights="pissa_niter_4"),
    "olora": dict(init_lora_weights="olora"),
    "pissa-rslora": dict(init_lora_weights="pissa", use_rslora=True),
    "olora-patterns": dict(init_lora_weights="olora", rank_pattern={"lin1": 2}, alpha_pattern={"lin1": 3}),
}


def pissa_run(lib, folder, label: str, **kwargs):
    """A PiSSA / OLoRA adapter on the toy mlp through HF's conversion recipe; the trained output."""
    config = lib.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"], **kwargs})
    return train_and_save_converted(lib.get_peft_model(make_model("mlp"), config), folder, label, "mlp")


@pytest.mark.parametrize("kwargs", list(CONVERSIONS.values()), ids=list(CONVERSIONS))
def test_conversion_to_lora_on_the_original_base(kwargs, tmp_path):
    hf_trained = pissa_run(peft, tmp_path, "hf", **kwargs)
    trained = pissa_run(pk, tmp_path, "ours", **kwargs)
    assert max_abs_diff(trained, hf_trained) <= TOL
    assert_same_files(tmp_path / "ours-lora", tmp_path / "hf-lora")
    x = make_inputs("mlp")
    original = make_model("mlp")
    assert max_abs_diff(run(original, x), trained) > 1e-2
    for lib in (pk, peft):
        loaded = lib.PeftModel.from_pretrained(make_model("mlp"), tmp_path / "ours-lora")
        assert max_abs_diff(run(loaded, x), trained) <= TOL, lib.__name__
    # the converted adapter holds no PiSSA: loading it leaves the base weights alone
    loaded = pk.PeftModel.from_pretrained(make_model("mlp"), tmp_path / "ours-lora")
    assert torch.equal(loaded.base_model.model.lin0.base_layer.weight, original.lin0.weight)


def test_conversion_keeps_lora_bias_and_modules_to_save(tmp_path):
    """HF PEFT drops every tensor but lora_A/lora_B here (and fails on a lora_B bias); ours keeps
    them, so a classifier head and a LoRA bias survive the conversion."""
    config = pk.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights="pissa",
                           lora_bias=True, modules_to_save=["lin2"])
    model = pk.get_peft_model(make_model("mlp"), config)
    model.save_pretrained(tmp_path / "init")
    perturb(model, 5)
    trained = run(model.eval(), make_inputs("mlp"))
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    tensors, saved = read(tmp_path / "lora")
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["init_lora_weights"] is True
    assert "base_model.model.lin2.weight" in tensors and "base_model.model.lin0.lora_B.bias" in tensors
    loaded = pk.PeftModel.from_pretrained(make_model("mlp"), tmp_path / "lora")
    assert max_abs_diff(run(loaded, make_inputs("mlp")), trained) <= TOL
    assert model.peft_config["default"].r == 4  # the live config is untouched


def test_conversion_refusals(tmp_path):
    def model_with(**kwargs):
        config = pk.LoraConfig(**{"r": 4, "target_modules": ["lin0"], "init_lora_weights": "pissa", **kwargs})
        model = pk.get_peft_model(make_model("mlp"), config)
        model.save_pretrained(tmp_path / "init")
        return model

    with pytest.raises(ValueError, match="not supported when using `rank_pattern` or `alpha_pattern`.*use_rslora"):
        model_with(use_rslora=True, rank_pattern={"lin0": 2}).save_pretrained(
            tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    with pytest.raises(ValueError, match="use_dora=True"):
        model_with(use_dora=True).save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    with pytest.warns(UserWarning, match="only works for converting a PiSSA"):
        model_with(init_lora_weights="gaussian").save_pretrained(
            tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    ia3 = pk.get_peft_model(make_model("mlp"), pk.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3-init")
    with pytest.raises(ValueError, match="not supported for IA3Model"):
        ia3.save_pretrained(tmp_path / "ia3", path_initial_model_for_weight_conversion=tmp_path / "ia3-init")


def test_another_plugin_can_convert_its_method(isolated_registry, tmp_path):
    """``peft_kernel_convert_for_original_base`` is a hook: a plugin converts its own method's adapters."""
    @hookimpl
    def peft_kernel_convert_for_original_base(config, state_dict, initial_state_dict):
        if config.peft_type != "IA3":
            return None
        return {k: v - initial_state_dict[k] for k, v in state_dict.items()}, config

    isolated_registry(disabled=[], extra_plugins={"ia3-convert": types.SimpleNamespace(
        peft_kernel_convert_for_original_base=peft_kernel_convert_for_original_base)})
    model = pk.get_peft_model(make_model("mlp"), pk.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    model.save_pretrained(tmp_path / "init")
    perturb(model, 1)
    model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    key = "base_model.model.lin0.ia3_l"
    saved, initial = read(tmp_path / "out")[0][key], read(tmp_path / "init")[0][key]
    vector = model.base_model.model.lin0.ia3_l["default"].detach()
    assert max_abs_diff(saved, vector - initial) <= 1e-6 and max_abs_diff(saved, vector) > 0.5


# ---- state_dict= -------------------------------------------------------------------------------
def two_adapter_models():
    def config(lib):
        return lib.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], modules_to_save=["lin2"],
                              init_lora_weights=False)

    hf = peft.get_peft_model(make_model("mlp"), config(peft))
    hf.add_adapter("other", config(peft))
    ours = pk.get_peft_model(make_model("mlp"), config(pk))
    ours.add_adapter("other", config(pk))
    for name in ("default", "other"):
        pk.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf, adapter_name=name), adapter_name=name)
    assert sorted(hf.state_dict()) == sorted(ours.state_dict())
    return hf, ours


@pytest.mark.parametrize("edit", ["scaled", "without-some-keys"])
def test_state_dict_is_saved_filtered_as_hf(edit, tmp_path):
    hf, ours = two_adapter_models()

    def given(model):
        state = model.state_dict()
        if edit == "scaled":
            return {k: v * 2 + 1 for k, v in state.items()}
        return {k: v for k, v in state.items() if "lin0.lora_A" not in k}

    hf.save_pretrained(tmp_path / "hf", state_dict=given(hf))
    ours.save_pretrained(tmp_path / "ours", state_dict=given(ours))
    for sub in ("", "other"):
        assert_same_files(tmp_path / "ours" / sub, tmp_path / "hf" / sub)
    ours.save_pretrained(tmp_path / "live")
    live, given_file = read(tmp_path / "live")[0], read(tmp_path / "ours")[0]
    key = "base_model.model.lin0.lora_A.weight"
    if edit == "scaled":  # the given tensors were written, not the live ones
        assert max_abs_diff(given_file[key], live[key] * 2 + 1) <= TOL
    else:
        assert key in live and key not in given_file


# ---- the cheap ones ----------------------------------------------------------------------------
def test_selected_adapters_pickle_and_main_process(tmp_path):
    hf, ours = two_adapter_models()
    ours.save_pretrained(tmp_path / "sel", selected_adapters=["other"])
    assert not (tmp_path / "sel" / WEIGHTS).exists() and (tmp_path / "sel" / "other" / WEIGHTS).exists()
    with pytest.raises(ValueError, match="nope"):
        ours.save_pretrained(tmp_path / "bad", selected_adapters=["nope"])
    ours.save_pretrained(tmp_path / "none", is_main_process=False)
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").rglob("*.safetensors"))
    ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    hf.save_pretrained(tmp_path / "hf-bin", safe_serialization=False)
    ours_bin = torch.load(tmp_path / "bin" / "adapter_model.bin", weights_only=True)
    hf_bin = torch.load(tmp_path / "hf-bin" / "adapter_model.bin", weights_only=True)
    assert sorted(ours_bin) == sorted(hf_bin)
    assert all(max_abs_diff(ours_bin[k], hf_bin[k]) <= TOL for k in hf_bin)


@pytest.mark.parametrize("targets", [["q_proj"], ["embed_tokens", "q_proj"]], ids=["layers", "embeddings-targeted"])
@pytest.mark.parametrize("save_embedding_layers", [True, False, "auto"])
def test_save_embedding_layers_as_hf(targets, save_embedding_layers, tmp_path):
    for lib, label in ((peft, "hf"), (pk, "ours")):
        model = lib.get_peft_model(make_model("llama"), lib.LoraConfig(target_modules=targets, init_lora_weights=False))
        model.save_pretrained(tmp_path / label, save_embedding_layers=save_embedding_layers)
    ours, theirs = load_file(tmp_path / "ours" / WEIGHTS), load_file(tmp_path / "hf" / WEIGHTS)
    assert sorted(ours) == sorted(theirs)
    assert all(max_abs_diff(ours[k], theirs[k]) <= TOL for k in theirs if "lora_" not in k)  # LoRA init is random
