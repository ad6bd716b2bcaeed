"""ONNX export of :class:`~peft_kernel_qaic.graph.QaicCausalLM`, the compiler's side files, and the
export cache.

An export folder holds::

    model.onnx               the graph (symbolic batch_size / seq_len / ctx_len)
    specializations.json     the two static shapes the device runs: prefill and decode
    custom_io.yaml           precisions of the KV cache (and adapter-weight) inputs/outputs
    qaic_export.json         what was exported: hash, names, adapter slots, shapes

The folder name carries a hash of the model config (plus a cheap weight fingerprint), the
adapters (config and weights) and the export options, so an unchanged model is never exported
twice: :func:`export_hash` decides, :func:`find_export` looks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import attrs
import torch
from torch import nn

from peft_kernel_qaic.errors import ExportConfigError

META_NAME = "qaic_export.json"
ONNX_NAME = "model.onnx"
OPSET = 17
FORMAT = 2  # bump when the graph layout changes


@attrs.define
class ExportOptions:
    """The shapes the graph is specialised to (``specializations.json``) and the device precision."""

    batch_size: int = 1
    prefill_seq_len: int = 32
    ctx_len: int = 128
    kv_precision: str = "float16"
    full_batch_size: int | None = None
    """Continuous batching: the KV-cache slots (the decode batch); ``None`` for a static batch."""

    def __attrs_post_init__(self) -> None:
        for field in ("batch_size", "prefill_seq_len", "ctx_len", "full_batch_size"):
            value = getattr(self, field)
            if value is None and field == "full_batch_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ExportConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.prefill_seq_len > self.ctx_len:
            raise ExportConfigError(
                f"prefill_seq_len ({self.prefill_seq_len}) is larger than ctx_len ({self.ctx_len})"
            )


def default_export_root() -> Path:
    root = os.environ.get("PEFT_KERNEL_QAIC_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peft_kernel_qaic"


def model_fingerprint(model: nn.Module) -> str:
    """Config plus a cheap look at every weight (shape, a few values, the sum)."""
    h = hashlib.sha256()
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(vars(model.config))
    config.pop("_name_or_path", None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            if flat.numel():
                probe = torch.cat([flat[:8], flat[-8:], flat.float().sum().reshape(1)])
                h.update(probe.float().numpy().tobytes())
    return h.hexdigest()


def export_hash(model_fp: str, adapter_fps: Iterable[str | None], kind: str, options: ExportOptions, extra: Mapping[str, Any] | None = None) -> str:
    from peft_kernel_qaic import __version__

    payload = {
        "format": FORMAT,
        "version": __version__,
        "kind": kind,
        "model": model_fp,
        "adapters": list(adapter_fps),
        "options": attrs.asdict(options),
        "extra": dict(extra or {}),
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def find_export(folder: Path, digest: str) -> Path | None:
    meta = folder / META_NAME
    onnx_path = folder / ONNX_NAME
    if not (meta.is_file() and onnx_path.is_file()):
        return None
    try:
        if json.loads(meta.read_text())["hash"] == digest:
            return onnx_path
    except (json.JSONDecodeError, KeyError):
        return None
    return None


def read_meta(onnx_path: str | os.PathLike) -> dict[str, Any]:
    path = Path(onnx_path).parent / META_NAME
    if not path.is_file():
        raise ExportConfigError(f"{path} is missing: {onnx_path} was not exported by peft-kernel-qaic")
    return json.loads(path.read_text())


def specializations(options: ExportOptions) -> dict[str, Any]:
    """QEfficient's format: one entry per static shape (prefill, then decode).

    With continuous batching (``full_batch_size`` set) every entry carries ``full_batch_size`` (the
    KV-cache rows); prefill runs one prompt (batch 1), decode every slot (batch ``full_batch_size``).
    """
    fbs = options.full_batch_size
    shapes = [(options.prefill_seq_len, 1 if fbs else options.batch_size)]
    if options.prefill_seq_len != 1:
        shapes.append((1, fbs or options.batch_size))
    entries = []
    for seq, batch in shapes:
        entry = {"batch_size": str(batch), "seq_len": str(seq), "ctx_len": str(options.ctx_len)}
        if fbs:
            entry["full_batch_size"] = str(fbs)
        entries.append(entry)
    return {"specializations": entries}


def custom_io_yaml(names: Iterable[str], precision: str) -> str:
    lines = []
    for name in names:
        lines += [f"- IOName: {name}", f"  Precision: {precision}", ""]
    return "\n".join(lines)


def write_side_files(folder: Path, meta: Mapping[str, Any], options: ExportOptions) -> dict[str, Path]:
    """``specializations.json`` and ``custom_io.yaml`` for ``options`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "specializations.json"
    spec.write_text(json.dumps(specializations(options), indent=2))
    io_names = []
    for name in meta["kv_inputs"]:
        io_names += [name, f"{name}_RetainedState"]
    text = custom_io_yaml(io_names, options.kv_precision)
    if meta.get("weight_inputs"):
        text += custom_io_yaml(meta["weight_inputs"], "float16" if options.kv_precision != "float32" else "float32")
    custom = folder / "custom_io.yaml"
    custom.write_text(text)
    return {"specializations": spec, "custom_io": custom}


def export_graph(
    graph: nn.Module,
    folder: Path,
    digest: str,
    options: ExportOptions,
    example_inputs: tuple[torch.Tensor, ...],
    meta_extra: Mapping[str, Any],
) -> Path:
    """Export ``graph`` to ``folder/model.onnx`` plus the side files and ``qaic_export.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / ONNX_NAME
    tmp = folder / f".{ONNX_NAME}.tmp"
    start = time.perf_counter()
    graph.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example_inputs,
            str(tmp),
            input_names=graph.input_names(),
            output_names=graph.output_names(),
            dynamic_axes=graph.dynamic_axes(),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    os.replace(tmp, onnx_path)
    seconds = time.perf_counter() - start
    kv_inputs = [n for n in graph.input_names() if n.startswith("past_")]
    cb = bool(getattr(graph, "continuous_batching", False))
    meta = {
        "hash": digest,
        "format": FORMAT,
        "inputs": graph.input_names(),
        "outputs": graph.output_names(),
        "kv_inputs": kv_inputs,
        "kv_shape": list(graph.kv_shape(options.full_batch_size if cb else options.batch_size, options.ctx_len)),
        "continuous_batching": cb,
        "options": attrs.asdict(options),
        "export_seconds": round(seconds, 3),
        **meta_extra,
    }
    write_side_files(folder, meta, options)
    (folder / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return onnx_path


def example_inputs(graph: nn.Module, extra: tuple[torch.Tensor, ...] = (), lora_ids: bool = True) -> tuple[torch.Tensor, ...]:
    """Tracing inputs with sizes unlike any real one (so no dimension is frozen by accident).

    A continuous-batching graph gets a cache of more rows than the batch and a ``batch_index``.
    """
    batch, seq, ctx = 2, 3, 8
    cb = getattr(graph, "continuous_batching", False)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    pos = torch.arange(seq).repeat(batch, 1)
    rows = batch + 3 if cb else batch
    past = tuple(torch.zeros(graph.kv_shape(rows, ctx)) for _ in range(2 * graph.num_layers))
    head = (ids, pos)
    if cb:
        head += (torch.tensor([[3], [1]]),)
    if lora_ids:
        head += (torch.zeros(batch, 1, dtype=torch.long),)
    return head + past + tuple(extra)
