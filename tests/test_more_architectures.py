"""Cross-loading with HF peft on architectures and options beyond the conformance models:
scaled embeddings (Gemma), embedding layers saved with the adapter, a classifier head that is both
inside all-linear and saved whole (RoBERTa), Qwen2's biased projections."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peft_kernel import PeftModel
from peft_kernel_testing import perturb, run

peft = pytest.importorskip("peft")


def make(kind):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=64, pad_token_id=0)
    if kind == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, head_dim=4, **common)).eval()
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, **common)).eval()
    return tf.RobertaForSequenceClassification(tf.RobertaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                                num_attention_heads=2, num_labels=2, **common)).eval()


CASES = [
    ("gemma", dict(target_modules=["q_proj", "v_proj", "embed_tokens"], use_rslora=True)),
    ("gemma", dict(target_modules=["embed_tokens", "lm_head"], use_dora=True)),
    ("qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("roberta", dict(task_type="SEQ_CLS", target_modules="all-linear", use_dora=True)),
]


@pytest.mark.parametrize("kind, config", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_cross_load_both_ways(kind, config, tmp_path):
    inputs = {"input_ids": torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(1))}
    hf = peft.get_peft_model(make(kind), peft.LoraConfig(**config))
    perturb(hf, 0)
    expected = run(hf.eval(), inputs)
    hf.save_pretrained(tmp_path / "hf")
    ours = PeftModel.from_pretrained(make(kind), tmp_path / "hf")
    torch.testing.assert_close(run(ours, inputs), expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(load_file(tmp_path / "hf" / "adapter_model.safetensors"))
    back = peft.PeftModel.from_pretrained(make(kind), tmp_path / "ours").eval()
    torch.testing.assert_close(run(back, inputs), expected, atol=1e-5, rtol=0)


def test_embedding_layers_are_saved_when_targeted(tmp_path):
    from peft_kernel import LoraConfig, get_peft_model

    model = get_peft_model(make("gemma"), LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(tmp_path / "auto")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / "auto" / "adapter_model.safetensors")
    model.save_pretrained(tmp_path / "off", save_embedding_layers=False)
    assert not any("base_layer" in k for k in load_file(tmp_path / "off" / "adapter_model.safetensors"))


@pytest.mark.parametrize("task, cls", [("TOKEN_CLS", "BertForTokenClassification"), ("QUESTION_ANS", "BertForQuestionAnswering")])
def test_task_heads_cross_load_both_ways(task, cls, tmp_path):
    import transformers as tf

    def make_bert():
        torch.manual_seed(0)
        return getattr(tf, cls)(tf.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              num_labels=2, vocab_size=64, pad_token_id=0)).eval()

    inputs = {"input_ids": torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(1))}
    config = dict(task_type=task, target_modules=["query", "value", "dense"], use_dora=True, r=2)
    hf = peft.get_peft_model(make_bert(), peft.LoraConfig(**config))
    perturb(hf, 0)
    expected = run(hf.eval(), inputs)
    hf.save_pretrained(tmp_path / "hf")
    ours = PeftModel.from_pretrained(make_bert(), tmp_path / "hf")
    assert type(ours).__name__ == type(hf).__name__
    torch.testing.assert_close(run(ours, inputs), expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make_bert(), tmp_path / "ours").eval()
    torch.testing.assert_close(run(back, inputs), expected, atol=1e-5, rtol=0)
