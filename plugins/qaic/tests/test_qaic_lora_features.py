"""DoRA, lora_bias, lm_head and embedding LoRA in the stacked graph: ONNX Runtime vs HF PEFT, per row.

Qwen2 (q/k/v biases: DoRA rescales the base output *without* its bias). One export serves a mixed
batch of plain LoRA, DoRA, lora_bias, lm_head + embed_tokens adapters and the base model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qaic_testing import hf_peft_model, save_hf_adapters, tiny_model

from peft_kernel_qaic import QEffAutoLoraModelForCausalLM, QEffAutoPeftModelForCausalLM
from peft_kernel_qaic.errors import AdapterLoadError

TOL = 1e-4
GEN = 4
PROMPTS = [[1, 10, 11, 12, 13, 14], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 5, 6, 7], [1, 40, 41, 42, 43],
           [1, 8, 9]]
SPECS = {
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    "bias": dict(r=2, lora_alpha=4, lora_bias=True, target_modules=["q_proj", "up_proj"]),
    "head": dict(r=4, lora_alpha=8, target_modules=["lm_head", "embed_tokens", "k_proj"]),
    "plain": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "gate_proj"]),
}
MAPPING = ["dora", "head", "bias", "base", "plain", "dora"]


def _logits(oracle, prompt, adapter, generated):
    full = torch.tensor([list(prompt) + list(generated)])
    with torch.no_grad():
        if adapter == "base":
            with oracle.disable_adapter():
                out = oracle(full).logits[0]
        else:
            oracle.set_adapter(adapter)
            out = oracle(full).logits[0]
    n = len(prompt)
    return out[n - 1 : n - 1 + len(generated)].numpy()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qaic-features")
    model = tiny_model("qwen2")
    with torch.no_grad():  # q/k/v biases non-zero, so DoRA's "without the bias" matters
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    paths = save_hf_adapters(model, folder / "adapters", specs=SPECS)
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model)
    for name, path in paths.items():
        qeff.load_adapter(path, name)
    qeff.export(folder / "export", batch_size=3, prefill_seq_len=4, ctx_len=24)
    res = qeff.generate(prompt_token_ids=PROMPTS, prompt_to_adapter_mapping=MAPPING, generation_len=GEN,
                        runtime="onnxruntime", return_logits=True)
    return dict(model=model, paths=paths, qeff=qeff, res=res, oracle=hf_peft_model(model, paths))


def test_features_read(served):
    adapters = served["qeff"].adapters
    assert set(adapters["dora"].dora) == {f"model.layers.{i}.{m}" for i in range(2)
                                          for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")}
    assert not adapters["dora"].biases and not adapters["plain"].dora
    assert set(adapters["bias"].biases) == {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")}
    assert {"lm_head", "model.embed_tokens"} <= set(adapters["head"].weights)
    a, b = adapters["head"].weights["model.embed_tokens"]
    assert a.shape == (4, 64) and b.shape == (32, 4)  # [r, vocab], [dim, r]


def test_ort_logits_equal_hf_peft_every_row(served):
    res, worst = served["res"], {}
    for i, (prompt, name) in enumerate(zip(PROMPTS, MAPPING)):
        ref = _logits(served["oracle"], prompt, name, res.generated_ids[i])
        diff = float(np.abs(ref - res.logits[i]).max())
        worst[name] = max(worst.get(name, 0.0), diff)
        assert diff <= TOL, (i, name, diff)
        assert ref.argmax(-1).tolist() == res.generated_ids[i], (i, name)
    print(f"\nmax |ORT - HF PEFT| per adapter: {worst}")


def test_features_change_outputs(served):
    qeff = served["qeff"]
    outs = {a: qeff.generate(prompt_token_ids=[PROMPTS[0]], prompt_to_adapter_mapping=[a], generation_len=1,
                             runtime="onnxruntime", return_logits=True).logits[0] for a in ["base", *SPECS]}
    for a in SPECS:
        assert np.abs(outs[a] - outs["base"]).max() > 1e-3, a


def test_verify_reference_knows_the_features(served):
    report = served["qeff"].verify(prompt_token_ids=PROMPTS[:4], prompt_to_adapter_mapping=MAPPING[:4], generation_len=3)
    assert report.ok and report.worst <= TOL, str(report)


def test_swap_class_head_and_embedding_as_inputs(served, tmp_path):
    qeff = QEffAutoPeftModelForCausalLM.from_pretrained(served["paths"]["head"], "head", base_model=served["model"])
    qeff.export(tmp_path, batch_size=2, prefill_seq_len=4, ctx_len=16)
    assert "model.embed_tokens.lora_A" in qeff.adapter_weights["head"]
    out = qeff.generate(prompt_token_ids=PROMPTS[:2], generation_len=3, runtime="onnxruntime", return_logits=True)
    for i in range(2):
        ref = _logits(served["oracle"], PROMPTS[i], "head", out.generated_ids[i])
        assert np.abs(ref - out.logits[i]).max() <= TOL


@pytest.mark.parametrize("name", ["dora", "bias"])
def test_swap_class_dora_and_bias_as_inputs(served, tmp_path, name):
    qeff = QEffAutoPeftModelForCausalLM.from_pretrained(served["paths"][name], name, base_model=served["model"])
    kind = "rescale" if name == "dora" else "bias"
    assert f"model.layers.0.self_attn.q_proj.lora_{kind}" in qeff.adapter_weights[name]
    qeff.export(tmp_path, batch_size=2, prefill_seq_len=4, ctx_len=16)
    out = qeff.generate(prompt_token_ids=PROMPTS[2:4], generation_len=3, runtime="onnxruntime", return_logits=True)
    for i in range(2):
        ref = _logits(served["oracle"], PROMPTS[2 + i], name, out.generated_ids[i])
        assert np.abs(ref - out.logits[i]).max() <= TOL
    # the same targets and ranks without DoRA / lora_bias need other graph inputs: refused, named
    plain = save_hf_adapters(served["model"], tmp_path / "plain", specs={"p": {**SPECS[name], "use_dora": False, "lora_bias": False}})
    with pytest.raises(AdapterLoadError, match="DoRA / lora_bias on other modules"):
        qeff.load_adapter(plain["p"], "p")
    assert list(qeff.adapters) == [name]


def test_continuous_batching_serves_the_features_per_slot(served, tmp_path):
    # 6 prompts through 2 KV-cache slots, each slot with its own adapter (DoRA, lora_bias, head+embedding...)
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(served["model"], continuous_batching=True)
    for name, path in served["paths"].items():
        qeff.load_adapter(path, name)
    qeff.export(tmp_path, prefill_seq_len=4, ctx_len=24, full_batch_size=2)
    res = qeff.generate(prompt_token_ids=PROMPTS, prompt_to_adapter_mapping=MAPPING, generation_len=GEN,
                        runtime="onnxruntime", full_batch_size=2, return_logits=True)
    for i, (prompt, name) in enumerate(zip(PROMPTS, MAPPING)):
        ref = _logits(served["oracle"], prompt, name, res.generated_ids[i])
        assert np.abs(ref - res.logits[i]).max() <= TOL, (i, name)


def test_dora_on_lm_head_and_embedding(served, tmp_path):
    # DoRA's magnitude on the embedding is per embedding dimension: the same per-column rescale
    spec = dict(r=2, lora_alpha=4, use_dora=True, target_modules=["embed_tokens", "lm_head", "q_proj"])
    saved = save_hf_adapters(served["model"], tmp_path, specs={"e": spec})
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(served["model"])
    qeff.load_adapter(saved["e"], "e")
    assert {"model.embed_tokens", "lm_head"} <= set(qeff.adapters["e"].dora)
    qeff.export(tmp_path / "x", batch_size=2, prefill_seq_len=4, ctx_len=16)
    res = qeff.generate(prompt_token_ids=PROMPTS[:2], prompt_to_adapter_mapping=["e", "base"], generation_len=3,
                        runtime="onnxruntime", return_logits=True)
    oracle = hf_peft_model(served["model"], saved)
    for i, name in enumerate(["e", "base"]):
        ref = _logits(oracle, PROMPTS[i], name, res.generated_ids[i])
        assert np.abs(ref - res.logits[i]).max() <= TOL, name
    swap = QEffAutoPeftModelForCausalLM.from_pretrained(saved["e"], "e", base_model=served["model"])
    assert swap.verify(prompt_token_ids=PROMPTS[:1], generation_len=3).worst <= TOL


def test_tied_embeddings_with_ensure_weight_tying(tmp_path):
    # HF saves lm_head's (tied) LoRA but leaves lm_head out of target_modules: loading must see the tie
    from qaic_testing import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    spec = dict(r=4, target_modules=["lm_head", "embed_tokens", "q_proj"], ensure_weight_tying=True)
    paths = save_hf_adapters(model, tmp_path / "a", specs={"tied": spec})
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model)
    qeff.load_adapter(paths["tied"], "tied")
    assert {"lm_head", "model.embed_tokens"} <= set(qeff.adapters["tied"].weights)
    res = qeff.generate(prompt_token_ids=PROMPTS[:2], prompt_to_adapter_mapping=["tied", "base"], generation_len=3,
                        runtime="onnxruntime", return_logits=True)
    oracle = hf_peft_model(model, paths)
    for i, name in enumerate(["tied", "base"]):
        assert np.abs(_logits(oracle, PROMPTS[i], name, res.generated_ids[i]) - res.logits[i]).max() <= TOL, name
