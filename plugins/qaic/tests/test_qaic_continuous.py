"""Continuous batching on ONNX Runtime: 8 prompts through 3 KV-cache slots, 3 adapters + "base".

Oracle: HF PEFT generating each prompt alone with its adapter (``set_adapter``, or the adapters
disabled for ``"base"``). The EOS id is picked among the tokens the oracle generates so that
prompts stop at different steps (and some run to ``generation_len``).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from qaic_testing import hf_peft_model, save_hf_adapters, tiny_model

from peft_kernel_qaic import AdapterMappingError, QEffAutoLoraModelForCausalLM
from peft_kernel_qaic.errors import ExportConfigError

PROMPTS = ["hi", "what is 12+30?", "a", "def add(a, b): return a + b", "2*3=", "tell me a story",
           "ok then", "the quick brown fox"]
MAPPING = ["gsm8k", "base", "code", "chat", "gsm8k", "code", "base", "chat"]
GEN, SLOTS, TOL = 8, 3, 1e-4


class EosTokenizer:
    """The test tokenizer with another EOS id (one the model actually generates)."""

    def __init__(self, tokenizer, eos_token_id: int) -> None:
        self.tokenizer, self.eos_token_id, self.pad_token_id = tokenizer, eos_token_id, 0

    def __call__(self, text):
        return self.tokenizer(text)

    def decode(self, ids, **kwargs):
        return self.tokenizer.decode(ids, **kwargs)


def _with_adapter(oracle, adapter, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``adapter`` active (``"base"``: adapters disabled)."""
    with torch.no_grad():
        if adapter == "base":
            with oracle.disable_adapter():
                return fn(*args, **kwargs)
        oracle.set_adapter(adapter)
        return fn(*args, **kwargs)


def _greedy(oracle, ids, adapter, n):
    """n greedy tokens through the oracle's forward (no EOS): used to pick an EOS id that occurs."""
    seq = ids.clone()
    for _ in range(n):
        nxt = _with_adapter(oracle, adapter, oracle, seq).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, ids.shape[1]:].tolist()


def _pick_eos(sequences):
    """The token whose first occurrences fall on the most distinct steps, not in every sequence."""
    firsts: dict[int, dict[int, int]] = {}
    for k, seq in enumerate(sequences):
        for step, t in enumerate(seq):
            firsts.setdefault(t, {}).setdefault(k, step)
    candidates = [(len(set(f.values())), len(f), t) for t, f in firsts.items() if len(f) < len(sequences) and t > 3]
    return max(candidates)[2]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("qaic-cb")
    model = tiny_model("llama")
    paths = save_hf_adapters(model, folder / "adapters")
    oracle = hf_peft_model(model, paths)
    ids = [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
    eos = _pick_eos([_greedy(oracle, i, a, GEN) for i, a in zip(ids, MAPPING)])
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model, continuous_batching=True)
    for name, path in paths.items():
        qeff.load_adapter(path, name)
    qeff.export(folder / "export", prefill_seq_len=4, ctx_len=48, full_batch_size=SLOTS)
    tok = EosTokenizer(tokenizer, eos)
    result = qeff.generate(tok, PROMPTS, MAPPING, generation_len=GEN, runtime="onnxruntime",
                           full_batch_size=SLOTS, return_logits=True)
    return dict(model=model, paths=paths, oracle=oracle, ids=ids, eos=eos, qeff=qeff, tok=tok, result=result)


def test_each_prompt_equals_hf_peft_generating_it_alone(served):
    oracle, eos, res = served["oracle"], served["eos"], served["result"]
    stopped_at = []
    for i, (ids, adapter) in enumerate(zip(served["ids"], MAPPING)):
        out = _with_adapter(oracle, adapter, oracle.generate, input_ids=ids, max_new_tokens=GEN, do_sample=False,
                            eos_token_id=eos, pad_token_id=0)
        ref = out[0, ids.shape[1]:].tolist()
        if eos in ref:
            ref = ref[: ref.index(eos) + 1]
            stopped_at.append(len(ref))
        assert res.generated_ids[i] == ref, (i, adapter, res.generated_ids[i], ref)
    # EOS at different steps, and some prompts run to generation_len: slots are refilled at different times
    assert len(set(stopped_at)) >= 2 and len(stopped_at) < len(PROMPTS), stopped_at
    print(f"\n[cb] eos={eos} stopped after {stopped_at}; decode steps {res.perf['decode_steps']}")
    assert len({len(p) for p in PROMPTS}) == len(PROMPTS)


def test_logits_match_hf_peft_per_prompt(served):
    oracle, res = served["oracle"], served["result"]
    for i, (ids, adapter) in enumerate(zip(served["ids"], MAPPING)):
        full = torch.cat([ids, torch.tensor([res.generated_ids[i]])], dim=1)
        logits = _with_adapter(oracle, adapter, oracle, full).logits
        n = ids.shape[1]
        ref = logits[0, n - 1 : n - 1 + len(res.generated_ids[i])].numpy()
        assert float(np.abs(ref - res.logits[i]).max()) <= TOL, (i, adapter)


def test_slots_are_shared_and_refilled(served):
    res = served["result"]
    assert res.prompt_to_adapter_mapping == MAPPING
    assert res.perf["prefill_calls"] >= len(PROMPTS)  # every prompt prefilled once (long ones in chunks)
    # 3 slots decode together: far fewer steps than generating the 8 prompts one after another
    assert res.perf["decode_steps"] < sum(len(g) - 1 for g in res.generated_ids)
    assert res.generated_texts == [served["tok"].decode(g, skip_special_tokens=True) for g in res.generated_ids]


def test_fewer_slots_than_exported_give_the_same_tokens(served):
    res = served["qeff"].generate(served["tok"], PROMPTS, MAPPING, generation_len=GEN, runtime="onnxruntime", full_batch_size=1)
    assert res.generated_ids == served["result"].generated_ids


def test_device_style_loop_keeps_the_cache_itself(served):
    """A session holding the KV cache (as the card does) gives the same tokens."""
    from peft_kernel_qaic.continuous import generate_continuous
    from peft_kernel_qaic.export import read_meta
    from peft_kernel_qaic.runtime import ort_session

    qeff = served["qeff"]
    meta = read_meta(qeff.onnx_path)
    inner = ort_session(qeff.onnx_path)
    state = {}
    shape = [SLOTS, meta["kv_shape"][1], 48, meta["kv_shape"][3]]

    def device(feeds):
        assert not any(k.startswith("past_") for k in feeds)
        full = dict(feeds)
        for name in meta["kv_inputs"]:
            full[name] = state.get(name, np.full(shape, 7.0, np.float32))  # garbage until written
        out = inner(full)
        for name in meta["kv_inputs"]:
            state[name] = out.pop(f"{name}_RetainedState")
        return out

    device.retains_state = True
    prompts = [served["tok"](p)["input_ids"] for p in PROMPTS]
    adapter_ids = [qeff.adapter_name_to_id[m] for m in MAPPING]
    got, _, _ = generate_continuous(device, meta, prompts, adapter_ids, GEN, served["eos"], 0)
    assert got == served["result"].generated_ids


def test_export_has_batch_index_and_full_batch_size_cache(served, tmp_path):
    import onnx

    qeff = served["qeff"]
    graph = onnx.load(str(qeff.onnx_path), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["batch_index"] == ["batch_size", 1]
    assert dims["past_key.0"][:3] == ["full_batch_size", 2, "ctx_len"]
    assert dims["input_ids"] == ["batch_size", "seq_len"]
    ops = Counter(n.op_type for n in graph.node)
    assert ops["ScatterND"] == 4 and ops["MatMul"] > 0  # KV written by index, 2 layers x (k, v)
    assert json.loads((qeff.onnx_path.parent / "qaic_export.json").read_text())["continuous_batching"] is True

    cmd, qpc = qeff.compile_command(compile_dir=tmp_path / "c", full_batch_size=SLOTS, num_cores=14, mxint8_kv_cache=True)
    spec = json.loads((tmp_path / "c" / "specializations.json").read_text())
    assert spec == {"specializations": [
        {"batch_size": "1", "seq_len": "4", "ctx_len": "48", "full_batch_size": "3"},
        {"batch_size": "3", "seq_len": "1", "ctx_len": "48", "full_batch_size": "3"},
    ]}
    assert f"-network-specialization-config={tmp_path / 'c' / 'specializations.json'}" in cmd
    assert f"-m={qeff.onnx_path}" in cmd and "-retained-state" in cmd and "-aic-num-cores=14" in cmd
    assert f"-custom-IO-list-file={tmp_path / 'c' / 'custom_io.yaml'}" in cmd
    assert "Precision: mxint8" in (tmp_path / "c" / "custom_io.yaml").read_text()
    default_cmd, default_qpc = qeff.compile_command(full_batch_size=SLOTS)
    assert default_qpc.parent.name.endswith("-fbs3")


def test_full_batch_size_larger_than_the_export(served):
    with pytest.raises(ExportConfigError, match=r"full_batch_size=4\) is larger than the full_batch_size=3"):
        served["qeff"].generate(served["tok"], PROMPTS, MAPPING, generation_len=2, runtime="onnxruntime", full_batch_size=4)


def test_mapping_naming_an_unloaded_adapter(served):
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(served["model"], continuous_batching=True)
    for name, path in served["paths"].items():
        qeff.load_adapter(path, name)
    qeff.unload_adapter("chat")
    with pytest.raises(AdapterMappingError, match=r"unknown adapter\(s\) \['chat'\]"):
        qeff.generate(served["tok"], PROMPTS, MAPPING, generation_len=2, runtime="onnxruntime", full_batch_size=SLOTS)


def test_full_batch_size_needs_continuous_batching_and_vice_versa(served):
    static = QEffAutoLoraModelForCausalLM.from_pretrained(served["model"])
    with pytest.raises(ExportConfigError, match="continuous_batching=True"):
        static.export(full_batch_size=2)
    with pytest.raises(ExportConfigError, match="continuous_batching=True"):
        static.generate(prompt_token_ids=[[1, 5]], runtime="onnxruntime", full_batch_size=2)
    cb = QEffAutoLoraModelForCausalLM.from_pretrained(served["model"], continuous_batching=True)
    with pytest.raises(ExportConfigError, match="needs full_batch_size"):
        cb.export()
    with pytest.raises(ExportConfigError, match="needs full_batch_size"):
        cb.compile_command()
    with pytest.raises(ExportConfigError, match="full_batch_size must be a positive integer"):
        cb.generate(prompt_token_ids=[[1, 5]], runtime="onnxruntime", full_batch_size=0)


@pytest.mark.parametrize("continuous_batching", [False, True])
def test_padding_that_wraps_around_the_cache_leaves_it_intact(served, tmp_path, continuous_batching):
    """ctx_len 12, prefill chunks of 8: the last chunk of a 10-token prompt has 6 padding tokens whose
    write slots wrap onto the prompt's first positions; they must write back what is there."""
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(served["model"], continuous_batching=continuous_batching)
    for name, path in served["paths"].items():
        qeff.load_adapter(path, name)
    shape = {"full_batch_size": 2} if continuous_batching else {"batch_size": 2}
    qeff.export(tmp_path, prefill_seq_len=8, ctx_len=12, **shape)
    prompts = [[1, *range(10, 19)], [1, 20, 21], [1, *range(30, 38)]]
    mapping = ["gsm8k", "code", "base"]
    res = qeff.generate(prompt_token_ids=prompts, prompt_to_adapter_mapping=mapping, generation_len=3,
                        runtime="onnxruntime", return_logits=True)
    oracle = served["oracle"]
    for prompt, adapter, gen, got in zip(prompts, mapping, res.generated_ids, res.logits):
        full = torch.tensor([prompt + gen])
        ref = _with_adapter(oracle, adapter, oracle, full).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(gen)]
        assert ref.argmax(-1).tolist() == gen
        assert float(np.abs(ref.numpy() - got).max()) <= TOL, adapter


def test_compile_with_full_batch_size_runs_the_sdk_binary(served, monkeypatch, tmp_path):
    fake = tmp_path / "qaic-exec"
    log = tmp_path / "args.txt"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {log}\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PEFT_KERNEL_QAIC_EXEC", str(fake))
    qeff = served["qeff"]
    qpc = qeff.compile(compile_dir=tmp_path / "c", num_cores=4, full_batch_size=SLOTS)
    args = log.read_text().split()
    assert args[0] == f"-m={qeff.onnx_path}" and f"-aic-binary-dir={qpc}" in args and "-retained-state" in args
    spec = json.loads((tmp_path / "c" / "specializations.json").read_text())["specializations"]
    assert [(s["batch_size"], s["seq_len"], s["full_batch_size"]) for s in spec] == [("1", "4", "3"), ("3", "1", "3")]
    with pytest.raises(ExportConfigError, match="larger than the full_batch_size=3"):
        qeff.generate(served["tok"], PROMPTS, MAPPING, runtime="ai100", full_batch_size=4)


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_other_architectures_serve_continuously(arch, tmp_path, tokenizer):
    """Mistral (sliding window 12, exceeded) and Qwen3 (q/k norms): 4 prompts through 2 slots equal HF PEFT."""
    model = tiny_model(arch)
    paths = save_hf_adapters(model, tmp_path / "adapters")
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model, continuous_batching=True)
    for name, path in paths.items():
        qeff.load_adapter(path, name)
    qeff.export(tmp_path / "export", prefill_seq_len=4, ctx_len=40, full_batch_size=2)
    prompts, mapping = PROMPTS[:4], ["code", "chat", "base", "gsm8k"]
    res = qeff.generate(tokenizer, prompts, mapping, generation_len=6, runtime="onnxruntime", return_logits=True)
    oracle = hf_peft_model(model, paths)
    for prompt, adapter, gen, got in zip(prompts, mapping, res.generated_ids, res.logits):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        full = torch.cat([ids, torch.tensor([gen])], dim=1)
        ref = _with_adapter(oracle, adapter, oracle, full).logits[0, ids.shape[1] - 1 : ids.shape[1] - 1 + len(gen)]
        assert ref.argmax(-1).tolist() == gen, (arch, adapter)
        assert float(np.abs(ref.numpy() - got).max()) <= TOL, (arch, adapter)
