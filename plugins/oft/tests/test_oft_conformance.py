"""OFT runs the conformance suite on toy models and tiny transformers models.

Conv2d cases skip the cross-loading checks against HF peft's *unmerged* forward: HF peft 0.21.2's
Conv2d OFT forward does not compute its own merged weight (it changes the output even with an
identity rotation). ``test_oft_config.py`` checks our Conv2d against HF's merged model instead.
"""

import pytest

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_oft import OFTConfig


pytestmark = pytest.mark.filterwarnings("ignore:Invalid .*Adjusted:UserWarning")


def oft(**kwargs):
    return lambda: OFTConfig(**{"oft_block_size": 4, "r": 0, **kwargs})


CASES = [
    ConformanceCase("mlp", oft(target_modules=["lin0", "lin1", "lin2"])),
    ConformanceCase("mlp", oft(target_modules=["lin1"], r=2, oft_block_size=0, use_cayley_neumann=False), id="mlp-r-exact-cayley"),
    ConformanceCase("mlp", oft(target_modules=["lin0", "lin1"], block_share=True, coft=True, eps=1e-2,
                                modules_to_save=["lin2"]), id="mlp-coft-block-share-modules-to-save"),
    # bias="all" trains (and perturbs) the base biases, so disable/unload no longer give the base model
    ConformanceCase("mlp", oft(target_modules=["lin1"], bias="oft_only"), id="mlp-bias-oft-only",
                    changes_base_at_init=True),
    ConformanceCase("mlp", oft(target_modules="lin[01]", bias="all"), id="mlp-regex-bias-all",
                    changes_base_at_init=True),
    ConformanceCase("conv2d", oft(target_modules=["conv0", "conv1", "lin"], oft_block_size=3), hf=False),
    ConformanceCase("embedding", oft(target_modules=["emb", "lin"])),
    ConformanceCase("llama", oft(target_modules="all-linear")),
    ConformanceCase("bert", oft(task_type="SEQ_CLS")),
    ConformanceCase("t5", oft(target_modules=["q", "k", "v", "o", "wi", "wo"], num_cayley_neumann_terms=7)),
]

TestOFTConformance = conformance_suite(CASES)
