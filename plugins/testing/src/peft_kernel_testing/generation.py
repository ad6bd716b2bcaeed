"""An oracle for ``generate`` that owes nothing to HF: greedy decoding through the model's own forward.

``greedy_decode`` runs the whole sequence through ``model(input_ids=..., attention_mask=...)`` at every
step (no cache), takes the argmax of the last position, appends it and repeats. ``generate`` with
``do_sample=False`` must give the same tokens and, step by step, the same logits: a method that
injects something on the first (prefill) step only, or under a keyword the model no longer reads,
is caught on the first token.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def _special_ids(model: nn.Module) -> tuple[list[int], int | None]:
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = getattr(config, "pad_token_id", None)
    return eos, (int(pad) if pad is not None else (eos[0] if eos else None))


def greedy_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 4,
    **forward_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequences, logits)``: the prompt followed by up to ``max_new_tokens`` greedy tokens, and the
    float32 logits each step chose from, ``[steps, batch, vocab]``. A row that produced an end-of-sequence
    token (the model's ``generation_config``) is continued with the pad token, and decoding stops when
    every row has ended, as ``generate`` does."""
    eos, pad = _special_ids(model)
    ids = input_ids
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    steps = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, **forward_kwargs).logits[:, -1].float()
        steps.append(logits)
        token = logits.argmax(-1)
        if eos:
            token = torch.where(done, torch.full_like(token, pad), token)
            done = done | torch.isin(token, torch.tensor(eos, device=token.device))
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token[:, None])], dim=1)
        if eos and bool(done.all()):
            break
    return ids, torch.stack(steps)


def check_generate_matches_greedy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 4,
    adapter_names: Sequence[str] | None = None,
    tolerance: float = 1e-4,
    **routing: Any,
) -> torch.Tensor:
    """``model.generate`` (greedy, with and without the cache) equals :func:`greedy_decode` through the
    model's forward: same tokens, and logits within ``tolerance`` at every step. Returns the tokens.
    Further keywords (``task_ids=...``) go to both, as ``adapter_names`` does."""
    if adapter_names is not None:
        routing["adapter_names"] = list(adapter_names)
    expected, expected_logits = greedy_decode(model, input_ids, attention_mask, max_new_tokens, **routing)
    mask = {} if attention_mask is None else {"attention_mask": attention_mask}
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, **mask, max_new_tokens=max_new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **routing)
    logits = torch.stack([step.float() for step in out.logits])
    assert logits.shape == expected_logits.shape, f"generate ran {logits.shape[0]} steps, greedy decoding {expected_logits.shape[0]}"
    for step in range(logits.shape[0]):
        diff = (logits[step] - expected_logits[step]).abs().max().item()
        assert diff <= tolerance, (
            f"generate's logits at step {step} differ from the forward's by {diff:.2e} "
            f"(step 0 differing means the first, prefill step already ran another model)"
        )
    assert torch.equal(out.sequences, expected), f"generate {out.sequences.tolist()} != greedy decoding {expected.tolist()}"
    with torch.no_grad():
        uncached = model.generate(input_ids=input_ids, **mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  use_cache=False, **routing)
    assert torch.equal(uncached, expected), f"generate(use_cache=False) {uncached.tolist()} != greedy decoding {expected.tolist()}"
    return expected
