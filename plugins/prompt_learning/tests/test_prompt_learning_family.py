"""The prompt-learning family library on its own: its hook, its host, and a method built on it.

The method here is an inline toy (no prompt_tuning / prefix_tuning needed), so these tests run
with the core and this library alone.
"""

from __future__ import annotations

import inspect
import types

import attrs
import pytest
import torch
from torch import nn

import peft_kernel
import peft_kernel_prompt_learning.plugin as family
from peft_kernel import PeftModel, get_peft_model, get_peft_model_state_dict, hookimpl
from peft_kernel.plugin_api import AdapterHost, MethodRecord
from peft_kernel_testing import make_model
from peft_kernel_prompt_learning import FAMILY_EXPORTS, PromptLearningConfig
from peft_kernel_prompt_learning.hookspecs import PromptLearningSpecs
from peft_kernel_prompt_learning.learner import PromptEncoder, PromptLearner

IDS = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 11, 12, 13]])


@attrs.define(kw_only=True)
class ToyPromptConfig(PromptLearningConfig):
    peft_type: str = "TOY_PROMPT"


class ToyPrompt(PromptEncoder):
    def __init__(self, config: ToyPromptConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


def toy_method() -> types.SimpleNamespace:
    @hookimpl
    def peft_kernel_register_methods(register):
        register(MethodRecord(peft_type="TOY_PROMPT", config_class=ToyPromptConfig, prefix="toy_prompt_",
                              capabilities={"prompt_learning", "multi_adapter"}, exports=FAMILY_EXPORTS))

    @hookimpl
    def peft_kernel_create_prompt_encoder(config, adapter_name, model, word_embeddings):
        return ToyPrompt(config) if isinstance(config, ToyPromptConfig) else None

    return types.SimpleNamespace(peft_kernel_register_methods=peft_kernel_register_methods,
                                 peft_kernel_create_prompt_encoder=peft_kernel_create_prompt_encoder)


def test_the_family_adds_its_hook_and_registers_no_method(isolated_registry):
    registry = isolated_registry(entry_points=[], extra_plugins={"prompt_learning": family})
    status = registry.status_of("prompt_learning")
    assert status.status == "loaded" and status.methods == [] and registry.methods == {}
    caller = registry.pm.hook.peft_kernel_create_prompt_encoder
    assert caller.spec is not None and caller.spec.opts["firstresult"]
    doc = inspect.getdoc(PromptLearningSpecs.peft_kernel_create_prompt_encoder)
    assert len(doc) > 200 and "PromptEncoder" in doc


def test_a_prompt_method_without_the_family_fails_to_load_naming_the_hook(isolated_registry):
    registry = isolated_registry(entry_points=[], extra_plugins={"toy": toy_method()})
    status = registry.status_of("toy")
    assert status.status == "failed" and "peft_kernel_create_prompt_encoder" in status.error
    assert "TOY_PROMPT" not in registry.methods


def test_the_family_hosts_its_methods_adapters(isolated_registry, tmp_path):
    """``peft_kernel_create_host`` gives a prompt-learning method a PromptLearner: HF PEFT's shape
    (base_model is the transformers model, prompt_encoder holds the encoders), whatever the order in
    which the method and the family were loaded."""
    isolated_registry(entry_points=[], extra_plugins={"toy": toy_method(), "prompt_learning": family})
    assert peft_kernel.PromptLearningConfig is PromptLearningConfig  # exported through the method's record
    base = make_model("gpt2")
    model = get_peft_model(base, ToyPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)).eval()
    assert isinstance(model._host, PromptLearner) and isinstance(model._host, AdapterHost) and model.base_model is base
    assert isinstance(model.prompt_encoder["default"], ToyPrompt) and model.word_embeddings is base.get_input_embeddings()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_()
        out = model(input_ids=IDS).logits
    assert out.shape == (2, 7, 64)
    assert set(get_peft_model_state_dict(model)) == {"prompt_embeddings"}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("gpt2"), tmp_path)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, out)
    with pytest.raises(TypeError, match="not supported for prompt learning methods like TOY_PROMPT"):
        model.set_requires_grad("default")
    with pytest.raises(TypeError, match="prefix tuning and adaption prompt are not supported"):
        model.get_layer_status()
    with pytest.raises(NotImplementedError, match="virtual tokens instead"):
        model.merge_adapter()


def test_prompt_injection_is_checked_when_a_config_class_is_defined():
    assert PromptLearningConfig.prompt_injection == "inputs_embeds"
    with pytest.raises(ValueError, match="prompt_injection must be one of"):
        @attrs.define(kw_only=True)
        class Sideways(PromptLearningConfig):
            prompt_injection = "sideways"
    assert "prompt_injection" not in attrs.fields_dict(PromptLearningConfig)  # a class attribute, never saved
