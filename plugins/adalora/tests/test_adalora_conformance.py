"""The core's conformance suite on TEMPLATE (no HF PEFT counterpart: ``hf=False``)."""

import pytest

pytest.importorskip("peft_kernel_adalora", reason="plugins/_template is a template, installed on demand only")

from peft_kernel_testing import ConformanceCase, conformance_suite  # noqa: E402
from peft_kernel_adalora import TemplateConfig  # noqa: E402

TestTemplateConformance = conformance_suite([
    ConformanceCase("mlp", lambda: TemplateConfig(target_modules=["lin0", "lin1"], init_weights=False), hf=False),
    ConformanceCase("llama", lambda: TemplateConfig(target_modules=["q_proj", "v_proj"], init_weights=False), hf=False),
])
