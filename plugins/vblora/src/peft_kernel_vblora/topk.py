"""The ``save_only_topk_weights`` checkpoint format (HF PEFT's keys, dtypes and values).

Instead of ``<layer>.vblora_logits_A`` ``[..., num_vectors]`` such a checkpoint holds, per
sub-vector, the indices of its ``topk`` best logits (``<key>_topk_indices``, ``[..., topk]``, the
smallest integer dtype HF picks for ``num_vectors``) and the softmax weights of all but the last of
them (``<key>_topk_weights``, ``[..., topk - 1]``: the last is one minus their sum). Loading turns
them back into logits that give the same mixtures: ``log(weight)`` at the kept indices, the
dtype's lowest finite value elsewhere (HF PEFT writes ``-inf``, which gives the same mixtures but
makes the checkpoint look non-finite). Such logits serve inference and merging, not training.
"""

from __future__ import annotations

import torch

from peft_kernel.plugin_api import CheckpointError

LOGITS = ("vblora_logits_A", "vblora_logits_B")
WEIGHTS, INDICES = "_topk_weights", "_topk_indices"


def index_dtype(num_vectors: int) -> torch.dtype:
    """HF PEFT's dtype for indices below ``num_vectors`` (strict bounds: 256 vectors take int16)."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    return torch.int32


def logits_to_topk(state_dict: dict[str, torch.Tensor], topk: int, num_vectors: int) -> dict[str, torch.Tensor]:
    """The on-disk dict with every logits tensor replaced by its top-k weights and indices."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.endswith(LOGITS):
            out[key] = value
            continue
        with torch.no_grad():
            best, indices = value.detach().topk(topk, dim=-1)
            out[key + WEIGHTS] = torch.softmax(best, dim=-1)[..., :-1].contiguous()
            out[key + INDICES] = indices.to(index_dtype(num_vectors)).contiguous()
    return out


def topk_to_logits(state_dict: dict[str, torch.Tensor], num_vectors: int) -> dict[str, torch.Tensor] | None:
    """The on-disk dict with every pair of top-k weights and indices replaced by logits of
    ``num_vectors`` entries; ``None`` when there is no such pair. A pair that is incomplete or does
    not fit ``num_vectors`` raises :class:`CheckpointError` naming the key."""
    if not any(key.endswith((WEIGHTS, INDICES)) for key in state_dict):
        return None
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(INDICES):
            stem = key[: -len(INDICES)]
            out[stem] = _logits(stem, state_dict.get(stem + WEIGHTS), value, num_vectors)
        elif key.endswith(WEIGHTS):
            if key[: -len(WEIGHTS)] + INDICES not in state_dict:
                raise CheckpointError(f"{key!r} has no matching {INDICES!r} tensor in the checkpoint")
        else:
            out[key] = value
    return out


def _logits(stem: str, weights: torch.Tensor | None, indices: torch.Tensor, num_vectors: int) -> torch.Tensor:
    if weights is None:
        raise CheckpointError(f"{stem + INDICES!r} has no matching {WEIGHTS!r} tensor in the checkpoint")
    if not weights.is_floating_point() or indices.is_floating_point() or indices.dim() == 0:
        raise CheckpointError(f"{stem!r}: top-k weights must be floats and indices integers, "
                              f"got {weights.dtype} and {indices.dtype}")
    if weights.shape[:-1] != indices.shape[:-1] or weights.shape[-1] != indices.shape[-1] - 1:
        raise CheckpointError(f"{stem!r}: top-k weights {tuple(weights.shape)} do not fit indices "
                              f"{tuple(indices.shape)} (one weight fewer than indices per sub-vector)")
    indices = indices.long()
    if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < num_vectors):
        raise CheckpointError(f"{stem + INDICES!r}: indices must be in [0, {num_vectors}) (num_vectors), "
                              f"got values from {int(indices.min())} to {int(indices.max())}")
    full = torch.cat([weights, 1 - weights.sum(dim=-1, keepdim=True)], dim=-1)
    lowest = torch.finfo(weights.dtype).min
    logits = torch.full((*indices.shape[:-1], num_vectors), lowest, dtype=weights.dtype, device=weights.device)
    return logits.scatter_(-1, indices, full.log().clamp_min(lowest))
