"""Reading BOFT adapters that HF PEFT saved without its ``fbd_cuda`` extension (on CPU, say).

HF PEFT 0.21.2 without the extension builds every layer with one butterfly factor whatever
``boft_n_butterfly_factor`` says (it warns "Setting boft_n_butterfly_factor to 1") and saves that
``boft_R`` (``[1, D, b, b]``) next to the unchanged config. Such an adapter computed the plain
block-diagonal rotation -- which is factor 0 of a butterfly -- so on load the missing factors are
filled with zeros, whose Cayley transform is the identity: the outputs are HF's. No torch import:
this runs in the cheap entry module's hook.
"""

from __future__ import annotations

import warnings
from typing import Any

from peft_kernel_boft.config import BOFTConfig


def fill_missing_factors(config: BOFTConfig, state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """``state_dict`` with single-factor ``boft_R`` tensors padded to the config's factor count, or
    None when none needs it."""
    factors = config.boft_n_butterfly_factor
    short = [k for k, v in state_dict.items() if k.rsplit(".", 1)[-1] == "boft_R" and v.dim() == 4 and v.shape[0] < factors]
    if not short:
        return None
    if any(state_dict[k].shape[0] != 1 for k in short):
        return None  # not HF's fallback: leave it for the core's shape check to report
    warnings.warn(
        f"{len(short)} boft_R tensor(s) hold 1 butterfly factor while boft_n_butterfly_factor={factors}: an adapter "
        "saved by HF PEFT without its fbd_cuda extension, which silently uses one factor. The other factors are "
        "loaded as the identity, so the outputs are those HF PEFT computed.",
        UserWarning,
        stacklevel=2,
    )
    padded = dict(state_dict)
    for key in short:
        value = state_dict[key]
        full = value.new_zeros((factors, *value.shape[1:]))
        full[:1] = value
        padded[key] = full
    return padded
