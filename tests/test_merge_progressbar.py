"""``merge_and_unload(progressbar=True)`` shows a tqdm bar (on stderr), labelled as HF PEFT's, for
plain and mixed models; without the flag nothing is printed."""

from __future__ import annotations

import pytest

import peft_kernel as pk
from peft_kernel_testing import make_inputs, make_model
from peft_kernel_testing.hf_oracle import hf_oracle

peft = pytest.importorskip("peft")

LABEL = "Unloading and merging model"


@pytest.mark.parametrize("mixed", [False, True])
def test_merge_and_unload_progressbar(capsys, mixed):
    def build(lib):
        model = lib.get_peft_model(make_model("mlp"), lib.LoraConfig(target_modules=["lin0", "lin1"]), mixed=mixed)
        if mixed:
            model.add_adapter("b", lib.LoHaConfig(target_modules=["lin1"]))
            model.set_adapter(["default", "b"])
        return model

    with hf_oracle():
        build(peft).merge_and_unload(progressbar=True)
    assert LABEL in capsys.readouterr().err  # HF's bar, the label we copy
    build(pk).merge_and_unload()
    assert capsys.readouterr().err == ""
    merged = build(pk).merge_and_unload(progressbar=True)
    err = capsys.readouterr().err
    assert LABEL in err and ("3/3" if mixed else "2/2") in err  # one step per adapter layer
    assert not any(hasattr(m, "base_layer") for m in merged.modules())
    merged(**make_inputs("mlp"))
