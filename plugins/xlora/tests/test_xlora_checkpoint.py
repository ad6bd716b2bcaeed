"""X-LoRA checkpoints in HF PEFT's layout: ``adapter_config.json`` (XLORA), the classifier under
``base_model.internal_xlora_classifier.*`` at the root and each expert as a plain LoRA adapter in a
sub-folder named by its position. They cross-load both ways with HF PEFT; the experts themselves are
read from the paths in ``adapters``, as HF PEFT 0.21.2 does.

HF PEFT 0.21.2's own ``save_pretrained`` of an X-LoRA model drops and renames keys (the experts are
named ``"0"``, ``"1"``..., and removing ``.0`` / ``.1`` from every key of that adapter mangles
``layers.0.weight``): its own ``from_pretrained`` then runs a different classifier. We refuse such
a checkpoint, naming the missing keys, instead of running half-random weights."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from xlora_support import CLASSIFIER_PREFIX, IDS, classifier_state, hf_twin, llama, logits, ours, save_hf_layout

from peft_kernel import PeftModel
from peft_kernel.errors import CheckpointError
from peft_kernel_testing import max_abs_diff
from peft_kernel_testing.generation import check_generate_matches_greedy
from peft_kernel_testing.hf_oracle import hf_oracle

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")
TOL = 1e-5


def _hf_from_pretrained(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(llama(use_cache=False), str(folder)).eval()


def test_our_checkpoint_has_hfs_layout_and_round_trips(experts, tmp_path):
    model = ours(experts, layerwise_scalings=True)
    model.save_pretrained(tmp_path)
    root = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(root) == sorted(classifier_state(model))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "XLORA" and config["adapters"] == experts and config["layerwise_scalings"]
    for name, source in experts.items():
        saved, original = load_file(tmp_path / name / "adapter_model.safetensors"), load_file(f"{source}/adapter_model.safetensors")
        assert sorted(saved) == sorted(original) and all(torch.equal(saved[k], original[k]) for k in saved)
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model.save_pretrained(tmp_path / "from_state_dict", state_dict=model.state_dict())  # the Trainer's FSDP route
    for name in ["", *experts]:
        again, first = (load_file(tmp_path / "from_state_dict" / name / "adapter_model.safetensors"),
                        load_file(tmp_path / name / "adapter_model.safetensors"))
        assert sorted(again) == sorted(first) and all(torch.equal(again[k], first[k]) for k in first)
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    assert max_abs_diff(logits(loaded), logits(model)) == 0
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(llama(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if "internal_xlora_classifier" in n}


@pytest.mark.parametrize("options", [{}, {"layerwise_scalings": True, "top_k_lora": 2, "xlora_depth": 1}])
def test_hf_loads_ours(experts, tmp_path, options):
    model = ours(experts, seed=7, **options)
    model.save_pretrained(tmp_path)
    hf = _hf_from_pretrained(tmp_path)
    assert max_abs_diff(logits(hf), logits(model)) <= TOL


@pytest.mark.parametrize("options", [{}, {"layerwise_scalings": True, "enable_softmax_topk": True, "top_k_lora": 2,
                                          "enable_softmax": False}])
def test_we_load_hfs_model(experts, tmp_path, options):
    """HF's in-memory X-LoRA model written in the layout its save_pretrained means to write."""
    template = ours(experts, seed=11, **options)
    with hf_oracle("HF peft building X-LoRA"):
        hf = hf_twin(peft, experts, template, **options)
        expected = logits(hf)
        with torch.no_grad():
            hf_tokens = hf.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)
    save_hf_layout(hf, tmp_path)
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    assert max_abs_diff(logits(loaded), expected) <= TOL
    assert torch.equal(check_generate_matches_greedy(loaded, IDS, max_new_tokens=4), hf_tokens)


def test_hfs_own_save_pretrained_loses_classifier_keys_and_we_refuse_it(experts, tmp_path):
    template = ours(experts, seed=13)
    with hf_oracle("HF peft saving X-LoRA"):
        hf = hf_twin(peft, experts, template)
        hf.save_pretrained(tmp_path)
        saved = load_file(tmp_path / "adapter_model.safetensors")
        reloaded = _hf_from_pretrained(tmp_path)
    assert f"{CLASSIFIER_PREFIX}layers.0.weight" not in saved  # HF's bug: dropped
    assert max_abs_diff(logits(reloaded), logits(hf)) > 1e-3  # so HF's own reload runs another classifier
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing keys \['base_model.internal_xlora_classifier.layers.0.bias'"):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_loading_with_a_missing_expert_or_a_wrong_classifier_leaves_the_model_alone(experts, tmp_path):
    model = ours(experts)
    model.save_pretrained(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "adapter_config.json").write_text(json.dumps({**config, "adapters": {
        **experts, "3": str(tmp_path / "nowhere")}}))
    (tmp_path / "gone" / "adapter_model.safetensors").write_bytes((tmp_path / "good" / "adapter_model.safetensors").read_bytes())
    (tmp_path / "deeper").mkdir()
    (tmp_path / "deeper" / "adapter_config.json").write_text(json.dumps({**config, "xlora_depth": 3}))
    (tmp_path / "deeper" / "adapter_model.safetensors").write_bytes((tmp_path / "good" / "adapter_model.safetensors").read_bytes())
    base = llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"adapters\['3'\]"):
        PeftModel.from_pretrained(base, tmp_path / "gone")
    with pytest.raises(CheckpointError, match="does not fit the classifier"):
        PeftModel.from_pretrained(base, tmp_path / "deeper")
    assert not any("lora" in n for n, _ in base.named_modules())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_experts_moved_elsewhere_load_through_a_config_with_their_new_paths(experts, tmp_path):
    """HF PEFT's docs say to pass the new ``adapters`` to ``from_pretrained``; HF 0.21.2 silently
    ignores that keyword (and we refuse unknown keywords): the config names the new paths instead."""
    import shutil

    from peft_kernel import PeftConfig

    model = ours(experts, seed=17)
    model.save_pretrained(tmp_path / "xlora")
    moved = {key: shutil.copytree(path, tmp_path / "moved" / key) for key, path in experts.items()}
    config = PeftConfig.from_pretrained(tmp_path / "xlora")
    config.adapters = {key: str(path) for key, path in moved.items()}
    loaded = PeftModel.from_pretrained(llama(), tmp_path / "xlora", config=config)
    assert max_abs_diff(logits(loaded), logits(model)) == 0
    assert loaded.peft_config["default"].adapters == config.adapters
    with pytest.raises(TypeError, match="adapters"):
        PeftModel.from_pretrained(llama(), tmp_path / "xlora", adapters=config.adapters)


def test_experts_keep_their_classifier_outputs_when_the_keys_are_not_sorted(experts, tmp_path):
    """``adapter_config.json`` is written with sorted keys; the experts take the sorted order from the
    start, so a reloaded model is the same model."""
    unsorted = {"zeta": experts["0"], "alpha": experts["2"], "mid": experts["1"]}
    model = ours(unsorted, seed=19)
    model.save_pretrained(tmp_path)
    assert list(json.loads((tmp_path / "adapter_config.json").read_text())["adapters"]) == ["alpha", "mid", "zeta"]
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    assert max_abs_diff(logits(loaded), logits(model)) == 0
    assert [loaded.peft_config[n].r for n in ("0", "1", "2")] == [4, 3, 2]  # alpha, mid, zeta
