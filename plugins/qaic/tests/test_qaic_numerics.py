"""ONNX Runtime vs PyTorch (HF PEFT as the oracle) for tiny Llama / Mistral / Qwen2 with three adapters.

One export per architecture (module-scoped fixtures); the adapters differ in rank, target modules
and scaling (rank/alpha patterns, rsLoRA, layers_to_transform).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from qaic_testing import ADAPTER_SPECS, ARCHS, hf_peft_model, save_hf_adapters, tiny_model

from peft_kernel_qaic import QEffAutoLoraModelForCausalLM, QEffAutoPeftModelForCausalLM

PROMPTS = ["what is 12+30?", "hello", "def add(a, b): return a + b", "tell me a story about a cat", "2*3="]
MAPPING = ["gsm8k", "base", "code", "chat", "gsm8k"]
GEN = 6
TOL = 1e-4


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory, tokenizer):
    arch = request.param
    folder = tmp_path_factory.mktemp(f"qaic-{arch}")
    model = tiny_model(arch)
    paths = save_hf_adapters(model, folder / "adapters")
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model)
    ids = {name: qeff.load_adapter(path, name) for name, path in paths.items()}
    start = time.perf_counter()
    onnx_path = qeff.export(folder / "export", batch_size=2, prefill_seq_len=8, ctx_len=48)
    export_s = time.perf_counter() - start
    result = qeff.generate(tokenizer, PROMPTS, MAPPING, generation_len=GEN, runtime="onnxruntime", return_logits=True)
    return dict(arch=arch, folder=folder, model=model, paths=paths, qeff=qeff, ids=ids, onnx=onnx_path,
                export_s=export_s, result=result, oracle=hf_peft_model(model, paths))


def _oracle_logits(oracle, tokenizer, prompt, adapter, generated):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    full = torch.cat([ids, torch.tensor([generated])], dim=1)
    with torch.no_grad():
        if adapter == "base":
            with oracle.disable_adapter():
                logits = oracle(full).logits
        else:
            oracle.set_adapter(adapter)
            logits = oracle(full).logits
    n = ids.shape[1]
    return logits[0, n - 1 : n - 1 + len(generated)].numpy()


def _oracle_generate(model, tokenizer, prompt, n):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_adapter_ids_start_after_base(setup):
    assert setup["ids"] == {"gsm8k": 1, "code": 2, "chat": 3}
    assert setup["qeff"].adapter_name_to_id["base"] == 0


def test_ort_logits_match_hf_peft_per_row(setup, tokenizer):
    res = setup["result"]
    worst = 0.0
    for i, (prompt, adapter) in enumerate(zip(PROMPTS, MAPPING)):
        ref = _oracle_logits(setup["oracle"], tokenizer, prompt, adapter, res.generated_ids[i])
        diff = float(np.abs(ref - res.logits[i]).max())
        worst = max(worst, diff)
        assert diff <= TOL, (setup["arch"], i, adapter, diff)
    print(f"\n[{setup['arch']}] max |ORT - HF PEFT| logits = {worst:.2e}; export {setup['export_s']:.2f}s; "
          f"decode {res.perf.get('decode_ms_per_step', 0):.2f} ms/step (batch 2)")


def test_mixed_batch_tokens_equal_each_prompt_alone_in_hf_peft(setup, tokenizer):
    res = setup["result"]
    oracle = setup["oracle"]
    assert len(res.generated_ids) == len(PROMPTS) and res.prompt_to_adapter_mapping == MAPPING
    for i, (prompt, adapter) in enumerate(zip(PROMPTS, MAPPING)):
        if adapter == "base":
            continue
        oracle.set_adapter(adapter)
        assert res.generated_ids[i] == _oracle_generate(oracle, tokenizer, prompt, GEN), (setup["arch"], i, adapter)
        assert res.generated_texts[i] == tokenizer.decode(res.generated_ids[i], skip_special_tokens=True)


def test_base_rows_equal_plain_model(setup, tokenizer):
    res = setup["result"]
    i = MAPPING.index("base")
    assert res.generated_ids[i] == _oracle_generate(setup["model"], tokenizer, PROMPTS[i], GEN)


def test_adapters_change_outputs(setup):
    # the fixture's adapters are not no-ops: the same prompt differs across adapters
    qeff = setup["qeff"]
    prompt = [[1, 10, 11, 12, 13]]
    outs = {a: qeff.generate(prompt_token_ids=prompt, prompt_to_adapter_mapping=[a], generation_len=1,
                             runtime="onnxruntime", return_logits=True).logits[0] for a in ["base", *ADAPTER_SPECS]}
    for a in ADAPTER_SPECS:
        assert np.abs(outs[a] - outs["base"]).max() > 1e-3, a


def test_reexport_skipped_when_nothing_changed(setup):
    qeff = setup["qeff"]
    before = setup["onnx"]
    assert qeff.export(setup["folder"] / "export") == before
    assert qeff.last_export_seconds == 0.0


@pytest.mark.parametrize("arch", ["llama"])
def test_add_adapter_after_export_reexports(arch, tmp_path, tokenizer):
    model = tiny_model(arch)
    paths = save_hf_adapters(model, tmp_path / "a")
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model)
    qeff.load_adapter(paths["gsm8k"], "gsm8k")
    first = qeff.export(tmp_path / "e", batch_size=1, prefill_seq_len=8, ctx_len=32)
    assert qeff.load_adapter(paths["code"], "code") == 2
    res = qeff.generate(tokenizer, ["hi there", "hi there"], ["code", "gsm8k"], generation_len=3, runtime="onnxruntime")
    assert qeff.onnx_path is not None and str(qeff.onnx_path) != first  # re-exported with 3 slots
    assert qeff.last_export_seconds > 0
    oracle = hf_peft_model(model, {k: paths[k] for k in ("gsm8k", "code")})
    oracle.set_adapter("code")
    assert res.generated_ids[0] == _oracle_generate(oracle, tokenizer, "hi there", 3)
    qeff.unload_adapter("gsm8k")
    assert qeff.adapter_name_to_id == {"base": 0, "code": 1}


def test_swap_class_serves_two_adapters_from_one_export(tmp_path, tokenizer):
    model = tiny_model("qwen2")
    specs = {
        "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "a2": dict(r=4, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    }
    paths = save_hf_adapters(model, tmp_path / "a", specs=specs)
    qeff = QEffAutoPeftModelForCausalLM.from_pretrained(paths["a1"], "a1", base_model=model)
    qeff.load_adapter(paths["a2"], "a2")
    assert set(qeff.adapter_weights) == {"a1", "a2"}
    onnx_path = qeff.export(tmp_path / "e", batch_size=2, prefill_seq_len=8, ctx_len=32)
    oracle = hf_peft_model(model, paths)
    prompts = ["what is 1+1?", "cats"]
    for name in ("a1", "a2"):
        qeff.set_adapter(name)
        res = qeff.generate(tokenizer, prompts, generation_len=4, runtime="onnxruntime", return_logits=True)
        assert qeff.export(tmp_path / "e") == onnx_path and qeff.last_export_seconds == 0.0  # no re-export
        oracle.set_adapter(name)
        for i, p in enumerate(prompts):
            assert res.generated_ids[i] == _oracle_generate(oracle, tokenizer, p, 4)
            ref = _oracle_logits(oracle, tokenizer, p, name, res.generated_ids[i])
            assert np.abs(ref - res.logits[i]).max() <= TOL
    # a different config (other rank / targets) is refused with a clear message
    other = save_hf_adapters(model, tmp_path / "b", specs={"r8": dict(r=8, target_modules=["q_proj"])})
    with pytest.raises(Exception, match="another config"):
        qeff.load_adapter(other["r8"], "r8")


def test_swap_class_from_live_peft_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    qeff = QEffAutoPeftModelForCausalLM(lora)
    assert set(qeff.adapter_weights) == {"default"}
    assert qeff.active_adapter == "default"


def test_verify_reports_agreement_with_pytorch_reference(setup, tokenizer):
    # the built-in check users run without the card (reference: transformers forward + LoRA hooks)
    report = setup["qeff"].verify(tokenizer, PROMPTS[:3], MAPPING[:3], generation_len=3)
    assert report.ok and report.worst <= TOL, str(report)
    assert "match" in str(report)


def test_qwen3_q_k_norm_architecture(tmp_path, tokenizer):
    model = tiny_model("qwen3")
    paths = save_hf_adapters(model, tmp_path / "a", specs={k: ADAPTER_SPECS[k] for k in ("gsm8k", "code")})
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model)
    for name, path in paths.items():
        qeff.load_adapter(path, name)
    qeff.export(tmp_path / "e", batch_size=3, prefill_seq_len=8, ctx_len=32)
    report = qeff.verify(tokenizer, PROMPTS[:3], ["code", "base", "gsm8k"], generation_len=3)
    assert report.ok and report.worst <= TOL, str(report)
    oracle = hf_peft_model(model, paths)
    oracle.set_adapter("code")
    res = qeff.generate(tokenizer, PROMPTS[:1], ["code"], generation_len=3, runtime="onnxruntime", return_logits=True)
    assert np.abs(_oracle_logits(oracle, tokenizer, PROMPTS[0], "code", res.generated_ids[0]) - res.logits[0]).max() <= TOL
