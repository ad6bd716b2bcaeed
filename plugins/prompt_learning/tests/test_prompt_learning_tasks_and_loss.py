"""The family's generic plumbing for encoders beyond one fixed prompt, on inline toys: per-row
``task_ids`` (``takes_task_ids``), tensors saved under their own top-level keys
(``top_level_tensors``) and an encoder's own loss (``computes_loss`` / ``loss_inputs``)."""

from __future__ import annotations

import types

import attrs
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peft_kernel_prompt_learning.plugin as family
from peft_kernel import CheckpointError, PeftModel, get_peft_model, hookimpl
from peft_kernel.plugin_api import MethodRecord
from peft_kernel_testing import make_model
from peft_kernel_prompt_learning import FAMILY_EXPORTS, PromptLearningConfig
from peft_kernel_prompt_learning.learner import PromptEncoder

IDS = torch.tensor([[5, 6, 7], [3, 4, 11], [8, 9, 10]])


@attrs.define(kw_only=True)
class TaskToyConfig(PromptLearningConfig):
    peft_type: str = "TASK_TOY"
    own_loss: bool = False


class TaskToy(PromptEncoder):
    """Task ``t``'s virtual tokens are ``embedding + t * shift``; with ``own_loss`` the loss is the
    mean logit times the ``scale`` keyword."""

    takes_task_ids = True

    def __init__(self, config: TaskToyConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
        self.shift = nn.Parameter(torch.randn(config.token_dim))

    def forward(self, task_ids: torch.Tensor | None) -> torch.Tensor:
        if task_ids is None:
            raise ValueError("task_ids cannot be None")
        return self.embedding.weight + task_ids[:, None, None].float() * self.shift

    def saved_prompt(self) -> torch.Tensor:
        return self.embedding.weight.detach()

    def top_level_tensors(self) -> dict[str, torch.Tensor]:
        return {"toy_shift": self.shift}


class LossToy(TaskToy):
    computes_loss = True
    loss_inputs = ("scale",)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, scale: float = 1.0, **_: object) -> torch.Tensor:
        return logits.mean() * scale


@pytest.fixture
def toy(isolated_registry):
    @hookimpl
    def peft_kernel_register_methods(register):
        register(MethodRecord(peft_type="TASK_TOY", config_class=TaskToyConfig, prefix="task_toy_",
                              capabilities={"prompt_learning", "multi_adapter", "mixed_batch"}, exports=FAMILY_EXPORTS))

    @hookimpl
    def peft_kernel_create_prompt_encoder(config, adapter_name, model, word_embeddings):
        if not isinstance(config, TaskToyConfig):
            return None
        return (LossToy if config.own_loss else TaskToy)(config)

    plugin = types.SimpleNamespace(peft_kernel_register_methods=peft_kernel_register_methods,
                                   peft_kernel_create_prompt_encoder=peft_kernel_create_prompt_encoder)
    isolated_registry(entry_points=[], extra_plugins={"toy": plugin, "prompt_learning": family})


def _model(**kw) -> PeftModel:
    torch.manual_seed(0)
    return get_peft_model(make_model("llama"), TaskToyConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, **kw)).eval()


def _by_hand(model: PeftModel, adapter: str, task: int, row: int) -> torch.Tensor:
    encoder = model.prompt_encoder[adapter]
    prompt = encoder.embedding.weight + task * encoder.shift
    embeds = torch.cat([prompt[None], model.word_embeddings(IDS[row: row + 1])], dim=1)
    return model.get_base_model()(inputs_embeds=embeds).logits


def test_task_ids_reach_the_encoder_per_row_also_in_mixed_batches(toy):
    model = _model()
    model.add_adapter("other", TaskToyConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with torch.no_grad():
        out = model(input_ids=IDS, task_ids=[2, 0, 1]).logits
        mixed = model(input_ids=IDS, task_ids=torch.tensor([1, 2, 0]), adapter_names=["other", "default", "other"]).logits
        for row, task in enumerate([2, 0, 1]):
            torch.testing.assert_close(out[row: row + 1], _by_hand(model, "default", task, row))
        for row, (name, task) in enumerate([("other", 1), ("default", 2), ("other", 0)]):
            torch.testing.assert_close(mixed[row: row + 1], _by_hand(model, name, task, row))
    with pytest.raises(ValueError, match="task_ids cannot be None"):
        model(input_ids=IDS)
    with pytest.raises(ValueError, match="one integer task id per batch row"):
        model(input_ids=IDS, task_ids=[0, 1])


def test_top_level_tensors_are_saved_and_loaded_under_their_own_keys(toy, tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == ["prompt_embeddings", "toy_shift"]
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert torch.equal(loaded.prompt_encoder["default"].shift, model.prompt_encoder["default"].shift)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["toy_shift"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="toy_shift"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_an_encoder_can_compute_the_loss_from_its_own_inputs(toy):
    model = _model(own_loss=True)
    out = model(input_ids=IDS, labels=IDS, task_ids=[0, 1, 2], scale=3.0)
    torch.testing.assert_close(out.loss, out.logits.mean() * 3.0)
    assert model(input_ids=IDS, task_ids=[0, 1, 2], scale=3.0).loss is None  # no labels, no loss
    loss, logits = model(input_ids=IDS, labels=IDS, task_ids=[0, 1, 2], return_dict=False)[:2]
    torch.testing.assert_close(loss, logits.mean())
