"""P-tuning against HF PEFT (the oracle) on tiny Llama and GPT-2 (and BERT for SEQ_CLS): the MLP and
LSTM encoders compute HF's virtual tokens from the same weights, checkpoints cross-load both ways
(HF's format: the encoder's output), mixed batches and generate, and -- beyond HF -- training
resumes exactly from a ``save_encoder=True`` checkpoint, which HF still loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peft_kernel import PeftModel, get_peft_model
from peft_kernel.errors import CheckpointError, ConfigError
from peft_kernel_testing import make_model, max_abs_diff, perturb, run
from peft_kernel_testing.generation import check_generate_matches_greedy, greedy_decode
from peft_kernel_testing.hf_oracle import check_seq_cls_cross_load, hf_oracle
from peft_kernel_p_tuning import PromptEncoderConfig

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

IDS = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 11, 12, 13], [0, 0, 21, 22, 23], [7, 7, 7, 8, 9]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
TOL = 1e-5
ENCODERS = [("llama", "MLP"), ("llama", "LSTM"), ("gpt2", "MLP"), ("gpt2", "LSTM")]


def _kw(kind: str, **kw):
    return {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "encoder_reparameterization_type": kind,
            "encoder_hidden_size": 6, **kw}


def _ours(model_kind: str, encoder: str, seed: int = 0, name: str = "default", **kw) -> PeftModel:
    model = get_peft_model(make_model(model_kind), PromptEncoderConfig(**_kw(encoder, **kw)), name)
    perturb(model.prompt_encoder, seed, scale=0.5)
    return model.eval()


def _logits(model, **inputs) -> torch.Tensor:
    return run(model, inputs)


@pytest.mark.parametrize("model_kind, encoder", ENCODERS)
def test_trainable_encoder_computes_hfs_virtual_tokens_from_the_same_weights(model_kind, encoder):
    """Not only the saved output: the MLP / LSTM reparameterisation itself equals HF's."""
    ours = _ours(model_kind, encoder)
    with hf_oracle("HF peft building a P-tuning encoder"):
        hf = peft.get_peft_model(make_model(model_kind), peft.PromptEncoderConfig(**_kw(encoder))).eval()
        assert sorted(hf.prompt_encoder["default"].state_dict()) == sorted(ours.prompt_encoder["default"].state_dict())
        hf.prompt_encoder["default"].load_state_dict(ours.prompt_encoder["default"].state_dict())
        expected = _logits(hf, input_ids=IDS, attention_mask=MASK)
    assert max_abs_diff(_logits(ours, input_ids=IDS, attention_mask=MASK), expected) <= TOL


@pytest.mark.parametrize("model_kind, encoder", ENCODERS)
def test_cross_load_both_ways(model_kind, encoder, tmp_path):
    with hf_oracle("HF peft saving a P-tuning adapter"):
        hf = peft.get_peft_model(make_model(model_kind), peft.PromptEncoderConfig(**_kw(encoder))).eval()
        perturb(hf.prompt_encoder, 1, scale=0.5)
        hf.save_pretrained(tmp_path / "hf")
        expected = _logits(hf, input_ids=IDS, attention_mask=MASK)
        hf_tokens, _ = greedy_decode(hf, IDS, MASK, max_new_tokens=4)
    ours = PeftModel.from_pretrained(make_model(model_kind), tmp_path / "hf")
    assert max_abs_diff(_logits(ours, input_ids=IDS, attention_mask=MASK), expected) <= TOL
    assert torch.equal(check_generate_matches_greedy(ours, IDS, MASK, max_new_tokens=4), hf_tokens)

    mine = _ours(model_kind, encoder, seed=2)
    mine.save_pretrained(tmp_path / "ours")
    assert list(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == ["prompt_embeddings"]
    assert "save_encoder" not in json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    with hf_oracle("HF peft loading our P-tuning adapter"):
        theirs = peft.PeftModel.from_pretrained(make_model(model_kind), tmp_path / "ours")
        got = _logits(theirs, input_ids=IDS, attention_mask=MASK)
    assert max_abs_diff(got, _logits(mine, input_ids=IDS, attention_mask=MASK)) <= TOL


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_training_resumes_exactly_from_a_save_encoder_checkpoint_which_hf_still_loads(encoder, tmp_path):
    def train(model, steps):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(steps):
            opt.zero_grad()
            model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
            opt.step()
        return model.eval()

    straight = train(_ours("llama", encoder, save_encoder=True), 4)
    first = train(_ours("llama", encoder, save_encoder=True), 2)
    first.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "prompt_embeddings" in saved and "prompt_encoder.mlp_head.0.weight" in saved
    assert json.loads((tmp_path / "adapter_config.json").read_text())["save_encoder"] is True
    resumed = train(PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True), 2)
    assert max_abs_diff(_logits(resumed, input_ids=IDS), _logits(straight, input_ids=IDS)) <= 1e-5
    with hf_oracle("HF peft loading a checkpoint with our extra encoder tensors"):
        theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path)
        got = _logits(theirs, input_ids=IDS, attention_mask=MASK)
    assert max_abs_diff(got, _logits(first, input_ids=IDS, attention_mask=MASK)) <= TOL


def test_hf_format_checkpoint_cannot_resume_training_and_says_why(tmp_path):
    _ours("llama", "MLP").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="save_encoder=True"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    model = PeftModel.from_pretrained(make_model("llama"), tmp_path)  # for inference it loads, as in HF
    assert _logits(model, input_ids=IDS).shape == (4, 8, 64)


def test_mixed_batch_rows_and_generate_equal_single_adapter_runs():
    model = _ours("llama", "MLP")
    model.add_adapter("other", PromptEncoderConfig(**_kw("LSTM")))
    perturb(model.prompt_encoder["other"], 7, scale=0.5)
    model.eval()
    names = ["default", "other", "other", "default"]
    mixed = _logits(model, input_ids=IDS, attention_mask=MASK, adapter_names=names)
    for row, name in enumerate(names):
        model.set_adapter(name)
        single = _logits(model, input_ids=IDS[row: row + 1], attention_mask=MASK[row: row + 1])
        assert max_abs_diff(mixed[row: row + 1], single) <= TOL, (row, name)
    assert max_abs_diff(mixed[0], mixed[1]) > 1e-3
    check_generate_matches_greedy(model, IDS, MASK, max_new_tokens=4, adapter_names=names)


def test_sequence_classification_with_bert_cross_loads_both_ways(tmp_path):
    check_seq_cls_cross_load(lambda: PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3, encoder_hidden_size=6),
                             lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3, encoder_hidden_size=6),
                             tmp_path,
                             saved_keys=["base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"])


def test_config_fields_and_defaults_match_hf():
    import dataclasses

    ours = PromptEncoderConfig().to_dict()
    theirs = {f.name: f.default for f in dataclasses.fields(peft.PromptEncoderConfig)}
    for name in ("encoder_hidden_size", "encoder_num_layers", "encoder_dropout", "num_virtual_tokens"):
        assert ours[name] == theirs[name], name
    assert ours["encoder_reparameterization_type"] == "MLP" and set(ours) <= set(theirs) | {"peft_version"}


@pytest.mark.parametrize("kwargs, message", [
    ({"encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type"),
    ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
    ({"encoder_num_layers": 0}, "encoder_num_layers"),
    ({"encoder_dropout": 1.5}, "encoder_dropout"),
    ({"save_encoder": "yes"}, "save_encoder"),
])
def test_bad_configs_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PromptEncoderConfig(num_virtual_tokens=3, **kwargs)


def test_mlp_with_other_layer_counts_warns_as_hf():
    with pytest.warns(UserWarning, match="encoder_num_layers` is ignored"):
        PromptEncoderConfig(num_virtual_tokens=3, encoder_num_layers=3)
