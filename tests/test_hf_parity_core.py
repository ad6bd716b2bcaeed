"""Core behaviours checked against HF peft 0.21 (the oracle) on the same weights:

1. ``bias="all"`` with ``modules_to_save``: HF writes a redundant copy of the head's biases
   (``classifier.modules_to_save.bias``); we load HF's file (skipping the copy as HF does) and HF
   loads ours, with equal outputs both ways.
2. Default target modules (``target_modules=None``) per method and ``model_type`` equal HF's tables,
   regex strings included (``gemma4``), and target the same modules of a tiny Gemma4.
3. ``unload()`` keeps the active adapter's trained copy of a ``modules_to_save`` module, as HF does.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_kernel import PeftModel, get_peft_model
from peft_kernel.layer import adapter_layers
from peft_kernel_testing import perturb, run

peft = pytest.importorskip("peft")

import peft_kernel as pk  # noqa: E402  (plugin config classes resolve lazily)


def seq_cls(kind: str) -> torch.nn.Module:
    """A tiny sequence classifier: BERT's head is one Linear, RoBERTa's has two (dense, out_proj)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_labels=3, vocab_size=64)
    if kind == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(pad_token_id=0, **common)).eval()
    return tf.RobertaForSequenceClassification(tf.RobertaConfig(pad_token_id=1, **common)).eval()


INPUTS = {"input_ids": torch.randint(2, 64, (3, 6), generator=torch.Generator().manual_seed(3))}


# ---- 1. bias="all" with modules_to_save --------------------------------------------------------------
HF_DUPLICATES = {
    "bert": ["base_model.model.classifier.modules_to_save.bias"],
    "roberta": ["base_model.model.classifier.modules_to_save.default.dense.bias",
                "base_model.model.classifier.modules_to_save.default.out_proj.bias"],
}


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_bias_all_with_modules_to_save_cross_loads(kind, tmp_path):
    hf = peft.get_peft_model(seq_cls(kind), peft.LoraConfig(task_type="SEQ_CLS", bias="all"))
    perturb(hf, 0)  # biases train with bias="all": the base model's and the head copy's all change
    expected = run(hf.eval(), INPUTS)
    hf.save_pretrained(tmp_path / "hf")
    hf_keys = set(load_file(tmp_path / "hf" / "adapter_model.safetensors"))
    assert set(HF_DUPLICATES[kind]) <= hf_keys  # what HF writes (if this changes, HF changed its format)

    ours = PeftModel.from_pretrained(seq_cls(kind), tmp_path / "hf")
    torch.testing.assert_close(run(ours, INPUTS), expected, atol=1e-5, rtol=0)

    ours.save_pretrained(tmp_path / "ours")
    our_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert our_keys == hf_keys - set(HF_DUPLICATES[kind])  # we do not write the redundant copy
    back = peft.PeftModel.from_pretrained(seq_cls(kind), tmp_path / "ours").eval()
    torch.testing.assert_close(run(back, INPUTS), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_hf_bias_duplicates_land_nowhere(kind, tmp_path):
    """HF loads the plain ``classifier.<param>`` keys into the trained copy; its ``modules_to_save``
    duplicates land nowhere (or are overwritten by the plain key). Marked with another value, they
    must change nothing here either, and are reported as unexpected keys."""
    from peft_kernel import set_peft_model_state_dict

    hf = peft.get_peft_model(seq_cls(kind), peft.LoraConfig(task_type="SEQ_CLS", bias="all"))
    perturb(hf, 0)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    for key in HF_DUPLICATES[kind]:
        tensors[key] = torch.full_like(tensors[key], 123.0)
    save_file(tensors, path, metadata={"format": "pt"})
    expected = run(peft.PeftModel.from_pretrained(seq_cls(kind), tmp_path).eval(), INPUTS)

    ours = PeftModel.from_pretrained(seq_cls(kind), tmp_path)
    torch.testing.assert_close(run(ours, INPUTS), expected, atol=1e-5, rtol=0)
    assert not [n for n, p in ours.named_parameters() if (p == 123.0).any()]
    result = set_peft_model_state_dict(ours, tensors)
    assert sorted(result.unexpected_keys) == sorted(HF_DUPLICATES[kind])


def test_bias_all_duplicates_saved_under_another_adapter_name(tmp_path):
    """RoBERTa's duplicate key carries the adapter's name; loaded under another name it neither
    fails nor lands anywhere."""
    hf = peft.get_peft_model(seq_cls("roberta"), peft.LoraConfig(task_type="SEQ_CLS", bias="all"), adapter_name="mine")
    perturb(hf, 0)
    expected = run(hf.eval(), INPUTS)
    hf.save_pretrained(tmp_path)
    assert "base_model.model.classifier.modules_to_save.mine.dense.bias" in load_file(tmp_path / "mine" / "adapter_model.safetensors")
    ours = PeftModel.from_pretrained(seq_cls("roberta"), tmp_path / "mine", adapter_name="other")
    torch.testing.assert_close(run(ours, INPUTS), expected, atol=1e-5, rtol=0)


# ---- 2. default target modules -------------------------------------------------------------------
def _our_records():
    from peft_kernel.plugins import get_registry

    return get_registry().methods


@pytest.mark.parametrize("peft_type", ["LORA", "LOHA", "LOKR", "OFT", "IA3"])
def test_default_target_tables_equal_hf(peft_type):
    """Whole table, per method, values and their kind (a regex string is not a list of characters)."""
    from peft.utils import constants

    records = _our_records()
    if peft_type not in records:
        pytest.skip(f"no {peft_type} plugin installed")
    theirs = getattr(constants, f"TRANSFORMERS_MODELS_TO_{peft_type}_TARGET_MODULES_MAPPING")
    ours = dict(records[peft_type].default_target_modules)
    assert sorted(ours) == sorted(theirs)
    different = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k] or type(ours[k]) is not type(theirs[k])}
    assert not different


def tiny_gemma4() -> torch.nn.Module:
    """Gemma4ForConditionalGeneration (model_type ``gemma4``): a language model plus a vision tower,
    both with ``q_proj`` / ``v_proj``; HF's default regex targets the language model's only."""
    import transformers as tf

    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, global_head_dim=8, vocab_size_per_layer_input=64,
                hidden_size_per_layer_input=4, pad_token_id=0, layer_types=["sliding_attention", "full_attention"],
                sliding_window=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                  head_dim=8, patch_size=4, position_embedding_size=64)
    config = tf.Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=60, boi_token_id=61,
                             eoi_token_id=62, video_token_id=63, boa_token_id=59, audio_token_id=58, eoa_token_index=57)
    torch.manual_seed(0)
    return tf.Gemma4ForConditionalGeneration(config).eval()


GEMMA4_METHODS = {  # (ours, HF) config names and the kwargs both take
    "LORA": ("LoraConfig", {}),
    "LOHA": ("LoHaConfig", {}),
    "LOKR": ("LoKrConfig", {}),
    "OFT": ("OFTConfig", {"oft_block_size": 4}),
}


@pytest.mark.parametrize("peft_type", sorted(GEMMA4_METHODS))
def test_gemma4_default_targets_match_hf(peft_type, tmp_path):
    name, kwargs = GEMMA4_METHODS[peft_type]
    if peft_type not in _our_records():
        pytest.skip(f"no {peft_type} plugin installed")
    pytest.importorskip("transformers.models.gemma4")
    inputs = {"input_ids": torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(1))}
    hf = peft.get_peft_model(tiny_gemma4(), getattr(peft, name)(**kwargs))
    perturb(hf, 0)
    expected = run(hf.eval(), inputs)
    ours = get_peft_model(tiny_gemma4(), getattr(pk, name)(**kwargs))
    assert ours.peft_config["default"].target_modules == hf.peft_config["default"].target_modules
    targeted = sorted(path for path, _ in adapter_layers(ours.get_base_model()))
    assert targeted == sorted(hf.targeted_module_names)
    assert targeted and all("language_model" in t for t in targeted)  # the vision tower's q/v_proj stay out

    hf.save_pretrained(tmp_path / "hf")
    loaded = PeftModel.from_pretrained(tiny_gemma4(), tmp_path / "hf")
    torch.testing.assert_close(run(loaded, inputs), expected, atol=1e-5, rtol=0)
    loaded.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_gemma4(), tmp_path / "ours").eval()
    torch.testing.assert_close(run(back, inputs), expected, atol=1e-5, rtol=0)


# ---- 3. unload() with modules_to_save ------------------------------------------------------------
def _two_adapters(lib, kind="bert"):
    model = lib.get_peft_model(seq_cls(kind), lib.LoraConfig(task_type="SEQ_CLS"), adapter_name="first")
    perturb(model, 0)
    model.add_adapter("second", lib.LoraConfig(task_type="SEQ_CLS"))
    model.set_adapter("second")
    perturb(model, 1)
    return model.eval()


@pytest.mark.parametrize("active", ["first", "second"])
@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unload_keeps_the_active_trained_copy(how, active):
    outputs, heads = {}, {}
    for lib in (peft, pk):
        model = _two_adapters(lib)
        model.set_adapter(active)
        copy = model.base_model.model.classifier.modules_to_save[active]
        plain = getattr(model, how)()
        heads[lib] = plain.classifier is copy
        outputs[lib] = run(plain, INPUTS)
    assert heads[peft] and heads[pk]
    torch.testing.assert_close(outputs[pk], outputs[peft], atol=1e-5, rtol=0)
    assert not torch.allclose(outputs[pk], run(seq_cls("bert"), INPUTS), atol=1e-3)  # not the base model's head


def test_unload_inside_disable_adapter_keeps_the_trained_copy():
    """HF keeps the active copy even when unloading inside ``disable_adapter``."""
    outputs = {}
    for lib in (peft, pk):
        model = _two_adapters(lib)
        model.set_adapter("first")
        with model.disable_adapter():
            plain = model.unload()
        outputs[lib] = run(plain, INPUTS)
    torch.testing.assert_close(outputs[pk], outputs[peft], atol=1e-5, rtol=0)


def test_unload_gives_the_original_when_the_active_adapter_saves_no_module():
    """Adapter ``second`` saves the classifier, the active adapter ``first`` does not: the original stays."""
    outputs = {}
    for lib in (peft, pk):
        model = lib.get_peft_model(seq_cls("bert"), lib.LoraConfig(target_modules=["query"]), adapter_name="first")
        model.add_adapter("second", lib.LoraConfig(target_modules=["value"], modules_to_save=["classifier"]))
        model.set_adapter("second")
        perturb(model, 1)
        model.set_adapter("first")
        perturb(model, 0)
        outputs[lib] = run(model.eval().unload(), INPUTS)
    torch.testing.assert_close(outputs[pk], outputs[peft], atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs[pk], run(seq_cls("bert"), INPUTS), atol=1e-5, rtol=0)


def test_failed_load_gives_back_the_original_head(tmp_path):
    """Loading that fails still hands the caller's model back as it came, original head included."""
    from peft_kernel.errors import CheckpointError

    source = get_peft_model(seq_cls("bert"), pk.LoraConfig(task_type="SEQ_CLS"))
    source.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.classifier.weight"] = torch.zeros(5, 16)  # wrong shape
    save_file(tensors, path, metadata={"format": "pt"})
    model = seq_cls("bert")
    head = model.classifier
    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(model, tmp_path)
    assert model.classifier is head
