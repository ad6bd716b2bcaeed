"""Target selection equals HF PEFT's on the same models and configs."""

from __future__ import annotations

import pytest

from peft_kernel import LoraConfig, get_peft_model
from peft_kernel.errors import TargetNotFoundError
from peft_kernel.layer import AdapterLayer
from peft_kernel_testing import make_model

CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=r".*layers\.1\.mlp\.(up|down)_proj")),
    ("llama", dict(target_modules=["self_attn.q_proj", "mlp.down_proj"])),
    ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"])),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*layers\.0\..*")),
    ("llama", dict(target_modules=["q_proj", "k_proj"], layers_to_transform=1)),
    ("llama", dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[0], layers_pattern="layers")),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=["blocks", "layers"])),
    ("llama", dict()),  # model-type default targets
    ("gpt2", dict(target_modules="all-linear")),
    ("gpt2", dict()),
    ("bert", dict(target_modules="all-linear")),
    ("t5", dict(target_modules="all-linear")),
    ("opt", dict(target_modules=["q_proj", "fc1"], layers_to_transform=[1])),
    ("mlp", dict(target_modules=["lin0", "lin2"])),
]


def targeted(model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules()
            if isinstance(m, AdapterLayer) or type(m).__name__ in ("Linear", "Conv1D", "Embedding") and hasattr(m, "lora_A")}


@pytest.mark.parametrize("kind, kwargs", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_same_modules_as_hf(kind, kwargs):
    peft = pytest.importorskip("peft")
    ours = get_peft_model(make_model(kind), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(make_model(kind), peft.LoraConfig(**kwargs))
    ours_set = {n.removeprefix("base_model.model.") for n, m in ours.named_modules() if isinstance(m, AdapterLayer)}
    theirs_set = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert ours_set == theirs_set
    assert ours_set, "nothing targeted"
    assert set(ours.peft_config["default"].target_modules) == set(theirs.peft_config["default"].target_modules)


def test_no_match_lists_close_names():
    with pytest.raises(TargetNotFoundError) as info:
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_prj", "v_proj_x"]))
    message = str(info.value)
    assert "['q_prj', 'v_proj_x']" in message and "q_proj" in message and "v_proj" in message


def test_no_match_mentions_layer_filter():
    with pytest.raises(TargetNotFoundError, match="layers_to_transform=\\[7\\]"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))


def test_model_without_default_targets_asks_for_them():
    with pytest.raises(TargetNotFoundError, match="no default for model_type None"):
        get_peft_model(make_model("mlp"), LoraConfig())


def test_unsupported_layer_type_is_named():
    with pytest.raises(TargetNotFoundError, match="'model.layers.0.input_layernorm' of type LlamaRMSNorm"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["input_layernorm"]))


def test_model_type_default_may_be_one_regex():
    """``gemma4``'s default is one regex string (the language model's q/v projections): it must stay
    a string, not become a set of its characters, and match only the language model."""
    import types

    from torch import nn

    from peft_kernel.model_defaults import DEFAULT_TARGET_MODULES

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    class Gemma4Like(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = types.SimpleNamespace(model_type="gemma4")
            self.model = nn.Module()
            self.model.language_model = nn.ModuleList([Attention()])
            self.model.vision_tower = nn.ModuleList([Attention()])

        def forward(self, x):
            return x

    assert isinstance(DEFAULT_TARGET_MODULES["gemma4"], str)
    model = get_peft_model(Gemma4Like(), LoraConfig())
    assert model.peft_config["default"].target_modules == DEFAULT_TARGET_MODULES["gemma4"]
    found = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, AdapterLayer))
    assert found == ["model.language_model.0.q_proj", "model.language_model.0.v_proj"]


def test_default_for_any_model_type_may_be_all_linear():
    """A method's table may hold a default for every model type it does not name (key
    ``ANY_MODEL_TYPE``, models without a ``config`` included); ``"all-linear"`` as a default is
    expanded as if the config had said it."""
    from peft_kernel.records import MethodRecord
    from peft_kernel.targeting import ALL_LINEAR, ANY_MODEL_TYPE, expand_target_modules

    record = MethodRecord(peft_type="ANYDEFAULT", config_class=LoraConfig, prefix="anydefault_",
                          default_target_modules={"llama": ["q_proj"], ANY_MODEL_TYPE: ALL_LINEAR})

    def expanded(kind: str, target_modules=None):
        config = LoraConfig(target_modules=target_modules)
        expand_target_modules(config, make_model(kind), record)
        return config.target_modules

    assert expanded("llama") == {"q_proj"}
    assert expanded("mlp") == {"lin0", "lin1", "lin2"}
    assert expanded("gpt2") == expanded("gpt2", ALL_LINEAR) and expanded("gpt2")
    assert expanded("bert") == expanded("bert", ALL_LINEAR)
