"""HF PEFT's ``peft.utils`` helpers that are not method-specific.

Submodules are imported on demand (``from peft_kernel.utils.merge_utils import ties``), so
``import peft_kernel.utils`` stays free of torch.
"""
