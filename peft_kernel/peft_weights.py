"""``load_peft_weights``: HF PEFT's function that reads an adapter checkpoint into a dict."""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from peft_kernel.checkpoint import load_adapter_weights

_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder")


def infer_device() -> str:
    """The accelerator HF PEFT loads adapter weights onto when no device is given (else ``"cpu"``)."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def load_peft_weights(
    model_id: str | os.PathLike,
    device: str | None = None,
    key_mapping: dict[str, str] | None = None,
    allow_pickle: bool = False,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` in a folder or Hub repo, with their on-disk keys.

    ``device`` defaults to the available accelerator, as in HF PEFT. ``key_mapping`` (regex →
    replacement, first match wins per key) renames keys after their ``base_model.model.`` /
    ``base_model.`` prefix is taken off (and put back after). ``hf_hub_download_kwargs`` may be
    ``revision``, ``cache_dir``, ``token`` (or ``use_auth_token``), ``local_files_only`` and
    ``subfolder``; others raise ``TypeError``. A pickled ``adapter_model.bin`` is read only with
    ``allow_pickle=True`` (pickle can run code).
    """
    hub = dict(hf_hub_download_kwargs)
    token = hub.pop("use_auth_token", None)
    if token is not None:
        hub.setdefault("token", token)
    unknown = [k for k in hub if k not in _HUB_KWARGS]
    if unknown:
        raise TypeError(
            f"load_peft_weights() got unsupported keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"it accepts {', '.join(_HUB_KWARGS)} and use_auth_token."
        )
    subfolder = hub.pop("subfolder", None)
    weights = load_adapter_weights(model_id, subfolder=subfolder, allow_pickle=allow_pickle,
                                   device=device if device is not None else infer_device(), **hub)
    return remap_keys(weights, key_mapping) if key_mapping else weights


def remap_keys(weights: dict[str, torch.Tensor], key_mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """HF PEFT's ``key_mapping`` rule: per key, the first pattern that matches rewrites it."""
    out = {}
    for key, value in weights.items():
        if key.startswith("base_model.model."):
            prefix = "base_model.model."
        elif key.startswith("base_model."):
            prefix = "base_model."
        else:
            raise ValueError(
                f"key_mapping needs checkpoint keys starting with 'base_model.'; {key!r} does not (prompt-learning "
                "checkpoints cannot be remapped)."
            )
        rest = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            new, count = re.subn(pattern, replacement, rest)
            if count:
                rest = new
                break
        out[prefix + rest] = value
    return out
