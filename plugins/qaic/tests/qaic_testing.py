"""Helpers: tiny Llama / Mistral / Qwen2 models, three HF-PEFT-saved LoRA adapters each, a tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

VOCAB = 64
ARCHS = ("llama", "mistral", "qwen2")


def tiny_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=12, **common)  # exercised: prompts + generation exceed 12
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=8, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager").eval()
    # larger weights than the default init so greedy tokens differ between adapters
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 .,?!+-=*/:'"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        vocab[c] = len(vocab)
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    from tokenizers import decoders, processors

    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


# Three adapters that differ in rank, targets and scaling (rank/alpha patterns, rsLoRA).
ADAPTER_SPECS = {
    "gsm8k": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "code": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                 rank_pattern={"down_proj": 2}, alpha_pattern={"gate_proj": 4}),
    "chat": dict(r=2, lora_alpha=32, target_modules=["o_proj", "down_proj"], layers_to_transform=[1]),
}


def save_hf_adapters(model, folder, specs=ADAPTER_SPECS, seed: int = 1, std: float = 0.3):
    """Save each adapter with HF PEFT (the oracle) after giving it non-zero B weights."""
    import copy

    from peft import LoraConfig, get_peft_model

    paths = {}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(task_type="CAUSAL_LM", **spec))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, std)
        path = folder / name
        peft_model.save_pretrained(str(path))
        paths[name] = path
    return paths


def hf_peft_model(model, paths):
    """HF PEFT model with every adapter loaded (oracle for numerics)."""
    import copy

    from peft import PeftModel

    names = list(paths)
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(paths[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(paths[n]), adapter_name=n)
    return pm.eval()

