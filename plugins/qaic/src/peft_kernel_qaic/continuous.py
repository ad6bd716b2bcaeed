"""Continuous batching: more prompts than KV-cache slots, each slot refilled as soon as it finishes.

The loop QEfficient runs for ``full_batch_size`` graphs, shared by both runtimes:

1. prefill a waiting prompt into a free slot: ``[1, prefill_seq_len]`` chunks with
   ``batch_index = [[slot]]`` and the prompt's adapter id, the slot's cache row written in place;
2. decode every slot together: ``[full_batch_size, 1]`` with ``batch_index = 0..full_batch_size-1``
   and each slot's adapter id; an idle slot is fed ``position_ids = -1`` (its row is left as is);
3. a slot whose prompt emitted EOS or ``generation_len`` tokens is refilled with the next prompt
   before the next decode step.

Greedy decoding; results come back in prompt order. ``slots`` (at most ``full_batch_size``) limits
how many slots are used; the decode batch is always the graph's ``full_batch_size``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Mapping, Sequence

import numpy as np

from peft_kernel_qaic.runtime import Session, prepare_run


def generate_continuous(
    session: Session,
    meta: Mapping[str, Any],
    prompts: Sequence[Sequence[int]],
    adapter_ids: Sequence[int] | None,
    generation_len: int | None,
    eos_token_id: int | None,
    pad_token_id: int = 0,
    slots: int | None = None,
    extra_feeds: Mapping[str, np.ndarray] | None = None,
    return_logits: bool = False,
    options: Mapping[str, int] | None = None,
) -> tuple[list[list[int]], list[np.ndarray] | None, dict[str, float]]:
    """Greedy generation for token-id prompts on a continuous-batching graph described by ``meta``."""
    opts, prompts, generation_len, ids, kv_shape = prepare_run(meta, options, prompts, adapter_ids, generation_len,
                                                               "full_batch_size")
    fbs, prefill_len = opts["full_batch_size"], opts["prefill_seq_len"]
    extra = dict(extra_feeds or {})
    # a device session keeps the cache itself (retained state); stale rows of a finished prompt are
    # harmless: a new prompt rewrites every position it can attend to before attending to it
    past = {} if getattr(session, "retains_state", False) else {n: np.zeros(kv_shape, np.float32) for n in meta["kv_inputs"]}

    generated: list[list[int]] = [[] for _ in prompts]
    kept: list[list[np.ndarray]] | None = [[] for _ in prompts] if return_logits else None
    owner: list[int | None] = [None] * fbs  # prompt index served by each slot
    position = np.zeros(fbs, dtype=np.int64)
    token = np.full(fbs, pad_token_id, dtype=np.int64)
    waiting = deque(range(len(prompts)))
    perf = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_calls": 0, "decode_steps": 0}

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        nonlocal past
        out = session({**feeds, **past, **extra})
        past = {name: out[f"{name}_RetainedState"] for name in past}
        return out["logits"][:, 0, :]

    def emit(i: int, logits: np.ndarray) -> bool:
        """Record prompt ``i``'s next greedy token; True when the prompt is finished."""
        t = int(logits.argmax())
        generated[i].append(t)
        if kept is not None:
            kept[i].append(logits)
        return (eos_token_id is not None and t == eos_token_id) or len(generated[i]) >= generation_len

    def fill(slot: int) -> None:
        """Prefill waiting prompts into ``slot`` until one is still running after its first token."""
        owner[slot] = None
        while waiting:
            i = waiting.popleft()
            p = prompts[i]
            t0 = time.perf_counter()
            for c in range(math.ceil(len(p) / prefill_len)):
                part = p[c * prefill_len : (c + 1) * prefill_len]
                chunk_ids = np.full((1, prefill_len), pad_token_id, dtype=np.int64)
                chunk_pos = np.full((1, prefill_len), -1, dtype=np.int64)
                chunk_ids[0, : len(part)] = part
                chunk_pos[0, : len(part)] = np.arange(c * prefill_len, c * prefill_len + len(part))
                logits = run({
                    "input_ids": chunk_ids, "position_ids": chunk_pos,
                    "batch_index": np.array([[slot]], dtype=np.int64),
                    "lora_ids": np.array([[ids[i]]], dtype=np.int64),
                })
                perf["prefill_calls"] += 1
            perf["prefill_s"] += time.perf_counter() - t0
            if not emit(i, logits[0]):
                owner[slot], position[slot], token[slot] = i, len(p), generated[i][-1]
                return

    for slot in range(min(slots or fbs, fbs)):
        fill(slot)
    batch_index = np.arange(fbs, dtype=np.int64).reshape(fbs, 1)
    while any(o is not None for o in owner):
        busy = np.array([o is not None for o in owner])
        lora = np.array([ids[o] if o is not None else 0 for o in owner], dtype=np.int64).reshape(fbs, 1)
        t0 = time.perf_counter()
        logits = run({
            "input_ids": np.where(busy, token, pad_token_id).reshape(fbs, 1),
            "position_ids": np.where(busy, position, -1).reshape(fbs, 1),
            "batch_index": batch_index, "lora_ids": lora,
        })
        perf["decode_s"] += time.perf_counter() - t0
        perf["decode_steps"] += 1
        for slot in np.flatnonzero(busy):
            i = owner[slot]
            if emit(i, logits[slot]):
                fill(slot)
            else:
                position[slot] += 1
                token[slot] = generated[i][-1]

    perf["generated_tokens"] = sum(len(g) for g in generated)
    if perf["decode_steps"]:
        perf["decode_ms_per_step"] = 1000 * perf["decode_s"] / perf["decode_steps"]
    total = perf["prefill_s"] + perf["decode_s"]
    if total:
        perf["tokens_per_s"] = perf["generated_tokens"] / total
    return generated, ([np.stack(k) for k in kept] if kept is not None else None), perf
