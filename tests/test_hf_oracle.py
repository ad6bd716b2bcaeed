"""peft_kernel_testing.hf_oracle tells HF peft's own failures (xfail, with its message) from ours (red)."""

from __future__ import annotations

import pytest
import torch

from peft_kernel_testing import make_model
from peft_kernel_testing.hf_oracle import hf_oracle, raised_by_oracle

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")


def _hf_raises() -> None:
    peft.get_peft_model(make_model("mlp"), peft.LoraConfig(target_modules=["no_such_module"]))


def test_an_error_hf_peft_raises_is_the_oracles_and_xfails_with_its_message():
    with pytest.raises(pytest.xfail.Exception, match=r"oracle failure \(peft .*transformers .*\): building: "
                                                     r"HF peft raised \w*Error: .*no_such_module.*\[at peft\."):
        with hf_oracle("building"):
            _hf_raises()


def test_our_errors_and_failed_assertions_propagate():
    from peft_kernel import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match="no_such_module") as info:
        with hf_oracle():
            get_peft_model(make_model("mlp"), LoraConfig(target_modules=["no_such_module"]))
    assert not raised_by_oracle(info.value)
    with pytest.raises(AssertionError):
        with hf_oracle():
            assert torch.equal(torch.zeros(1), torch.ones(1))


def test_a_library_error_belongs_to_whoever_called_the_library():
    """transformers (or torch) raising under HF peft is the oracle's; under our model it is ours."""
    from peft_kernel import PeftModel, get_peft_model
    from peft_kernel_lora import LoraConfig

    bad = {"input_ids": torch.tensor([[1, 2, 99]])}  # out of the vocabulary: the embedding raises
    hf = peft.get_peft_model(make_model("llama"), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(pytest.xfail.Exception, match="HF peft raised IndexError"):
        with hf_oracle("forward"):
            hf(**bad)
    ours = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"]))
    assert isinstance(ours, PeftModel)
    with pytest.raises(IndexError):
        with hf_oracle("forward"):
            ours(**bad)


def test_hf_failing_on_our_files_is_ours_unless_it_fails_on_its_own_too():
    from peft_kernel_testing.hf_oracle import hf_reads_ours

    def fine():
        return peft.get_peft_model(make_model("mlp"), peft.LoraConfig(target_modules=["lin0"]))

    with pytest.raises(Exception, match="no_such_module") as info:
        hf_reads_ours("HF reading ours", _hf_raises, control=fine)
    assert raised_by_oracle(info.value)  # HF raised, but HF works on its own adapter: our files are at fault
    with pytest.raises(pytest.xfail.Exception, match="HF reading ours .HF peft fails on its own adapter too."):
        hf_reads_ours("HF reading ours", _hf_raises, control=_hf_raises)
    def ours_wrong():
        raise AssertionError("ours")

    with pytest.raises(AssertionError, match="ours"):
        hf_reads_ours("HF reading ours", ours_wrong, control=_hf_raises)
    assert hf_reads_ours("HF reading ours", lambda: 3, control=_hf_raises) == 3
