"""Additive non-LoRA adapters converted to LoRA, and DoRA / lora_bias / lm_head / embedding LoRA in the graph.

Oracles: HF PEFT's own ``convert_to_lora`` of the same adapter (a LoRA built from its output), HF
PEFT's LoKr / VeRA models (converted at full rank: exact), HF PEFT LoRA models with DoRA,
``lora_bias``, ``lm_head`` and ``embed_tokens`` targets -- compared through ONNX Runtime logits,
every row of mixed batches.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from qaic_testing import hf_peft_model, save_hf_adapters, tiny_model

from peft_kernel_qaic import QEffAutoLoraModelForCausalLM, QEffAutoPeftModelForCausalLM
from peft_kernel_qaic.errors import AdapterLoadError

TOL = 1e-4
PROMPTS = [[1, 10, 11, 12, 13, 14], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38], [1, 5, 6, 7]]
GEN = 4


def _save_method(model, folder, config, seed):
    """An HF PEFT adapter of any method with non-trivial weights, saved; returns (path, HF model)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    pm.save_pretrained(str(folder))
    return folder, pm.eval()


def _logits(model, prompt, generated):
    full = torch.tensor([list(prompt) + list(generated)])
    with torch.no_grad():
        out = model(full).logits[0]
    n = len(prompt)
    return out[n - 1 : n - 1 + len(generated)].numpy()


def _hf_converted(pm, model, rank):
    """HF PEFT's convert_to_lora of ``pm``'s adapter, as an HF LoRA model on a copy of ``model``."""
    from peft import convert_to_lora, get_peft_model, set_peft_model_state_dict

    config, state_dict = convert_to_lora(pm, rank)
    lora = get_peft_model(copy.deepcopy(model), config)
    set_peft_model_state_dict(lora, state_dict)
    return lora.eval(), state_dict


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from peft import LoHaConfig, LoKrConfig, VeraConfig

    folder = tmp_path_factory.mktemp("qaic-conv")
    model = tiny_model("llama")
    loha_path, loha = _save_method(model, folder / "loha", LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 1)
    lokr_path, lokr = _save_method(model, folder / "lokr", LoKrConfig(r=4, alpha=4, target_modules=["k_proj", "up_proj"]), 2)
    vera_path, vera = _save_method(model, folder / "vera", VeraConfig(r=8, target_modules=["q_proj", "v_proj"]), 3)
    lora_paths = save_hf_adapters(model, folder / "lora", specs={"lora": dict(r=2, target_modules=["o_proj"])})
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model)
    ids = {
        "loha": qeff.load_adapter(loha_path, "loha", convert_rank=4),
        "lokr": qeff.load_adapter(lokr_path, "lokr", convert_rank=1.0),  # full rank: exact
        "vera": qeff.load_adapter(vera_path, "vera", convert_rank=1.0),
        "lora": qeff.load_adapter(lora_paths["lora"], "lora"),
    }
    qeff.export(folder / "export", batch_size=3, prefill_seq_len=4, ctx_len=24)
    mapping = ["loha", "vera", "base", "lokr", "lora", "loha"]
    prompts = PROMPTS + PROMPTS[:2]
    res = qeff.generate(prompt_token_ids=prompts, prompt_to_adapter_mapping=mapping, generation_len=GEN,
                        runtime="onnxruntime", return_logits=True)
    loha_lora, loha_sd = _hf_converted(loha, model, 4)
    oracles = {"loha": loha_lora, "lokr": lokr, "vera": vera, "base": model,
               "lora": hf_peft_model(model, lora_paths)}
    return dict(model=model, qeff=qeff, ids=ids, mapping=mapping, prompts=prompts, res=res, oracles=oracles,
                loha=loha, loha_sd=loha_sd, loha_path=loha_path)


def test_converted_adapters_stack_like_lora(converted):
    assert converted["ids"] == {"loha": 1, "lokr": 2, "vera": 3, "lora": 4}
    report = converted["qeff"].conversion_report
    assert set(report) == {"loha", "lokr", "vera"}  # a LoRA is served as it is
    assert report["loha"].method == "LOHA" and report["loha"].rank == 4
    assert set(report["loha"].ranks.values()) == {4} and len(report["loha"].errors) == 6
    assert report["lokr"].worst < 1e-5 and report["vera"].worst < 1e-5  # full rank: exact
    assert "relative error" in str(report["loha"])


def test_mixed_rows_equal_hf_per_row(converted):
    # LoHa rows equal HF PEFT's own conversion of the same adapter; LoKr / VeRA rows (full rank) equal
    # HF's LoKr / VeRA models; the LoRA row and the base row are as before
    res, worst = converted["res"], {}
    for i, (prompt, name) in enumerate(zip(converted["prompts"], converted["mapping"])):
        ref = _logits(converted["oracles"][name], prompt, res.generated_ids[i])
        diff = float(np.abs(ref - res.logits[i]).max())
        worst[name] = max(worst.get(name, 0.0), diff)
        assert diff <= TOL, (i, name, diff)
        assert ref.argmax(-1).tolist() == res.generated_ids[i], (i, name)
    print(f"\nmax |ORT - HF| per adapter: {worst}")


def test_reported_error_is_that_of_hf_conversion(converted):
    # the per-layer error we report equals ||dW - BA|| / ||dW|| of HF PEFT's converted factors
    loha, sd = converted["loha"], converted["loha_sd"]
    errors = converted["qeff"].conversion_report["loha"].errors
    modules = dict(loha.named_modules())
    for module, error in errors.items():
        layer = modules[f"base_model.model.{module}"]
        delta = layer.get_delta_weight("default").detach()
        a, b = sd[f"base_model.model.{module}.lora_A.weight"], sd[f"base_model.model.{module}.lora_B.weight"]
        hf_error = float((delta - b @ a).norm() / delta.norm())
        assert abs(hf_error - error) <= 1e-4, (module, hf_error, error)
        assert 0.0 < error < 1.0


def test_converted_rows_differ_from_unconverted_by_the_truncation(converted):
    # rank 4 of a LoHa (whose delta has rank up to 16) is an approximation: the served logits are
    # HF's converted LoRA's, not the LoHa's own; at full rank they are the LoHa's
    res = converted["res"]
    i = converted["mapping"].index("loha")
    own = _logits(converted["loha"], converted["prompts"][i], res.generated_ids[i])
    assert np.abs(own - res.logits[i]).max() > 1e-3
    full = QEffAutoLoraModelForCausalLM.from_pretrained(converted["model"])
    full.load_adapter(converted["loha_path"], "loha", convert_rank=1.0)
    assert full.conversion_report["loha"].worst < 1e-5
    out = full.generate(prompt_token_ids=[converted["prompts"][i]], prompt_to_adapter_mapping=["loha"], generation_len=GEN,
                        runtime="onnxruntime", return_logits=True)
    ref = _logits(converted["loha"], converted["prompts"][i], out.generated_ids[0])
    assert np.abs(ref - out.logits[0]).max() <= TOL


def test_swap_class_serves_converted_adapter(converted, tmp_path):
    qeff = QEffAutoPeftModelForCausalLM.from_pretrained(converted["loha_path"], "loha", base_model=converted["model"],
                                                        convert_rank=4)
    assert set(qeff.conversion_report) == {"loha"}
    qeff.export(tmp_path, batch_size=1, prefill_seq_len=4, ctx_len=16)
    out = qeff.generate(prompt_token_ids=PROMPTS[:1], generation_len=3, runtime="onnxruntime", return_logits=True)
    ref = _logits(converted["oracles"]["loha"], PROMPTS[0], out.generated_ids[0])
    assert np.abs(ref - out.logits[0]).max() <= TOL


def test_live_peft_models_of_other_methods_convert(converted):
    # a live HF PEFT LoHa model (saved with its own save_pretrained, then loaded) and a live peft-kernel
    # one (read directly) give the same LoRA
    import peft_kernel

    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(converted["model"])
    qeff.load_adapter(converted["loha"], "hf", convert_rank=4)
    ours = peft_kernel.PeftModel.from_pretrained(copy.deepcopy(converted["model"]), str(converted["loha_path"]))
    qeff.load_adapter(ours, "ours", convert_rank=4)
    assert set(qeff.conversion_report) == {"hf", "ours"}
    for module, (a, b) in qeff.adapters["hf"].weights.items():
        a2, b2 = qeff.adapters["ours"].weights[module]
        assert torch.allclose(b @ a, b2 @ a2, atol=1e-5)
    swap = QEffAutoPeftModelForCausalLM(ours)
    assert set(swap.conversion_report) == {"default"} and swap.conversion_report["default"].rank == 16  # the default


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ia3", "oft"])
def test_non_additive_method_refused_naming_why(converted, tmp_path, method):
    from peft import IA3Config, OFTConfig

    config = (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]) if method == "ia3"
              else OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"]))
    path, _ = _save_method(converted["model"], tmp_path / method, config, 5)
    qeff = converted["qeff"]
    before = dict(qeff.adapter_name_to_id)
    with pytest.raises(AdapterLoadError, match=rf"'{method.upper()}' adapter.*not additive"):
        qeff.load_adapter(path, method)
    assert qeff.adapter_name_to_id == before


@pytest.mark.parametrize("rank, match", [(0, "positive"), (-2, "positive"), (1.5, "threshold"), ("8", "int"),
                                         (True, "int"), (64, "larger than the weight shape")])
def test_bad_convert_rank_named_and_nothing_loaded(converted, rank, match):
    qeff = converted["qeff"]
    before = dict(qeff.adapter_name_to_id)
    with pytest.raises(AdapterLoadError, match=match):
        qeff.load_adapter(converted["loha_path"], "loha2", convert_rank=rank)
    assert qeff.adapter_name_to_id == before and "loha2" not in qeff.conversion_report
