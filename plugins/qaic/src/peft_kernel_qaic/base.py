"""What both Cloud AI 100 model classes share: loading, export cache, compile, generate."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import attrs
import numpy as np
import torch
from torch import nn

from peft_kernel_qaic import compiler
from peft_kernel_qaic.errors import ExportConfigError, SDKNotFoundError
from peft_kernel_qaic.export import (
    ExportOptions,
    export_graph,
    export_hash,
    find_export,
    model_fingerprint,
    read_meta,
    default_export_root,
    write_side_files,
)
from peft_kernel_qaic.graph import check_architecture
from peft_kernel_qaic.continuous import generate_continuous
from peft_kernel_qaic.runtime import GenerationResult, ai100_session, generate_tokens, ort_session

RUNTIMES = {"onnxruntime": "onnxruntime", "ort": "onnxruntime", "cpu": "onnxruntime", "ai100": "ai100", "ai_100": "ai100", "qaic": "ai100"}


def load_causal_lm(path_or_model: Any, **kwargs: Any) -> nn.Module:
    if isinstance(path_or_model, nn.Module):
        model = path_or_model
    else:
        from transformers import AutoModelForCausalLM

        kwargs.setdefault("dtype", torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path_or_model, **kwargs)
    check_architecture(model)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        # the graph is exported in float32 (the compiler converts to fp16 with -convert-to-fp16; ONNX
        # Runtime on CPU needs float32)
        model = model.to(torch.float32)
    return model.eval()


class QaicCausalLMBase:
    """Shared plumbing. Subclasses define the graph (``_build_graph``), its hash inputs, feeds."""

    _kind = "base"

    def __init__(self, model: nn.Module, continuous_batching: bool = False) -> None:
        if not isinstance(continuous_batching, bool):
            raise ExportConfigError(f"continuous_batching must be True or False, got {continuous_batching!r}")
        self.model = model
        self.continuous_batching = continuous_batching
        self.options = ExportOptions()
        self.onnx_path: Path | None = None
        self.qpc_path: Path | None = None
        self._compiled_hash: str | None = None
        self._model_fp: str | None = None
        self._sessions: dict[str, Any] = {}
        self.last_export_seconds: float | None = None
        self.export_dir: Path | None = None

    # ---- to be provided by subclasses ---------------------------------------------------------
    def _build_graph(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _hash_parts(self) -> tuple[list[str | None], dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _meta_extra(self) -> dict[str, Any]:
        return {}

    def _example_extra(self, graph) -> tuple[torch.Tensor, ...]:
        return ()

    def _extra_feeds(self) -> dict[str, np.ndarray]:
        return {}

    def _uses_lora_ids(self) -> bool:
        return True

    # ---- export ---------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        name = getattr(self.model.config, "_name_or_path", "") or self.model.config.model_type
        return Path(str(name)).name or self.model.config.model_type

    def export_hash(self) -> str:
        if self._model_fp is None:
            self._model_fp = model_fingerprint(self.model)
        adapter_fps, extra = self._hash_parts()
        if self.continuous_batching:
            extra = {**extra, "continuous_batching": True}
        return export_hash(self._model_fp, adapter_fps, self._kind, ExportOptions(), extra)

    def _set_options(self, batch_size=None, prefill_seq_len=None, ctx_len=None, kv_precision=None, full_batch_size=None) -> None:
        if full_batch_size is not None and not self.continuous_batching:
            raise ExportConfigError(
                f"full_batch_size={full_batch_size!r} is for continuous batching; create the model with "
                "from_pretrained(..., continuous_batching=True)"
            )
        changes = {
            k: v
            for k, v in dict(batch_size=batch_size, prefill_seq_len=prefill_seq_len, ctx_len=ctx_len,
                             kv_precision=kv_precision, full_batch_size=full_batch_size).items()
            if v is not None
        }
        if changes:
            self.options = attrs.evolve(self.options, **changes)
        if self.continuous_batching and self.options.full_batch_size is None:
            raise ExportConfigError(
                "continuous_batching=True needs full_batch_size (the number of KV-cache slots): pass it to "
                "export(), compile() or generate()"
            )

    def export(
        self,
        export_dir: str | os.PathLike | None = None,
        *,
        batch_size: int | None = None,
        prefill_seq_len: int | None = None,
        ctx_len: int | None = None,
        full_batch_size: int | None = None,
        force: bool = False,
    ) -> str:
        """Export the ONNX graph (skipped when an identical export exists); returns its path.

        ``export_dir`` (remembered for later implicit exports) defaults to
        ``$PEFT_KERNEL_QAIC_CACHE`` or ``~/.cache/peft_kernel_qaic``; each export gets a sub-folder
        named after the model and the export hash.

        The graph has symbolic ``batch_size`` / ``seq_len`` / ``ctx_len``; the static shapes the
        device runs go to ``specializations.json`` next to it (``batch_size``, ``prefill_seq_len``,
        ``ctx_len``, remembered for ``compile`` and ``generate``). A continuous-batching model needs
        ``full_batch_size``: its KV cache has that many slots.
        """
        self._set_options(batch_size, prefill_seq_len, ctx_len, full_batch_size=full_batch_size)
        digest = self.export_hash()
        if export_dir is not None:
            self.export_dir = Path(export_dir)
        root = self.export_dir if self.export_dir is not None else default_export_root()
        folder = root / f"{self.model_name}-{self._kind}-{digest[:16]}"
        found = None if force else find_export(folder, digest)
        if found is not None:
            self.last_export_seconds = 0.0
            meta = read_meta(found)
            if meta["options"] != attrs.asdict(self.options):
                meta["options"] = attrs.asdict(self.options)
                write_side_files(folder, meta, self.options)
                (folder / "qaic_export.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            self.onnx_path = found
            return str(found)
        start = time.perf_counter()
        graph = self._build_graph()
        from peft_kernel_qaic.export import example_inputs

        inputs = example_inputs(graph, self._example_extra(graph), lora_ids=self._uses_lora_ids())
        self.onnx_path = export_graph(graph, folder, digest, self.options, inputs, self._meta_extra())
        self.last_export_seconds = time.perf_counter() - start
        self._sessions.clear()
        return str(self.onnx_path)

    # ---- compile --------------------------------------------------------------------------
    def compile_command(
        self,
        onnx_path: str | os.PathLike | None = None,
        compile_dir: str | os.PathLike | None = None,
        *,
        batch_size: int | None = None,
        prefill_seq_len: int | None = None,
        ctx_len: int | None = None,
        full_batch_size: int | None = None,
        num_cores: int = 16,
        num_devices: int = 1,
        mxfp6_matmul: bool = False,
        mxint8_kv_cache: bool = False,
        mos: int | None = None,
        aic_enable_depth_first: bool = False,
        convert_to_fp16: bool = True,
        extra_args: Sequence[str] = (),
    ) -> tuple[list[str], Path]:
        """The ``qaic-exec`` command ``compile`` would run, and the QPC folder (exports if needed)."""
        kv = "mxint8" if mxint8_kv_cache else ("float16" if convert_to_fp16 else "float32")
        self._set_options(batch_size, prefill_seq_len, ctx_len, kv, full_batch_size)
        onnx = Path(onnx_path) if onnx_path is not None else Path(self.export())
        meta = read_meta(onnx)
        o = self.options
        tag = f"qpc-bs{o.batch_size}-pl{o.prefill_seq_len}-cl{o.ctx_len}-c{num_cores}-d{num_devices}" + (
            "-mxfp6" if mxfp6_matmul else ""
        ) + ("-mxint8kv" if mxint8_kv_cache else "") + (f"-fbs{o.full_batch_size}" if o.full_batch_size else "")
        folder = Path(compile_dir) if compile_dir is not None else onnx.parent / tag
        side = write_side_files(folder, meta, self.options)
        mdp = compiler.write_mdp_config(folder, num_devices, num_cores) if num_devices > 1 else None
        cmd = compiler.build_compile_command(
            onnx,
            folder / "qpc",
            side["specializations"],
            side["custom_io"],
            num_cores=num_cores,
            convert_to_fp16=convert_to_fp16,
            mxfp6_matmul=mxfp6_matmul,
            mxint8_kv_cache=mxint8_kv_cache,
            mos=mos,
            aic_enable_depth_first=aic_enable_depth_first,
            mdp_config_path=mdp,
            extra_args=extra_args,
        )
        return cmd, folder / "qpc"

    def compile(self, onnx_path: str | os.PathLike | None = None, compile_dir: str | os.PathLike | None = None, **kwargs: Any) -> str:
        """Export if needed, then compile for Cloud AI 100 with ``qaic-exec``; returns the QPC folder.

        Without the SDK this raises :class:`SDKNotFoundError` (the ONNX export is still done, and
        ``generate(..., runtime="onnxruntime")`` runs it on CPU).
        """
        cmd, qpc = self.compile_command(onnx_path, compile_dir, **kwargs)
        compiler.require_sdk(cmd[0])
        qpc.parent.mkdir(parents=True, exist_ok=True)
        compiler.run_compiler(cmd, qpc.parent / "compile.log")
        self.qpc_path = qpc
        self._compiled_hash = self.export_hash()
        return str(qpc)

    # ---- generate -------------------------------------------------------------------------
    def _session(self, runtime: str, device_ids: Sequence[int] | None):
        runtime_key = RUNTIMES.get(str(runtime).lower())
        if runtime_key is None:
            raise ValueError(f"runtime must be 'ai100' or 'onnxruntime', got {runtime!r}")
        if runtime_key == "onnxruntime":
            onnx = Path(self.export())
            key = str(onnx)
            if key not in self._sessions:
                self._sessions[key] = ort_session(onnx)
            return self._sessions[key], read_meta(onnx)
        if self.qpc_path is None:
            raise SDKNotFoundError(
                "runtime='ai100' needs a compiled QPC: call compile() first (it needs the Cloud AI 100 SDK). "
                "Without the card, pass runtime='onnxruntime' to run the same graph on CPU."
            )
        if self._compiled_hash != self.export_hash():
            raise ExportConfigError(
                "the adapters or model changed since compile(): call compile() again (it re-exports the graph "
                "first)"
            )
        return ai100_session(self.qpc_path, device_ids), read_meta(self.onnx_path)

    def verify(self, tokenizer: Any = None, prompts: Any = None, prompt_to_adapter_mapping: Any = None,
               generation_len: int | None = 8, prompt_token_ids: Any = None):
        """Generate on ONNX Runtime and compare every step's logits and the greedy tokens with PyTorch.

        Returns a :class:`~peft_kernel_qaic.verify.VerifyReport` (``worst``, ``ok``, printable).
        """
        from peft_kernel_qaic.verify import verify

        return verify(self, tokenizer, prompts, prompt_to_adapter_mapping, generation_len, prompt_token_ids)

    def _check_full_batch_size(self, full_batch_size: int | None) -> int | None:
        """The slots ``generate`` uses; exports/compiles are never silently enlarged."""
        if full_batch_size is None:
            if self.continuous_batching:
                self._set_options()  # raises when no full_batch_size was ever given
            return None
        if not isinstance(full_batch_size, int) or isinstance(full_batch_size, bool) or full_batch_size < 1:
            raise ExportConfigError(f"full_batch_size must be a positive integer, got {full_batch_size!r}")
        exported = self.options.full_batch_size if self.continuous_batching else None
        if exported is None:
            self._set_options(full_batch_size=full_batch_size)  # first use: export with it (or refuse a static model)
        elif full_batch_size > exported:
            raise ExportConfigError(
                f"generate(full_batch_size={full_batch_size}) is larger than the full_batch_size={exported} the graph "
                f"was exported/compiled with (its KV cache has {exported} slots); pass at most {exported}, or "
                f"export/compile again with full_batch_size={full_batch_size}"
            )
        return full_batch_size

    def _tokenize(self, tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (or pass prompt_token_ids=[[...], ...])")
        return [list(tokenizer(p)["input_ids"]) for p in prompts]

    def _run_generate(
        self,
        tokenizer: Any,
        prompts: str | Sequence[str],
        adapter_ids: Sequence[int] | None,
        mapping_names: list[str],
        generation_len: int | None,
        runtime: str,
        device_id: Sequence[int] | None,
        return_logits: bool,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        full_batch_size: int | None = None,
    ) -> GenerationResult:
        slots = self._check_full_batch_size(full_batch_size)
        session, meta = self._session(runtime, device_id)
        ids = [list(p) for p in prompt_token_ids] if prompt_token_ids is not None else self._tokenize(tokenizer, prompts)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else getattr(self.model.config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is None:
            pad = eos if eos is not None else 0
        common = dict(extra_feeds=self._extra_feeds(), return_logits=return_logits, options=attrs.asdict(self.options))
        if self.continuous_batching:
            generated, logits, perf = generate_continuous(session, meta, ids, adapter_ids, generation_len, eos, pad, slots, **common)
        else:
            generated, logits, perf = generate_tokens(session, meta, ids, adapter_ids, generation_len, eos, pad, **common)
        texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated] if tokenizer is not None else []
        return GenerationResult(generated_ids=generated, generated_texts=texts, prompt_to_adapter_mapping=mapping_names, logits=logits, perf=perf)


def as_prompt_list(prompts: str | Sequence[str] | None, prompt_token_ids: Sequence[Sequence[int]] | None) -> list[Any]:
    if prompt_token_ids is not None:
        return [list(p) for p in prompt_token_ids]
    if prompts is None:
        raise ValueError("pass prompts (with a tokenizer) or prompt_token_ids")
    if isinstance(prompts, str):
        return [prompts]
    return list(prompts)
