"""Running an exported graph the way the Cloud AI 100 runs it: chunked prefill, then decode.

Both runtimes share :func:`generate_tokens`; only the session differs (``"onnxruntime"`` on CPU,
``"ai100"`` on the card through the SDK's Python runtime). The loop always feeds the static shapes
the graph was specialised to: ``[batch_size, prefill_seq_len]`` for prefill chunks (right-padded,
``position_ids = -1`` on padding), ``[batch_size, 1]`` for decode, ``lora_ids`` ``[batch_size, 1]``
per row, and the ``*_RetainedState`` outputs are fed back as the next ``past_*`` inputs. Prompts
beyond ``batch_size`` run in successive groups; a short last group is filled with dummy rows whose
results are dropped. Greedy decoding; a row stops after it emits ``eos_token_id``. Continuous-batching
graphs run the slot-refilling loop of :mod:`peft_kernel_qaic.continuous` instead.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs
import numpy as np

from peft_kernel_qaic.errors import PromptTooLongError, SDKNotFoundError

Session = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@attrs.define
class GenerationResult:
    """What ``generate`` returns: one entry per prompt, in prompt order."""

    generated_ids: list[list[int]]
    generated_texts: list[str] = attrs.field(factory=list)
    prompt_to_adapter_mapping: list[str] = attrs.field(factory=list)
    logits: list[np.ndarray] | None = None
    """With ``return_logits=True``: per prompt, ``[num_generated, vocab]`` logits of each step."""
    perf: dict[str, float] = attrs.field(factory=dict)
    """Timings: ``prefill_s``, ``decode_s``, ``decode_steps``, ``decode_ms_per_step``, ``tokens_per_s``."""


def ort_session(onnx_path: str | Path, num_threads: int | None = None) -> Session:
    """An ONNX Runtime CPU session, called with a feed dict, returning a name -> array dict."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if num_threads:
        so.intra_op_num_threads = num_threads
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
        return dict(zip(names, outs))

    run.input_names = wanted  # type: ignore[attr-defined]
    return run


def ai100_session(qpc_path: str | Path, device_ids: Sequence[int] | None = None) -> Session:
    """A Cloud AI 100 session over a compiled QPC, through the SDK's Python runtime.

    The KV cache stays on the device (retained state): its buffers are skipped, so the loop feeds
    only tokens, positions, adapter ids (and swap-class weights) and reads the logits.
    """
    try:
        from QEfficient.generation.cloud_infer import QAICInferenceSession  # type: ignore[import-not-found]
    except Exception:
        raise SDKNotFoundError(
            "runtime='ai100' needs the Cloud AI 100 platform SDK's Python runtime (qaicrt, used through "
            "QEfficient's QAICInferenceSession), which is not installed. Without the card, pass "
            "runtime='onnxruntime' to run the same exported graph on CPU."
        ) from None
    sess = QAICInferenceSession(str(qpc_path), list(device_ids) if device_ids else None)
    names = list(getattr(sess, "input_names", [])) + list(getattr(sess, "output_names", []))
    kv = [n for n in names if n.startswith("past_") or n.endswith("_RetainedState")]
    if kv:
        sess.skip_buffers(kv)
    inputs = set(getattr(sess, "input_names", [])) - set(kv)

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {
            k: (v.astype(np.float16) if v.dtype == np.float32 else v)
            for k, v in feeds.items()
            if not inputs or k in inputs
        }
        outs = sess.run(feeds)
        return {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype == np.float16 else v for k, v in outs.items()}

    run.retains_state = True  # type: ignore[attr-defined]
    return run


def check_lengths(prompts: Sequence[Sequence[int]], generation_len: int | None, ctx_len: int) -> int:
    """Refuse empty or too long prompts; the number of tokens to generate (default: what fits)."""
    for i, p in enumerate(prompts):
        if not p:
            raise PromptTooLongError(f"prompt {i} is empty after tokenization")
        if len(p) > ctx_len:
            raise PromptTooLongError(
                f"prompt {i} has {len(p)} tokens but the graph was exported/compiled with ctx_len={ctx_len}; "
                "shorten it or export with a larger ctx_len"
            )
    longest = max(len(p) for p in prompts)
    room = ctx_len - longest + 1
    if generation_len is None:
        return room
    if generation_len < 1:
        raise ValueError(f"generation_len must be at least 1, got {generation_len}")
    if generation_len > room:
        raise PromptTooLongError(
            f"the longest prompt has {longest} tokens, so at most {room} tokens can be generated within "
            f"ctx_len={ctx_len}; got generation_len={generation_len}"
        )
    return generation_len


def prepare_run(meta: Mapping[str, Any], options: Mapping[str, int] | None, prompts: Sequence[Sequence[int]],
                adapter_ids: Sequence[int] | None, generation_len: int | None,
                batch_key: str) -> tuple[dict[str, Any], list[list[int]], int, list[int], list[int]]:
    """What both generation loops start from: the export's options (``options`` override them), the
    prompts as lists, the checked ``generation_len``, one adapter id per prompt (``0``: base) and the
    KV-cache shape for a batch of ``opts[batch_key]`` rows."""
    opts = dict(meta["options"]) | dict(options or {})
    prompts = [list(p) for p in prompts]
    generation_len = check_lengths(prompts, generation_len, opts["ctx_len"])
    ids = list(adapter_ids) if adapter_ids is not None else [0] * len(prompts)
    kv_shape = list(meta["kv_shape"])
    kv_shape[0], kv_shape[2] = opts[batch_key], opts["ctx_len"]
    return opts, prompts, generation_len, ids, kv_shape


def generate_tokens(
    session: Session,
    meta: Mapping[str, Any],
    prompts: Sequence[Sequence[int]],
    adapter_ids: Sequence[int] | None,
    generation_len: int | None,
    eos_token_id: int | None,
    pad_token_id: int = 0,
    extra_feeds: Mapping[str, np.ndarray] | None = None,
    return_logits: bool = False,
    options: Mapping[str, int] | None = None,
) -> tuple[list[list[int]], list[np.ndarray] | None, dict[str, float]]:
    """Greedy generation for token-id prompts on the static graph described by ``meta``."""
    opts, prompts, generation_len, ids, kv_shape = prepare_run(meta, options, prompts, adapter_ids, generation_len, "batch_size")
    batch_size, prefill_len = opts["batch_size"], opts["prefill_seq_len"]
    results: list[list[int]] = []
    logits_out: list[np.ndarray] = []
    perf = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0, "generated_tokens": 0}
    extra = dict(extra_feeds or {})

    for start in range(0, len(prompts), batch_size):
        group = prompts[start : start + batch_size]
        gids = ids[start : start + batch_size]
        n_real = len(group)
        group = group + [[pad_token_id]] * (batch_size - n_real)
        gids = gids + [0] * (batch_size - n_real)
        lens = np.array([len(p) for p in group])
        lora = np.array(gids, dtype=np.int64).reshape(batch_size, 1)
        # A device session keeps the cache itself (retained state); stale entries from a previous
        # batch are harmless: every slot a row can attend to (<= its position) is rewritten first.
        on_device = getattr(session, "retains_state", False)
        past = {} if on_device else {name: np.zeros(kv_shape, dtype=np.float32) for name in meta["kv_inputs"]}
        first_logits = np.zeros((batch_size, 0), dtype=np.float32)

        t0 = time.perf_counter()
        n_chunks = math.ceil(lens.max() / prefill_len)
        for c in range(n_chunks):
            chunk_ids = np.full((batch_size, prefill_len), pad_token_id, dtype=np.int64)
            chunk_pos = np.full((batch_size, prefill_len), -1, dtype=np.int64)
            for b, p in enumerate(group):
                part = p[c * prefill_len : (c + 1) * prefill_len]
                chunk_ids[b, : len(part)] = part
                chunk_pos[b, : len(part)] = np.arange(c * prefill_len, c * prefill_len + len(part))
            out = session({"input_ids": chunk_ids, "position_ids": chunk_pos, "lora_ids": lora, **past, **extra})
            past = {name: out[f"{name}_RetainedState"] for name in past}
            step_logits = out["logits"][:, 0, :]
            if first_logits.shape[1] == 0:
                first_logits = np.zeros_like(step_logits)
            ends_here = (lens - 1) // prefill_len == c
            first_logits[ends_here] = step_logits[ends_here]
        perf["prefill_s"] += time.perf_counter() - t0

        step_logits = first_logits
        tokens = step_logits.argmax(-1)
        generated = [[int(t)] for t in tokens]
        kept = [[step_logits[b]] for b in range(batch_size)] if return_logits else None
        done = np.array([eos_token_id is not None and int(t) == eos_token_id for t in tokens])
        position = lens.copy()
        t0 = time.perf_counter()
        for _ in range(generation_len - 1):
            if done[:n_real].all():
                break
            pos = np.where(done, -1, position).reshape(batch_size, 1).astype(np.int64)
            out = session({"input_ids": tokens.reshape(batch_size, 1).astype(np.int64), "position_ids": pos, "lora_ids": lora, **past, **extra})
            past = {name: out[f"{name}_RetainedState"] for name in past}
            perf["decode_steps"] += 1
            step_logits = out["logits"][:, 0, :]
            tokens = step_logits.argmax(-1)
            position += 1
            for b in range(batch_size):
                if done[b]:
                    continue
                generated[b].append(int(tokens[b]))
                if kept is not None:
                    kept[b].append(step_logits[b])
                if eos_token_id is not None and int(tokens[b]) == eos_token_id:
                    done[b] = True
        perf["decode_s"] += time.perf_counter() - t0
        results += generated[:n_real]
        if kept is not None:
            logits_out += [np.stack(k) for k in kept[:n_real]]
    perf["generated_tokens"] = sum(len(r) for r in results)
    if perf["decode_steps"]:
        perf["decode_ms_per_step"] = 1000 * perf["decode_s"] / perf["decode_steps"]
    total = perf["prefill_s"] + perf["decode_s"]
    if total:
        perf["tokens_per_s"] = perf["generated_tokens"] / total
    return results, (logits_out if return_logits else None), perf
