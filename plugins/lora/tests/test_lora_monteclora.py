"""MonteCLoRA (``LoraConfig.monteclora_config``) against HF ``peft``: the conformance suite (eval
forward, keys, saved adapters both ways, merge, counts), the sampler's state at creation, the
refused training forward, bad configs."""

from __future__ import annotations

import pytest
import torch

import peft_kernel as pk
from peft_kernel.plugin_api import UnsupportedFeatureError
from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_testing.hf_oracle import max_abs_diff, run
from peft_kernel_testing.models import make_inputs, make_model

peft = pytest.importorskip("peft")


def lora(**kwargs):
    return lambda: pk.LoraConfig(**{"r": 4, "lora_alpha": 8, **kwargs})


CASES = [
    ConformanceCase("mlp", lora(target_modules=["lin0", "lin1"], monteclora_config=pk.MontecloraConfig(num_samples=3)),
                    id="mlp-monteclora"),
    ConformanceCase("llama", lora(target_modules=["q_proj", "v_proj"], monteclora_config=pk.MontecloraConfig()),
                    id="llama-monteclora"),
    ConformanceCase("gpt2", lora(target_modules=["c_attn"], fan_in_fan_out=True,
                                 monteclora_config=pk.MontecloraConfig(num_samples=2, use_entropy=True)),
                    id="gpt2-monteclora"),
]



class TestMontecloraConformance(conformance_suite(CASES)):
    def test_only_adapter_parameters_train(self, case: ConformanceCase) -> None:
        """Training is not implemented: a training-mode forward raises (never trains as plain LoRA)."""
        model = pk.get_peft_model(case.make_model(), case.config()).train()
        with pytest.raises(UnsupportedFeatureError, match="MonteCLoRA"):
            model(**case.make_inputs())


def build(lib, **monte):
    module = peft if lib == "hf" else pk
    config = module.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               monteclora_config=module.MontecloraConfig(**monte))
    model = make_model("llama")
    torch.manual_seed(5)
    return module.get_peft_model(model, config)


def test_sampler_state_at_creation_equals_hf():
    """HF's keys, shapes, trainable tensors and initial values: the first layer's draws equal HF's
    from the same random state (HF's sampler draws more at creation, so later layers differ)."""
    ours, hf = build("ours", num_samples=3), build("hf", num_samples=3)
    mine, theirs = ours.state_dict(), hf.state_dict()
    assert sorted(mine) == sorted(theirs)
    assert all(mine[k].shape == v.shape for k, v in theirs.items())
    first = [k for k in theirs if ".layers.0.self_attn.q_proj." in k]
    assert len(first) == 7 and all(torch.equal(mine[k], theirs[k]) for k in first)
    for key, value in mine.items():
        if key.endswith("_prior") and "gaussian" not in key:
            assert 0 <= value.min() and value.max() < 1, key
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in hf.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_monteclora_sampler.default.std_prior") for n in trainable)


def test_eval_is_plain_lora_and_training_forward_is_refused():
    model = build("ours")
    plain = pk.get_peft_model(make_model("llama"), pk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    plain.load_state_dict(model.state_dict(), strict=False)
    x = make_inputs("llama")
    assert max_abs_diff(run(model.eval(), x), run(plain.eval(), x)) == 0.0
    model.train()
    with pytest.raises(UnsupportedFeatureError, match="MonteCLoRA.*model.eval"):
        model(**x)
    with model.disable_adapter():  # no MonteCLoRA adapter active: trains as the base model
        model(**x)


def test_bad_configs_raise_named_errors_like_hf():
    for bad in ({"num_samples": 0}, {"dirichlet_prior": 0.0}, {"buffer_size": -1}):
        field = next(iter(bad))
        with pytest.raises(pk.ConfigError, match=field):
            pk.MontecloraConfig(**bad)
        with pytest.raises(ValueError, match=field):
            peft.MontecloraConfig(**bad)
    for bad in ({"num_samples": 1.5}, {"kl_loss_weight": -1.0}, {"sample_scaler": float("nan")}, {"use_entropy": 1}):
        with pytest.raises(pk.ConfigError, match=next(iter(bad))):  # HF PEFT accepts these
            pk.MontecloraConfig(**bad)
    with pytest.raises(pk.ConfigError, match="unknown keys.*'samples'"):
        pk.LoraConfig(monteclora_config={"samples": 2})
    for other in ({"use_dora": True}, {"velora_config": pk.VeloraConfig()}):
        with pytest.raises(pk.ConfigError, match=next(iter(other))):
            pk.LoraConfig(monteclora_config=pk.MontecloraConfig(), **other)
    for kind, target in (("conv2d", "conv0"), ("embedding", "emb")):
        with pytest.raises(UnsupportedFeatureError, match="MonteCLoRA supports nn.Linear"):
            pk.get_peft_model(make_model(kind), pk.LoraConfig(target_modules=[target], monteclora_config=pk.MontecloraConfig()))


def test_config_round_trip_equals_hf():
    ours = pk.LoraConfig(monteclora_config=pk.MontecloraConfig(num_samples=4, use_entropy=True))
    hf = peft.LoraConfig(monteclora_config=peft.MontecloraConfig(num_samples=4, use_entropy=True))
    assert ours.to_dict()["monteclora_config"] == hf.to_dict()["monteclora_config"]
    assert pk.PeftConfig.from_dict(ours.to_dict()).monteclora_config == ours.monteclora_config
