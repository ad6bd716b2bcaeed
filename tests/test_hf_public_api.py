"""HF PEFT's public surface, name by name and signature by signature, against the installed ``peft``.

Every name in ``peft.__all__`` resolves as ``peft_kernel.<name>`` unless it belongs to one PEFT
method (those arrive with that method's plugin) or is listed in ``NOT_YET`` below with the reason.
Public methods of ``PeftModel``, its task classes and the tuner (``LoraModel`` / ``BaseTuner``)
exist here with HF's parameters: same names, kinds, order and defaults (annotations aside). Ours
may add a parameter only where ``EXTRA_PARAMS`` says so and why.
"""

from __future__ import annotations

import inspect

import pytest

import peft_kernel as pk
from peft_kernel_testing import make_model

peft = pytest.importorskip("peft")
_TRANSFORMERS_4 = int(__import__("transformers").__version__.split(".")[0]) < 5

# ---- deliberate exceptions ----------------------------------------------------------------------
NOT_YET = {
    # KappaTune's condition-number based target selection (peft.helpers) is not built.
    "find_kappa_target_modules": "KappaTune target selection not built",
}
"""Generic (not method-specific) HF names that do not resolve here yet."""

TUNER_NOT_YET = {
    # LoRA-specific; PiSSA/OLoRA conversion is done elsewhere:
    "subtract_mutated_init": "LoRA's PiSSA/OLoRA conversion lives in the LoRA plugin's save hook instead",
}

PEFT_MODEL_NOT_YET: dict[str, str] = {}

EXTRA_PARAMS = {
    # pickle can run code: an adapter_model.bin is read only with an explicit opt-in
    ("PeftModel.load_adapter", "allow_pickle"),
    ("PeftModel.from_pretrained", "allow_pickle"),
    ("load_peft_weights", "allow_pickle"),
}


def _method_specific(name: str) -> bool:
    """HF names defined under ``peft.tuners.<method>``: a method's config, model, layers, enums and
    helpers (``LoraConfig``, ``VeraModel``, ``PromptEmbedding``...). ``convert_to_lora`` and ``save_as_lora``
    live under ``peft.tuners.lora``, as here under the LoRA plugin (``peft_kernel_lora.lora_conversion``,
    exported by LoRA's record; any additive method converts); ``tests/test_convert_to_lora.py`` checks their signatures and numbers against HF's."""
    obj = getattr(peft, name)
    module = getattr(obj, "__module__", "") or ""
    return module.startswith("peft.tuners.")


def _generic_names() -> list[str]:
    return sorted(n for n in peft.__all__ if not _method_specific(n))


def _params(func, owner: str) -> list[tuple]:
    sig = inspect.signature(func)
    out = []
    for p in sig.parameters.values():
        if p.name in ("self", "cls"):
            continue
        if (owner, p.name) in EXTRA_PARAMS:
            continue
        default = p.default
        out.append((p.name, p.kind, default if default is inspect.Parameter.empty else repr(default)))
    return out


def _assert_same_signature(theirs, ours, owner: str) -> None:
    assert _params(ours, owner) == _params(theirs, owner), f"{owner}: signature differs from HF's"


def test_not_yet_lists_only_missing_names():
    for name in NOT_YET:
        assert name in peft.__all__, f"{name} is not an HF name any more; drop it from NOT_YET"
        assert not hasattr(pk, name), f"{name} resolves now; drop it from NOT_YET"


@pytest.mark.parametrize("name", _generic_names())
def test_every_generic_hf_name_resolves(name):
    if name in NOT_YET:
        pytest.skip(f"deliberately not yet: {NOT_YET[name]}")
    assert hasattr(pk, name), f"peft_kernel.{name} is missing"
    assert name in dir(pk)


def test_method_specific_names_resolve_when_their_plugin_is_installed():
    registry = pk.get_registry()
    for record in registry.methods.values():
        hf_name = record.config_class.__name__
        if hf_name in peft.__all__:
            assert getattr(pk, hf_name) is record.config_class
        if record.tuner_name in peft.__all__:
            assert getattr(pk, record.tuner_name).__name__ == record.tuner_name


def _functions() -> list[str]:
    return [n for n in _generic_names() if n not in NOT_YET and inspect.isfunction(getattr(peft, n))]


@pytest.mark.parametrize("name", _functions())
def test_function_signatures_match_hf(name):
    _assert_same_signature(getattr(peft, name), getattr(pk, name), name)


def _public_methods(cls, stop: tuple) -> dict[str, object]:
    names: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if klass in stop:
            continue
        for attr, value in vars(klass).items():
            if not attr.startswith("_"):
                names[attr] = value
    return names


def _hf_stop():
    import torch.nn as nn

    return (nn.Module, object) + tuple(c for c in peft.LoraModel.__mro__ if c.__name__ == "ABC")


PEFT_MODEL_CLASSES = ["PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM",
                      "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
                      "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction"]


@pytest.mark.parametrize("cls_name", PEFT_MODEL_CLASSES)
def test_peft_model_public_methods_match_hf(cls_name):
    theirs, ours = getattr(peft, cls_name), getattr(pk, cls_name)
    methods = _public_methods(theirs, _hf_stop())
    for name, value in methods.items():
        if name in PEFT_MODEL_NOT_YET:
            continue
        assert hasattr(ours, name), f"{cls_name}.{name} is missing"
        func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if getattr(func, "__module__", "").startswith("transformers.") and _TRANSFORMERS_4:
            continue  # HF inherits it from transformers (push_to_hub); ours follows transformers 5's signature
        if callable(func) and not isinstance(value, property):
            _assert_same_signature(func, getattr(ours, name), f"PeftModel.{name}" if cls_name == "PeftModel" or name in (
                "load_adapter", "from_pretrained") else f"{cls_name}.{name}")
    _assert_same_signature(theirs.__init__, ours.__init__, f"{cls_name}.__init__")


def test_tuner_public_methods_match_hf():
    model = pk.get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["lin0"]))
    tuner = model.base_model
    for name, value in _public_methods(peft.LoraModel, _hf_stop()).items():
        if name in TUNER_NOT_YET:
            assert not hasattr(type(tuner), name), f"{name} exists now; drop it from TUNER_NOT_YET"
            continue
        assert hasattr(tuner, name), f"LoraModel.{name} is missing"
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if inspect.isfunction(value) and name != "tuner_layer_cls":
            _assert_same_signature(value, getattr(type(tuner), name), f"LoraModel.{name}")
    _assert_same_signature(peft.LoraModel.__init__, type(tuner).__init__, "LoraModel.__init__")
    # HF's instance attributes
    for name in ("model", "peft_config", "active_adapter", "targeted_module_names", "targeted_parameter_names"):
        assert hasattr(tuner, name), name
    hf = peft.get_peft_model(make_model("mlp"), peft.LoraConfig(target_modules=["lin0"]))
    for lib, m in ((peft, hf), (pk, model)):
        m.add_adapter("b", lib.LoraConfig(target_modules=["lin1", "lin0"]))
    assert tuner.targeted_module_names == hf.base_model.targeted_module_names == ["lin0", "lin1"]
    assert tuner.prefix == "lora_" and tuner.uses_shared_state is False
    assert tuner.target_module_mapping["llama"] == peft.LoraModel.target_module_mapping["llama"]


@pytest.mark.parametrize("config_name, kwargs", [
    ("VeraConfig", {"target_modules": ["lin0"], "r": 2}),
    ("VBLoRAConfig", {"target_modules": ["lin0"], "r": 2, "vector_length": 2}),
    ("LoraConfig", {"target_modules": ["lin0"]}),
])
def test_uses_shared_state_as_hf(config_name, kwargs):
    """Tuners whose adapters have model-level shared tensors say so, as HF's ``VeraModel`` and
    ``VBLoRAModel`` do (HF's ``RandLoraModel`` says False although its bases are shared)."""
    if not hasattr(pk, config_name):
        pytest.skip(f"{config_name}'s plugin is not installed")
    ours = pk.get_peft_model(make_model("mlp"), getattr(pk, config_name)(**kwargs))
    hf = peft.get_peft_model(make_model("mlp"), getattr(peft, config_name)(**kwargs))
    assert ours.base_model.uses_shared_state is hf.base_model.uses_shared_state


def test_peft_model_instance_attributes_match_hf():
    hf = peft.get_peft_model(make_model("mlp"), peft.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    ours = pk.get_peft_model(make_model("mlp"), pk.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    for model in (hf, ours):
        assert str(getattr(model.peft_type, "value", model.peft_type)) == "LORA"
        assert model.special_peft_forward_args >= {"adapter_names"}
    assert ours.modules_to_save == hf.modules_to_save == {"lin1"}
    assert ours.base_model_torch_dtype == hf.base_model_torch_dtype
    assert ours.has_active_enabled_adapter is hf.has_active_enabled_adapter is True
    with hf.disable_adapter(), ours.disable_adapter():
        assert ours.has_active_enabled_adapter is hf.has_active_enabled_adapter is False
    assert ours.has_active_enabled_adapter is True
    assert ours.supports_lora_conversion() is hf.supports_lora_conversion() is True
    assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()


AUTO_CLASSES = [n for n in peft.__all__ if n.startswith("AutoPeftModel")]


@pytest.mark.parametrize("cls_name", AUTO_CLASSES)
def test_auto_classes_from_pretrained_signature_matches_hf(cls_name):
    _assert_same_signature(getattr(peft, cls_name).from_pretrained, getattr(pk, cls_name).from_pretrained,
                           f"{cls_name}.from_pretrained")
