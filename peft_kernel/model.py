"""``PeftModel`` and its task classes: HF PEFT's user-facing wrapper, method-agnostic.

What owns the adapters is the model's *host* (:class:`~peft_kernel.host.AdapterHost`), which the
plugins build (``peft_kernel_create_host``): by default the method's tuner, an
:class:`~peft_kernel.tuner.AdapterModel`, which is then ``PeftModel.base_model``; attribute lookups
fall through to ``base_model`` and then to the user's model, as in HF PEFT. ``PeftModel`` delegates
everything about adapters to the host and never asks what kind of method it holds. ``forward`` /
``generate`` accept ``adapter_names=[...]`` (one adapter name per row, ``"__base__"`` for none) to
serve a mixed batch.

Public methods carry HF PEFT's signatures. Where HF PEFT swallows unknown keyword arguments
(``load_adapter`` / ``from_pretrained``'s ``**kwargs``) they raise ``TypeError`` naming them here;
keywords HF forwards to the model (``forward``, ``generate``) are forwarded.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator, Sequence

import attrs
import torch
from torch import nn

from peft_kernel.checkpoint_stage import staged_checkpoint
from peft_kernel.transaction import load_transaction, wrap_and_load
from peft_kernel.checkpoint import adapter_dir, check_save_target, load_adapter_weights
from peft_kernel.config import PeftConfig
from peft_kernel.enums import TaskType
from peft_kernel.errors import AdapterNameError, MixedBatchError
from peft_kernel.plugins import get_registry
from peft_kernel import compiled
from peft_kernel.routing import BASE_ADAPTER, routed
from peft_kernel.adapter_io import save_adapter, set_peft_model_state_dict
from peft_kernel.injection import cast_adapter_dtype
from peft_kernel.model_card import update_model_card
from peft_kernel.status import get_layer_status, get_model_status, param_count
from peft_kernel.host import AdapterHost

_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only")
_LOAD_KWARGS = (*_HUB_KWARGS, "subfolder", "use_auth_token", "ignore_mismatched_sizes")
"""The keyword arguments ``load_adapter(**kwargs)`` understands: Hub access and HF's
``ignore_mismatched_sizes``. HF PEFT's accelerate offload keywords (``device_map``,
``max_memory``, ``offload_folder``, ``offload_dir``, ``offload_index``) are not supported."""
_BATCH_ARGS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "x")


class PeftModel(nn.Module):
    """A model with adapters, as HF PEFT's ``PeftModel``."""

    task_modules_to_save: tuple[str, ...] = ()
    """Modules every adapter of this task trains and saves in full (the classifier head)."""

    pipeline_tag: str | None = None
    """The model card's ``pipeline_tag`` for this task (HF PEFT writes one for causal LMs only)."""

    _host: AdapterHost
    """What owns the adapters (kept in the instance ``__dict__``, not as a sub-module: a tuner host
    is also ``base_model``)."""

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        registry = get_registry()
        record = registry.method_for_config(peft_config)
        self._add_task_modules(peft_config)
        self._attach(registry.create_host(record, model, peft_config, adapter_name))
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = {"adapter_names"}
        self._adapters_disabled = False
        cast_adapter_dtype(self.get_base_model(), adapter_name, autocast_adapter_dtype)
        if _gradient_checkpointing(model):
            self.prepare_model_for_gradient_checkpointing(model)
        if hasattr(getattr(model, "config", None), "pretraining_tp"):
            model.config.pretraining_tp = 1  # as HF PEFT: no simulated tensor parallelism under adapters

    def _attach(self, host: AdapterHost) -> None:
        object.__setattr__(self, "_host", host)
        host.attach(self)

    # ---- attribute plumbing -------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self._host.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self._host.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self._host.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False inside ``disable_adapter()``; as HF PEFT, also True when no adapter is active."""
        return not self._adapters_disabled or not self.active_adapters

    @property
    def modules_to_save(self) -> set[str] | None:
        """Every adapter's ``modules_to_save`` together, or None when there are none."""
        modules: set[str] = set()
        for config in self.peft_config.values():
            modules.update(getattr(config, "modules_to_save", None) or ())
        return modules or None

    @property
    def base_model_torch_dtype(self) -> Any:
        return getattr(self.base_model, "dtype", None)

    def get_base_model(self) -> nn.Module:
        return self._host.plain_model

    def _add_task_modules(self, config: PeftConfig) -> None:
        """The task's head joins ``modules_to_save``, for configs that have that field (as an
        argument: Trainable Tokens, like HF's, has none and leaves the head alone)."""
        field = attrs.fields_dict(type(config)).get("modules_to_save") if attrs.has(type(config)) else None
        if self.task_modules_to_save and field is not None and field.init:
            current = list(config.modules_to_save or [])
            config.modules_to_save = current + [m for m in self.task_modules_to_save if m not in current]

    # ---- forward ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _routing(self, adapter_names: Sequence[str] | None, args: tuple, kwargs: dict) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        self._check_adapter_names(adapter_names, args, kwargs)
        with routed(list(adapter_names)):
            yield

    def _check_adapter_names(self, adapter_names: Sequence[str], args: tuple, kwargs: dict) -> None:
        if self.training:
            raise MixedBatchError("adapter_names (mixed batches) are for inference: call model.eval() first.")
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise MixedBatchError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}")
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise MixedBatchError(
                f"adapter_names has unknown adapter(s) {unknown}; loaded adapters: {sorted(self.peft_config)} "
                f"(use {BASE_ADAPTER!r} for rows without adapter)."
            )
        batch = _batch_size(args, kwargs)
        if batch is not None and batch != len(adapter_names):
            raise MixedBatchError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows; pass one name per row."
            )
        if any(layer.merged for layer in self._adapter_layers()):
            raise MixedBatchError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first.")

    @torch.compiler.disable
    def _publish_compiled(self, adapter_names: Sequence[str] | None, args: tuple, kwargs: dict) -> bool:
        """While Dynamo traces: publish the rows' adapters as a tensor (see :mod:`peft_kernel.compiled`);
        runs eagerly before the graph on every call. ``False``: the eager paths run instead."""
        if adapter_names is not None:
            self._check_adapter_names(adapter_names, args, kwargs)
        serves = getattr(self._host, "serves_compiled", None)  # optional in the host protocol
        if serves is None or not serves(kwargs):
            return False
        from peft_kernel.layer import AdapterLayer, walk_modules
        from peft_kernel.modules_to_save import ModulesToSaveWrapper

        modules = [m for _, m in walk_modules(self.get_base_model(), stop=(AdapterLayer, ModulesToSaveWrapper))]
        if any(isinstance(m, ModulesToSaveWrapper) for m in modules):  # routes rows through Python state
            return False
        layers = [m for m in modules if isinstance(m, AdapterLayer)]
        inputs = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        device = inputs[0].device if inputs else layers[0].weight.device if layers else torch.device("cpu")
        return compiled.publish(layers, list(self.peft_config), adapter_names, self.active_adapters, device)

    def _adapter_layers(self) -> Iterator[Any]:
        from peft_kernel.layer import adapter_layers

        return (layer for _, layer in adapter_layers(self.get_base_model()))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; ``adapter_names=[...]`` serves one adapter per row."""
        return self._serve(args, kwargs)

    def _serve(self, args: tuple, kwargs: dict) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        if torch.compiler.is_compiling() and self._publish_compiled(adapter_names, args, kwargs):
            return self._host.serve_compiled(args, kwargs)
        with self._routing(adapter_names, args, kwargs):
            return self._host.serve(args, kwargs, adapter_names)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``generate``; ``adapter_names=[...]`` serves one adapter per row."""
        adapter_names = kwargs.pop("adapter_names", None)
        with self._routing(adapter_names, args, kwargs):
            return self._host.serve_generate(args, kwargs, adapter_names)

    # ---- adapters -----------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a freshly initialised adapter (it does not become active). With
        ``autocast_adapter_dtype`` its float16/bfloat16 tensors are upcast to float32.
        ``low_cpu_mem_usage`` is accepted for HF compatibility; adapters are always built in place."""
        self._add_task_modules(peft_config)
        self._host.add_adapter(adapter_name, peft_config)
        cast_adapter_dtype(self.get_base_model(), adapter_name, autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter, trainable unless ``inference_mode=True`` (HF PEFT's rule,
        whatever the adapter's config says). Prompt-learning methods only switch the active adapter."""
        self._host.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters on or off (not for prompt-learning methods, as in HF PEFT)."""
        self._host.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def get_layer_status(self) -> list[Any]:
        """One :class:`~peft_kernel.status.TunerLayerStatus` per adapter layer (HF PEFT's)."""
        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """The model's :class:`~peft_kernel.status.TunerModelStatus` (HF PEFT's)."""
        return get_model_status(self)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether the adapters could be converted to LoRA (additive methods); False for prompt learning."""
        return self._host.supports_lora_conversion()

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make the input embeddings' output require grad, so gradient checkpointing works with a
        frozen base (HF PEFT's step; skipped for quantized models)."""
        if any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            return model
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(_output_requires_grad)
        return model

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None, max_cache_len: int | None = None) -> Any:
        """Prompt learning: the active adapter's virtual tokens for a batch — ``[batch, n, dim]``
        embeddings, or for a key/value prefix the transformers ``Cache`` holding it."""
        return self._prompt_api("get_prompt")(batch_size, task_ids=task_ids, max_cache_len=max_cache_len)

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """Prompt learning: the tensor saved as ``prompt_embeddings`` for ``adapter_name``."""
        return self._prompt_api("get_prompt_embedding_to_save")(adapter_name)

    def _prompt_api(self, operation: str) -> Any:
        """The host's implementation of one of HF PEFT's prompt-learning methods (hosts of
        virtual-token methods have them, tuners do not)."""
        if not callable(getattr(type(self._host), operation, None)):
            raise TypeError(f"{operation}() is for prompt-learning methods; this model's adapters live in its layers.")
        return getattr(self._host, operation)

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write or update ``README.md`` in ``output_dir`` as HF PEFT does (library, tags, base model)."""
        update_model_card(self, output_dir, pipeline_tag=self.pipeline_tag)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ) -> Any:
        """Save the adapters and upload them to the Hub repo ``repo_id`` (created if missing), as
        transformers' ``push_to_hub`` does for HF PEFT. ``max_shard_size`` is accepted and unused:
        adapter checkpoints are one file. Returns the ``CommitInfo``."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            self.create_or_update_model_card(folder)
            if tags:
                from huggingface_hub import ModelCard

                card = ModelCard.load(os.path.join(folder, "README.md"))
                card.data.tags = sorted({*(card.data.tags or []), *tags})
                card.save(os.path.join(folder, "README.md"))
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload model",
                commit_description=commit_description, token=token, revision=revision, create_pr=create_pr,
            )

    def delete_adapter(self, adapter_name: str) -> None:
        self._host.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes as the base model."""
        was_disabled = self._adapters_disabled
        try:
            with self._host.disable_adapter():
                self._adapters_disabled = True
                yield
        finally:
            self._adapters_disabled = was_disabled

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._host.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._host.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        return self._host.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self._host.unload()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counting bitsandbytes 4-bit and DeepSpeed ZeRO-3 tensors as HF PEFT."""
        trainable = total = 0
        for param in self.parameters():
            count = param_count(param)
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- save / load --------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as HF PEFT does: ``default`` at the root, others in sub-folders.

        The arguments are HF PEFT's. ``state_dict=`` (the only extra keyword HF PEFT reads; the
        Trainer passes it under FSDP/DeepSpeed) is a full model state dict to take the adapter's
        tensors from instead of the live model, filtered to the adapter's keys as HF PEFT does.
        ``path_initial_model_for_weight_conversion`` names the folder where the adapter was saved
        right after a base-changing initialisation (PiSSA, OLoRA); the adapter is then written so
        that it applies to the original base model (the method plugin's
        ``peft_kernel_convert_for_original_base``). Any other keyword raises ``TypeError``.
        """
        state_dict = _save_pretrained_kwargs(kwargs)
        names = self._adapters_to_save(selected_adapters)
        check_save_target(save_directory, names)  # a file in the way fails here, before any write
        if not is_main_process:
            return
        initial = None
        if path_initial_model_for_weight_conversion is not None:
            initial = load_adapter_weights(path_initial_model_for_weight_conversion)
        with staged_checkpoint(save_directory) as stage:  # the whole checkpoint is swapped in at once
            for name in names:
                save_adapter(self, name, adapter_dir(stage, name), safe_serialization=safe_serialization,
                             state_dict=state_dict, save_embedding_layers=save_embedding_layers, initial=initial)

    def _adapters_to_save(self, selected_adapters: list[str] | None) -> list[str]:
        """``selected_adapters`` (every adapter when ``None``), each checked to exist."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterNameError(f"unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)}.")
        return names

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load adapter ``adapter_name`` from a saved folder or Hub id (a new name is added, an existing one
        overwritten). A transaction: on any error the model is left exactly as it was.

        ``kwargs``: Hub access (``revision``, ``cache_dir``, ``token``, ``local_files_only``,
        ``subfolder``, ``use_auth_token``) and ``ignore_mismatched_sizes``; anything else is a
        ``TypeError``. ``key_mapping`` renames checkpoint keys (regex → replacement) as HF PEFT's.
        ``ephemeral_gpu_offload`` and ``low_cpu_mem_usage`` are accepted and change nothing here.
        ``allow_pickle=True`` is needed to read an ``adapter_model.bin``."""
        from peft_kernel.peft_weights import load_peft_weights

        hub, subfolder, ignore_mismatched_sizes = _load_kwargs(kwargs, "load_adapter")
        added = adapter_name not in self.peft_config
        # read and check everything first: a bad file fails here, before the model is touched
        if added:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub)
            if config.is_prompt_learning and is_trainable:
                raise ValueError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
            config.inference_mode = not is_trainable
        weights = load_peft_weights(model_id, device=torch_device or "cpu", key_mapping=key_mapping,
                                    allow_pickle=allow_pickle, subfolder=subfolder, **hub)
        with load_transaction(self, adapter_name):  # any failure below gives the model back as it was
            if added:
                self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
                if is_trainable:
                    self.set_requires_grad(adapter_name)  # HF PEFT: a new inactive adapter loaded to train gets gradients
            result = set_peft_model_state_dict(self, weights, adapter_name=adapter_name,
                                               ignore_mismatched_sizes=ignore_mismatched_sizes)
        if result.missing_keys:
            warnings.warn(f"Found missing adapter keys while loading the checkpoint: {result.missing_keys}", stacklevel=2)
        self._host.settle_loaded(adapter_name)  # e.g. re-apply trainability with the loaded config
        cast_adapter_dtype(self.get_base_model(), adapter_name, autocast_adapter_dtype)
        if not is_trainable and self.training:
            self.eval()  # an eval-mode model already put the new adapter's modules in eval mode
        return result

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved at ``model_id`` (a folder or a Hub repo id).

        ``kwargs`` are those of :meth:`load_adapter` (plus its ``torch_device``); unknown ones raise ``TypeError``."""
        torch_device = kwargs.pop("torch_device", None)
        hub, subfolder, _ = _load_kwargs(kwargs, "from_pretrained")
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub)
        config.inference_mode = not is_trainable
        target_cls = TASK_CLASSES.get(config.task_type, cls) if cls is PeftModel else cls
        return wrap_and_load(
            model,
            lambda: target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage),
            lambda peft_model: peft_model.load_adapter(
                model_id, adapter_name, is_trainable=is_trainable, torch_device=torch_device,
                autocast_adapter_dtype=autocast_adapter_dtype, ephemeral_gpu_offload=ephemeral_gpu_offload,
                low_cpu_mem_usage=low_cpu_mem_usage, key_mapping=key_mapping, allow_pickle=allow_pickle, **kwargs),
        )


def _load_kwargs(kwargs: dict[str, Any], method: str) -> tuple[dict[str, Any], str | None, bool]:
    """Split ``load_adapter`` / ``from_pretrained`` keyword arguments into Hub keywords, the
    subfolder and ``ignore_mismatched_sizes``; unknown ones are a ``TypeError`` (HF PEFT drops them)."""
    unknown = [k for k in kwargs if k not in _LOAD_KWARGS]
    if unknown:
        raise TypeError(
            f"PeftModel.{method}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"besides its named parameters it accepts {', '.join(_LOAD_KWARGS)}."
        )
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    if kwargs.get("use_auth_token") is not None:
        hub.setdefault("token", kwargs["use_auth_token"])
    return hub, kwargs.get("subfolder"), bool(kwargs.get("ignore_mismatched_sizes", False))


def _gradient_checkpointing(model: nn.Module) -> bool:
    """HF PEFT's test ``getattr(model, "is_gradient_checkpointing", True)``, without the deprecation
    warning transformers 5 attaches to that name."""
    if hasattr(type(model), "is_activation_checkpointing"):  # transformers >= 5: the current name
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", True))


def _output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in (*args, *(kwargs.get(k) for k in _BATCH_ARGS)):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


_SAVE_PRETRAINED_EXTRA_KWARGS = ("state_dict",)


def _save_pretrained_kwargs(kwargs: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The ``state_dict`` keyword of ``save_pretrained``; any other keyword is a ``TypeError`` (HF
    PEFT silently ignores them, which saves a wrong adapter when a keyword is misspelt or retired)."""
    unknown = [k for k in kwargs if k not in _SAVE_PRETRAINED_EXTRA_KWARGS]
    if unknown:
        hint = ""
        if "convert_pissa_to_lora" in unknown:
            hint = " (HF PEFT renamed it: pass path_initial_model_for_weight_conversion=<folder of the initial adapter>)"
        raise TypeError(
            f"PeftModel.save_pretrained() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}{hint}; "
            "it accepts safe_serialization, selected_adapters, save_embedding_layers, is_main_process, "
            "path_initial_model_for_weight_conversion and state_dict."
        )
    return kwargs.get("state_dict")


_TASK_INIT_KWARGS = ("autocast_adapter_dtype", "low_cpu_mem_usage")


def _task_init(peft_model: PeftModel, model: nn.Module, peft_config: PeftConfig | None, adapter_name: str,
               kwargs: dict[str, Any]) -> None:
    """The task classes' ``__init__(model, peft_config, adapter_name="default", **kwargs)`` (HF's
    signature): ``kwargs`` are ``PeftModel``'s ``autocast_adapter_dtype`` / ``low_cpu_mem_usage``."""
    unknown = [k for k in kwargs if k not in _TASK_INIT_KWARGS]
    if unknown:
        raise TypeError(f"{type(peft_model).__name__}() got unexpected keyword argument(s) "
                        f"{', '.join(map(repr, unknown))}; it accepts {', '.join(_TASK_INIT_KWARGS)}.")
    if peft_config is None:
        raise TypeError(f"{type(peft_model).__name__}() needs a peft_config.")
    PeftModel.__init__(peft_model, model, peft_config, adapter_name, **kwargs)


def _named_call(peft_model: PeftModel, named: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """Forward of a task class: HF's named parameters that were given, plus the other keywords.
    ``task_ids`` (one task per row) go on to hosts that declare ``takes_task_ids`` and are dropped for
    the others, as HF PEFT drops them for methods without tasks."""
    if not getattr(peft_model._host, "takes_task_ids", False):
        named.pop("task_ids", None)
    call = {k: v for k, v in named.items() if v is not None}
    call.update(kwargs)
    return peft_model._serve((), call)


class PeftModelForCausalLM(PeftModel):
    """Causal language models."""

    pipeline_tag = "text-generation"

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any) -> None:
        _task_init(self, model, peft_config, adapter_name, kwargs)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _named_call(self, dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                      labels=labels, output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states, return_dict=return_dict,
                                      task_ids=task_ids), kwargs)

    def generate(self, *args, **kwargs):
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args, task_ids: torch.Tensor | None = None, **kwargs):
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder models."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any) -> None:
        _task_init(self, model, peft_config, adapter_name, kwargs)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _named_call(self, dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                      decoder_input_ids=decoder_input_ids,
                                      decoder_attention_mask=decoder_attention_mask,
                                      decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                                      output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                      return_dict=return_dict, task_ids=task_ids), kwargs)

    def generate(self, **kwargs):
        return super().generate(**kwargs)

    def prepare_inputs_for_generation(self, *args, task_ids: torch.Tensor = None, **kwargs):
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification: the classifier head is trained and saved in full."""

    task_modules_to_save = ("classifier", "score")

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any) -> None:
        _task_init(self, model, peft_config, adapter_name, kwargs)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _named_call(self, dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                      labels=labels, output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states, return_dict=return_dict,
                                      task_ids=task_ids), kwargs)


class PeftModelForTokenClassification(PeftModel):
    """Token classification: the classifier head is trained and saved in full."""

    task_modules_to_save = ("classifier", "score")

    def __init__(self, model: nn.Module, peft_config: PeftConfig | None = None, adapter_name: str = "default", **kwargs: Any) -> None:
        _task_init(self, model, peft_config, adapter_name, kwargs)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _named_call(self, dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                      labels=labels, output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states, return_dict=return_dict,
                                      task_ids=task_ids), kwargs)


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive question answering: the span head is trained and saved in full."""

    task_modules_to_save = ("qa_outputs",)

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any) -> None:
        _task_init(self, model, peft_config, adapter_name, kwargs)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, task_ids=None, **kwargs):
        return _named_call(self, dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                      position_ids=position_ids, inputs_embeds=inputs_embeds,
                                      start_positions=start_positions, end_positions=end_positions,
                                      output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                      return_dict=return_dict, task_ids=task_ids), kwargs)


class PeftModelForFeatureExtraction(PeftModel):
    """Feature extraction / embeddings."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any) -> None:
        _task_init(self, model, peft_config, adapter_name, kwargs)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _named_call(self, dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                      output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                      return_dict=return_dict, task_ids=task_ids), kwargs)


TASK_CLASSES: dict[Any, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}
