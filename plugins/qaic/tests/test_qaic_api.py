"""Registration, compile command line, bad inputs, apply_peft -- no numerics oracle needed."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
import torch
from qaic_testing import save_hf_adapters, tiny_model

from peft_kernel_qaic import QEffAutoLoraModelForCausalLM, QEffAutoPeftModelForCausalLM
from peft_kernel_qaic.compiler import build_compile_command
from peft_kernel_qaic.errors import (
    AdapterLoadError,
    AdapterMappingError,
    AdapterSlotError,
    ExportConfigError,
    PromptTooLongError,
    SDKNotFoundError,
)


# ---- registration -----------------------------------------------------------------------------
def test_backend_registered_and_classes_resolve_lazily():
    import peft_kernel
    from peft_kernel.plugins import get_registry

    record = get_registry().backends["qaic"]
    assert record.distribution == "peft-kernel-qaic"
    assert peft_kernel.QEffAutoLoraModelForCausalLM is QEffAutoLoraModelForCausalLM
    assert peft_kernel.QEffAutoPeftModelForCausalLM is QEffAutoPeftModelForCausalLM
    from peft_kernel_qaic.finetune import apply_peft

    assert peft_kernel.apply_peft is apply_peft


def test_entry_module_imports_no_torch_or_onnx():
    code = "import sys, peft_kernel_qaic.plugin, peft_kernel_qaic; print(sorted(m for m in ('torch','onnx','onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- compile ----------------------------------------------------------------------------------
def test_compile_command_line():
    cmd = build_compile_command(
        "/x/model.onnx", "/x/qpc", "/x/specializations.json", "/x/custom_io.yaml", num_cores=14, mxfp6_matmul=True,
        mos=1, aic_enable_depth_first=True, qaic_exec="/opt/qti-aic/exec/qaic-exec",
    )
    assert cmd[0] == "/opt/qti-aic/exec/qaic-exec"
    for flag in (
        "-m=/x/model.onnx", "-aic-hw", "-aic-hw-version=2.0", "-retained-state", "-convert-to-fp16",
        "-aic-num-cores=14", "-network-specialization-config=/x/specializations.json",
        "-custom-IO-list-file=/x/custom_io.yaml", "-aic-binary-dir=/x/qpc", "-mxfp6-matmul", "-mos=1",
        "-aic-enable-depth-first", "-compile-only",
    ):
        assert flag in cmd, flag
    plain = build_compile_command("m.onnx", "q", "s.json", convert_to_fp16=False)
    assert "-convert-to-fp16" not in plain and not any(a.startswith("-custom-IO") for a in plain)
    with pytest.raises(ExportConfigError, match="num_cores"):
        build_compile_command("m.onnx", "q", "s.json", num_cores=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qaic-api")
    model = tiny_model("llama")
    paths = save_hf_adapters(model, folder / "adapters")
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model)
    for name, path in paths.items():
        qeff.load_adapter(path, name)
    qeff.export(folder / "export", batch_size=2, prefill_seq_len=4, ctx_len=16)
    return dict(folder=folder, model=model, paths=paths, qeff=qeff)


def test_export_side_files(small):
    qeff = small["qeff"]
    folder = qeff.onnx_path.parent
    spec = json.loads((folder / "specializations.json").read_text())
    assert spec == {"specializations": [
        {"batch_size": "2", "seq_len": "4", "ctx_len": "16"},
        {"batch_size": "2", "seq_len": "1", "ctx_len": "16"},
    ]}
    custom = (folder / "custom_io.yaml").read_text()
    assert "- IOName: past_key.0\n  Precision: float16" in custom
    assert "- IOName: past_value.1_RetainedState\n  Precision: float16" in custom
    meta = json.loads((folder / "qaic_export.json").read_text())
    assert meta["adapter_slots"] == ["base", "gsm8k", "code", "chat"]
    # rank padding: q_proj has ranks 4 (gsm8k), 8 (code) -> padded to 8; down_proj 2 (code), 2 (chat)
    assert meta["lora_modules"]["model.layers.0.self_attn.q_proj"] == 8
    assert meta["lora_modules"]["model.layers.1.mlp.down_proj"] == 2

    import onnx

    graph = onnx.load(str(qeff.onnx_path), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    dims = [d.dim_param or d.dim_value for d in inputs["lora_ids"].type.tensor_type.shape.dim]
    assert dims == ["batch_size", 1]
    assert {o.name for o in graph.output} >= {"logits", "past_key.0_RetainedState", "past_value.1_RetainedState"}


def test_stacked_slot_zero_is_zero_and_padding_exact(small):
    from peft_kernel_qaic.adapters import stack_adapters, supported_linears

    qeff = small["qeff"]
    stacks = stack_adapters(qeff._slots(), supported_linears(qeff.model))
    a, b = stacks["model.layers.0.self_attn.q_proj"]
    assert a.shape == (4, 32, 8) and b.shape == (4, 8, 32)
    assert a[0].abs().sum() == 0 and b[0].abs().sum() == 0  # base
    assert a[1, :, 4:].abs().sum() == 0 and b[1, 4:].abs().sum() == 0  # gsm8k rank 4 padded to 8
    assert a[3].abs().sum() == 0  # chat does not target q_proj


def test_adapters_are_read_through_the_kernel_and_leave_the_base_model_alone(small, tmp_path):
    # the backend imports nothing of the LoRA plugin: adapters come through PeftModel + low_rank_factors
    from pathlib import Path

    import peft_kernel_qaic

    src = Path(peft_kernel_qaic.__file__).parent
    assert [f.name for f in src.rglob("*.py") if "peft_kernel_lora" in f.read_text()] == []
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    before = {n: (type(m), tuple(m._modules)) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    qeff = QEffAutoLoraModelForCausalLM(model)
    qeff.load_adapter(small["paths"]["code"], "code")
    with pytest.raises(AdapterLoadError, match="lm_head"):  # a failed load leaves it alone too
        head = save_hf_adapters(model, tmp_path, specs={"head": dict(r=2, target_modules=["lm_head"])})["head"]
        qeff.load_adapter(head, "head")
    assert {n: (type(m), tuple(m._modules)) for n, m in model.named_modules()} == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert qeff.adapters["code"].ranks["model.layers.0.mlp.down_proj"] == 2  # rank_pattern honoured


def test_compile_without_sdk_says_what_is_missing(small, monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_KERNEL_QAIC_EXEC", str(tmp_path / "no-such-qaic-exec"))
    with pytest.raises(SDKNotFoundError, match="onnxruntime") as err:
        small["qeff"].compile(num_cores=16, batch_size=2, prefill_seq_len=4, ctx_len=16)
    assert "qaic-exec" in str(err.value)
    with pytest.raises(SDKNotFoundError, match="onnxruntime"):
        small["qeff"].generate(prompt_token_ids=[[1, 5]], runtime="ai100")


def test_compile_runs_the_sdk_binary_when_present(small, monkeypatch, tmp_path):
    fake = tmp_path / "qaic-exec"
    log = tmp_path / "args.txt"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {log}\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PEFT_KERNEL_QAIC_EXEC", str(fake))
    qpc = small["qeff"].compile(compile_dir=tmp_path / "c", num_cores=4, batch_size=2, prefill_seq_len=4, ctx_len=16)
    args = log.read_text()
    assert f"-aic-binary-dir={qpc}" in args and "-aic-num-cores=4" in args
    assert f"-m={small['qeff'].onnx_path}" in args
    assert (tmp_path / "c" / "specializations.json").is_file() and (tmp_path / "c" / "custom_io.yaml").is_file()


def test_multi_device_compile_writes_partition_config(small, tmp_path):
    cmd, _ = small["qeff"].compile_command(compile_dir=tmp_path / "mdp", num_devices=2, num_cores=16)
    mdp = tmp_path / "mdp" / "mdp_config.json"
    assert f"-mdp-load-partition-config={mdp}" in cmd
    assert len(json.loads(mdp.read_text())["partitions"][0]["devices"]) == 2


# ---- bad input --------------------------------------------------------------------------------
def test_unknown_adapter_in_mapping(small):
    with pytest.raises(AdapterMappingError, match=r"unknown adapter\(s\) \['nope'\]"):
        small["qeff"].generate(prompt_token_ids=[[1, 5], [1, 6]], prompt_to_adapter_mapping=["gsm8k", "nope"], runtime="onnxruntime")


def test_mapping_length_mismatch(small):
    with pytest.raises(AdapterMappingError, match="2 entries but there are 3 prompts"):
        small["qeff"].generate(prompt_token_ids=[[1], [1], [1]], prompt_to_adapter_mapping=["base", "code"], runtime="onnxruntime")


def test_prompt_longer_than_context(small):
    with pytest.raises(PromptTooLongError, match="ctx_len=16"):
        small["qeff"].generate(prompt_token_ids=[[1] * 17], runtime="onnxruntime")
    with pytest.raises(PromptTooLongError, match="at most 7 tokens"):
        small["qeff"].generate(prompt_token_ids=[[1] * 10], generation_len=8, runtime="onnxruntime")


def test_long_prompt_uses_chunked_prefill(small):
    # 11 tokens with prefill_seq_len=4: three chunks; equals the PyTorch model
    prompt = [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    res = small["qeff"].generate(prompt_token_ids=[prompt], generation_len=1, runtime="onnxruntime", return_logits=True)
    with torch.no_grad():
        ref = small["model"](torch.tensor([prompt])).logits[0, -1].numpy()
    assert abs(ref - res.logits[0][0]).max() < 1e-4


def test_more_adapters_than_slots(small):
    qeff = QEffAutoLoraModelForCausalLM(small["model"], max_num_adapters=2)
    qeff.load_adapter(small["paths"]["gsm8k"], "gsm8k")
    qeff.load_adapter(small["paths"]["code"], "code")
    with pytest.raises(AdapterSlotError, match="2 adapter slot"):
        qeff.load_adapter(small["paths"]["chat"], "chat")
    assert qeff.num_slots == 3


def test_reserved_and_duplicate_names(small):
    qeff = QEffAutoLoraModelForCausalLM(small["model"])
    with pytest.raises(AdapterLoadError, match="reserved"):
        qeff.load_adapter(small["paths"]["gsm8k"], "base")
    qeff.load_adapter(small["paths"]["gsm8k"], "g")
    with pytest.raises(AdapterLoadError, match="already loaded"):
        qeff.load_adapter(small["paths"]["code"], "g")


def test_adapter_for_another_base_model(tmp_path, small):
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    path = save_hf_adapters(other, tmp_path, specs={"wide": dict(r=4, target_modules=["q_proj"])})["wide"]
    with pytest.raises(AdapterLoadError, match="another base model"):
        QEffAutoLoraModelForCausalLM(small["model"]).load_adapter(path, "wide")


def test_non_lora_adapter(tmp_path, small):
    from peft import IA3Config, get_peft_model

    import copy

    ia3 = get_peft_model(copy.deepcopy(small["model"]), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(AdapterLoadError, match="not LoRA"):
        QEffAutoLoraModelForCausalLM(small["model"]).load_adapter(tmp_path / "ia3", "ia3")


def test_unsupported_lora_features(tmp_path, small):
    dora = save_hf_adapters(small["model"], tmp_path, specs={"dora": dict(r=2, target_modules=["q_proj"], use_dora=True)})["dora"]
    with pytest.raises(AdapterLoadError, match="use_dora"):
        QEffAutoLoraModelForCausalLM(small["model"]).load_adapter(dora, "dora")
    kasa = save_hf_adapters(small["model"], tmp_path, specs={"kasa": dict(r=2, target_modules=["q_proj"],
                                                                          kasa_config={"beta": 1e-4, "gamma": 1e-3})})["kasa"]
    with pytest.raises(AdapterLoadError, match="kasa_config"):
        QEffAutoLoraModelForCausalLM(small["model"]).load_adapter(kasa, "kasa")
    head = save_hf_adapters(small["model"], tmp_path, specs={"head": dict(r=2, target_modules=["lm_head"])})["head"]
    with pytest.raises(AdapterLoadError, match="lm_head"):
        QEffAutoLoraModelForCausalLM(small["model"]).load_adapter(head, "head")


def test_missing_adapter_folder(small, tmp_path):
    with pytest.raises(AdapterLoadError, match="cannot load adapter"):
        QEffAutoLoraModelForCausalLM(small["model"]).load_adapter(tmp_path / "missing", "m")


def test_unsupported_architecture():
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ExportConfigError, match="gpt2"):
        QEffAutoLoraModelForCausalLM(gpt2)


# ---- apply_peft -------------------------------------------------------------------------------
def test_apply_peft_defaults_and_disabled():
    from types import SimpleNamespace

    from peft_kernel_qaic import apply_peft

    model = tiny_model("llama")
    assert apply_peft(model, SimpleNamespace(use_peft=False)) is model
    peft_model = apply_peft(tiny_model("llama"), SimpleNamespace(use_peft=True, from_peft_checkpoint=None, peft_config_file=None))
    cfg = peft_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, sorted(cfg.target_modules)) == (8, 32, 0.05, ["q_proj", "v_proj"])
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_apply_peft_from_config_file(tmp_path, suffix):
    from peft_kernel_qaic import apply_peft

    settings = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "gate_proj"], "lora_dropout": 0.0}
    path = tmp_path / f"peft{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(settings))
    else:
        import yaml

        path.write_text(yaml.safe_dump(settings))
    peft_model = apply_peft(tiny_model("llama"), {"use_peft": True, "peft_config_file": str(path)})
    cfg = peft_model.peft_config["default"]
    assert cfg.r == 4 and sorted(cfg.target_modules) == ["gate_proj", "k_proj", "q_proj"]


def test_apply_peft_resumes_from_checkpoint(tmp_path):
    from peft_kernel_qaic import apply_peft

    path = save_hf_adapters(tiny_model("llama"), tmp_path, specs={"ck": dict(r=2, target_modules=["v_proj"])})["ck"]
    peft_model = apply_peft(tiny_model("llama"), {"use_peft": True, "from_peft_checkpoint": str(path)})
    assert peft_model.peft_config["default"].r == 2
    assert any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)
    # and the resumed adapter exports: the swap class reads it from the live model
    assert set(QEffAutoPeftModelForCausalLM(peft_model).adapter_weights) == {"default"}


def test_device_style_loop_with_retained_state(small):
    """A session that keeps the KV cache itself (as the card does) gives the same tokens and logits."""
    import numpy as np

    from peft_kernel_qaic.export import read_meta
    from peft_kernel_qaic.runtime import generate_tokens, ort_session

    qeff = small["qeff"]
    meta = read_meta(qeff.onnx_path)
    inner = ort_session(qeff.onnx_path)
    state = {}

    def device(feeds):
        assert not any(k.startswith("past_") for k in feeds)
        full = dict(feeds)
        for name in meta["kv_inputs"]:
            full[name] = state.get(name, np.full([2, *meta["kv_shape"][1:2], 16, meta["kv_shape"][3]], 7.0, np.float32))
        out = inner(full)
        for name in meta["kv_inputs"]:
            state[name] = out.pop(f"{name}_RetainedState")
        return out

    device.retains_state = True
    prompts = [[1, 10, 11, 12, 13, 14], [1, 20, 21], [1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 30]]
    ids = [1, 0, 2, 3]
    got = generate_tokens(device, meta, prompts, ids, 4, None, return_logits=True, options={"batch_size": 2, "prefill_seq_len": 4, "ctx_len": 16})
    ref = generate_tokens(inner, meta, prompts, ids, 4, None, return_logits=True, options={"batch_size": 2, "prefill_seq_len": 4, "ctx_len": 16})
    assert got[0] == ref[0]
    assert max(np.abs(a - b).max() for a, b in zip(got[1], ref[1])) < 1e-5


def test_from_pretrained_folder_and_swap_base_from_adapter_config(tmp_path):
    import peft_kernel

    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "base")
    qeff = peft_kernel.QEffAutoLoraModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    assert qeff.model.config.model_type == "qwen2"
    # the swap class finds the base model through adapter_config.json's base_model_name_or_path
    from peft import LoraConfig, get_peft_model

    base = tiny_model("qwen2")
    base.name_or_path = str(tmp_path / "base")  # what HF PEFT writes as base_model_name_or_path
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "ad"))
    swap = QEffAutoPeftModelForCausalLM.from_pretrained(tmp_path / "ad", "ad")
    assert swap.active_adapter == "ad" and swap.signature[0] == ("model.layers.0.self_attn.q_proj", 2)
