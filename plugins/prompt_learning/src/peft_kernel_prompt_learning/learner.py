"""The torch side of prompt learning: :class:`PromptEncoder` (what method plugins build) and
:class:`PromptLearner` (the adapter host of a ``PeftModel`` of a prompt-learning method). The
mechanism is described in :mod:`peft_kernel_prompt_learning.config`."""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import torch
from torch import nn

from peft_kernel.plugin_api import (
    BASE_ADAPTER,
    AdapterNameError,
    CheckpointError,
    ConfigError,
    LoadResult,
    MixedBatchError,
    ModulesToSaveWrapper,
    PeftConfig,
    TaskType,
    check_adapter_name,
    get_registry,
    replace_with_base,
    wrap_modules_to_save,
)
from peft_kernel_prompt_learning.config import EXTRA_PREFIX, SAVED_KEY, PromptLearningConfig, fill_config, text_config_of

if TYPE_CHECKING:  # pragma: no cover
    from peft_kernel.plugin_api import MethodRecord

_ARG_NAMES = ("input_ids", "attention_mask", "inputs_embeds", "labels")
"""HF PEFT's positional order of the task forwards."""


class PromptEncoder(nn.Module):
    """The per-adapter module of a prompt-learning method.

    ``forward()`` takes no input and returns the adapter's virtual tokens,
    ``[total_virtual_tokens, width]``: ``width`` is ``token_dim`` for ``"inputs_embeds"`` injection and
    ``num_layers * 2 * token_dim`` for ``"past_key_values"``. The core saves ``saved_prompt()`` as
    ``prompt_embeddings`` and hands that tensor back to ``load_saved_prompt`` when loading.
    Subclasses usually hold an ``embedding`` (``nn.Embedding``) as HF PEFT's encoders do, and
    override ``load_saved_prompt`` when their trainable form differs from the saved one.

    An encoder that sets ``takes_task_ids`` computes different virtual tokens per task:
    ``forward(task_ids)`` takes one task id per batch row (a long tensor, or ``None`` when the caller
    gave none) and returns ``[rows, total_virtual_tokens, width]``.

    An encoder that sets ``computes_loss`` replaces the base model's loss with its :meth:`loss`
    (for ``"inputs_embeds"`` injection); the forward keywords named in ``loss_inputs`` go to it
    instead of the base model.
    """

    takes_task_ids: ClassVar[bool] = False
    """Whether ``forward`` takes the rows' ``task_ids`` (what ``forward``/``generate`` were given)."""

    computes_loss: ClassVar[bool] = False
    """Whether the training loss is the encoder's :meth:`loss` instead of the base model's."""

    loss_inputs: ClassVar[tuple[str, ...]] = ()
    """Forward keywords :meth:`loss` reads; they are taken out before the base model runs."""

    prompts_decoder: ClassVar[bool] = False
    """On an encoder-decoder (``"inputs_embeds"`` injection): whether the virtual tokens after the
    encoder's ``num_virtual_tokens`` (the second submodule's share) go in front of the *decoder's*
    input embeddings too, in ``forward`` and ``generate``, with ``-100`` in front of the labels and
    ones in front of ``decoder_attention_mask``. Off by default: that share is learned but unused,
    as HF PEFT does for most methods."""

    def forward(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **inputs: Any) -> torch.Tensor:  # pragma: no cover
        """With ``computes_loss``: the loss from the logits over the virtual tokens and the input
        (``[batch, n + length, vocab]``), the input's ``labels`` (``[batch, length]``) and the
        ``loss_inputs`` the forward was given."""
        raise NotImplementedError

    def saved_prompt(self) -> torch.Tensor:
        return self().detach()

    def top_level_tensors(self) -> dict[str, torch.Tensor]:
        """Live trainable tensors saved under their own top-level keys next to ``prompt_embeddings``
        and loaded back into in place (HF PEFT's format for encoders with further learned tensors,
        such as per-task factors); the learner checks their shapes. None by default."""
        return {}

    def saved_extras(self) -> dict[str, torch.Tensor]:
        """Tensors saved next to ``prompt_embeddings`` under ``prompt_encoder.<name>`` (HF PEFT's
        loader ignores them): what it takes to resume training, for encoders whose trainable form
        is not their output (P-tuning's ``save_encoder``). None by default."""
        return {}

    def load_checkpoint(self, prompt: torch.Tensor, extras: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's ``prompt_embeddings`` and its ``prompt_encoder.*`` tensors (prefix
        removed). Encoders without extras refuse them; validate everything before changing anything."""
        if extras:
            raise CheckpointError(f"{type(self).__name__} saves no encoder tensors; the checkpoint has "
                                  f"{sorted(EXTRA_PREFIX + k for k in extras)[:8]}.")
        self.load_saved_prompt(prompt)

    def load_saved_prompt(self, tensor: torch.Tensor) -> None:
        weight = getattr(getattr(self, "embedding", None), "weight", None)
        if weight is None:
            raise CheckpointError(f"{type(self).__name__} has no `embedding` to load {SAVED_KEY!r} into.")
        if tuple(tensor.shape) != tuple(weight.shape):
            raise CheckpointError(
                f"{SAVED_KEY!r} has shape {tuple(tensor.shape)} but the adapter expects {tuple(weight.shape)}: "
                "was it saved for another base model or another num_virtual_tokens?"
            )
        with torch.no_grad():
            weight.copy_(tensor.to(device=weight.device, dtype=weight.dtype))


def word_embeddings_of(model: nn.Module) -> nn.Module:
    """The base model's input embedding module."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is not None:
        try:
            module = getter()
        except Exception:
            module = None
        if module is not None:
            return module
    vocab = getattr(text_config_of(model), "vocab_size", None)
    for module in model.modules():
        if isinstance(module, nn.Embedding) and (vocab is None or module.num_embeddings == vocab):
            return module
    raise ValueError(f"cannot find the input embeddings of {type(model).__name__}; prompt learning needs them.")


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder-decoder (T5, BART): its config says ``is_encoder_decoder``."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def prefix_to_cache(prompts: torch.Tensor, config: PromptLearningConfig, model_config: Any, cache: Any = None) -> Any:
    """Turn ``[batch, n, num_layers * 2 * token_dim]`` virtual tokens into a transformers ``Cache``
    holding a key/value prefix of length ``n`` in every layer (filled into ``cache`` when given).

    HF PEFT's layout: the ``2 * num_layers`` key/value blocks are repeated once per transformer
    submodule and grouped ``2 * num_transformer_submodules`` to a layer, of which a layer's
    self-attention takes the first two. With one submodule that is simply (key, value) of layer
    ``l`` at blocks ``2l, 2l + 1``. With two (encoder-decoder models) layer ``l`` reads blocks
    ``4l, 4l + 1`` modulo ``2 * num_layers``, and the prefix goes into the *decoder's*
    self-attention only: under transformers 5 HF PEFT leaves the cross-attention half empty (computed
    from the encoder as usual) and the encoder without a prefix. The cache is then an
    ``EncoderDecoderCache`` (``cache`` may be one, whose self-attention part is filled)."""
    from transformers import DynamicCache, EncoderDecoderCache

    batch, n, width = prompts.shape
    heads, layers = config.num_attention_heads, config.num_layers
    if width != layers * 2 * config.token_dim or config.token_dim % heads:
        raise ConfigError(
            f"virtual tokens of width {width} cannot be split into {layers} layers x (key, value) x "
            f"{heads} heads of token_dim {config.token_dim}; check num_layers / token_dim / num_attention_heads."
        )
    kv = prompts.reshape(batch, n, layers * 2, heads, config.token_dim // heads).permute(2, 0, 3, 1, 4)
    group = 2 * (config.num_transformer_submodules or 1)

    def new_cache() -> Any:
        return DynamicCache(config=model_config) if model_config is not None else DynamicCache()

    encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
    if cache is None:
        cache = EncoderDecoderCache(new_cache(), DynamicCache()) if encoder_decoder else new_cache()
    target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for layer in range(layers):
        first = (group * layer) % (2 * layers)
        target.update(kv[first], kv[first + 1], layer)
    return cache


CACHE_KWARGS = ("cache", "past_key_values")
"""The keywords transformers has used for the key/value cache: ``cache`` from 5.24 on (where
``past_key_values`` is deprecated and loses to ``cache`` when both are given), ``past_key_values`` before."""


def _named_params(module: nn.Module) -> tuple[set[str], bool]:
    """The keyword names ``module.forward`` declares, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set(), True
    return set(params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@functools.lru_cache(maxsize=None)
def _library_cache_kwarg() -> str:
    from transformers import GenerationMixin

    names = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in names else "past_key_values"


def cache_kwarg(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its key/value cache under: the one it declares, else the
    installed transformers' own (``cache`` from 5.24 on, ``past_key_values`` before)."""
    names, _ = _named_params(model)
    return next((name for name in CACHE_KWARGS if name in names), None) or _library_cache_kwarg()


def _cache_entry(model: nn.Module) -> tuple[nn.Module, str]:
    """Where a key/value prefix enters ``model``: the model itself when its forward takes the cache
    (by name, else through ``**kwargs``), or else its backbone (``base_model_prefix``, e.g. ``bert``
    under a sequence-classification head whose forward takes no cache in older transformers)."""
    names, var_kw = _named_params(model)
    if any(name in names for name in CACHE_KWARGS):
        return model, cache_kwarg(model)
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    if isinstance(backbone, nn.Module) and backbone is not model:
        inner, inner_kw = _named_params(backbone)
        if any(name in inner for name in CACHE_KWARGS):
            return backbone, cache_kwarg(backbone)
    if var_kw:
        return model, _library_cache_kwarg()
    raise NotImplementedError(
        f"{type(model).__name__} takes no key/value cache (neither its forward nor its backbone's), which "
        "prefix tuning needs to inject its prefix."
    )


@contextlib.contextmanager
def _cache_into(module: nn.Module, key: str, cache: Any) -> Iterator[None]:
    """Hand ``cache`` to ``module``'s forward as ``key`` for the duration of the block."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for name in CACHE_KWARGS:
            kwargs.pop(name, None)
        kwargs[key] = cache
        return args, kwargs

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def check_fits_model(config: PromptLearningConfig, model: nn.Module, injection: str, word_embeddings: nn.Module) -> None:
    """Refuse, when the adapter is created or loaded, virtual tokens that cannot fit the model's
    forward: a width other than the embeddings' (``inputs_embeds``), or a key/value prefix whose
    layers, heads or head size differ from the model's attention cache (``past_key_values``)."""
    owner = type(config).__name__
    if injection == "inputs_embeds":
        width = getattr(getattr(word_embeddings, "weight", None), "shape", (None,))[-1]
        if width is not None and config.token_dim != width:
            raise ConfigError(f"{owner}.token_dim is {config.token_dim} but the model's input embeddings are {width} wide.")
        return
    heads, dim = config.num_attention_heads, config.token_dim
    if dim % heads:
        raise ConfigError(f"{owner}: token_dim {dim} cannot be split into num_attention_heads {heads} heads.")
    mc = text_config_of(model)

    def first(*names: str) -> Any:
        return next((getattr(mc, n) for n in names if isinstance(getattr(mc, n, None), int)), None)

    layers = first("num_hidden_layers", "num_layers", "n_layer")
    model_heads = first("num_attention_heads", "n_head", "num_heads")
    kv_heads = first("num_key_value_heads") or model_heads
    hidden = first("hidden_size", "n_embd", "d_model")
    head_dim = first("head_dim") or (hidden // model_heads if hidden and model_heads else None)
    if layers is not None and config.num_layers != layers:
        raise ConfigError(f"{owner}.num_layers is {config.num_layers} but the model has {layers} layers.")
    if is_encoder_decoder(model):
        _check_fits_decoder(config, first("num_decoder_layers", "decoder_layers"))
    if kv_heads and head_dim and (heads, dim // heads) != (kv_heads, head_dim):
        raise ConfigError(
            f"{owner}: a prefix of num_attention_heads={heads} x {dim // heads} (token_dim={dim}) does not fit the "
            f"model's key/value cache of {kv_heads} heads x {head_dim}; leave num_attention_heads and token_dim "
            "unset to take them from the model."
        )


def _check_fits_decoder(config: PromptLearningConfig, decoder_layers: int | None) -> None:
    """A key/value prefix on an encoder-decoder goes to the decoder's self-attention, one layer per
    ``num_layers`` (see :func:`prefix_to_cache`), and only in HF PEFT's two-submodule layout: with
    ``num_transformer_submodules=1`` HF PEFT hands the model a plain cache that transformers 5 also
    fills with the cross-attention's keys, so the decoder attends to its own tokens there; refused."""
    owner = type(config).__name__
    if decoder_layers is not None and decoder_layers != config.num_layers:
        raise ConfigError(f"{owner}.num_layers is {config.num_layers} but the model's decoder has {decoder_layers} "
                          "layers; a prefix needs one per decoder layer.")
    if config.num_transformer_submodules != 2:
        raise ConfigError(f"{owner}.num_transformer_submodules must be 2 on an encoder-decoder model (got "
                          f"{config.num_transformer_submodules}); leave it unset to have it filled.")


# ---- the engine behind PeftModel for prompt-learning methods -----------------------------------
class PromptLearner:
    """Adapter bookkeeping, forward and generate of a ``PeftModel`` whose method learns prompts:
    its adapter host (:class:`peft_kernel.host.AdapterHost`), built by this family's
    ``peft_kernel_create_host`` for records with the ``prompt_learning`` capability.

    It takes ``task_ids`` (one per row) in ``forward``/``generate`` and hands them to encoders that
    declare ``takes_task_ids``; other encoders ignore them, as HF PEFT does.

    Not a module: :meth:`attach` gives the ``PeftModel`` the pieces users see in HF PEFT:
    ``base_model`` (the transformers model itself), ``prompt_encoder`` (an ``nn.ModuleDict`` of
    :class:`PromptEncoder` per adapter), ``prompt_tokens`` and ``word_embeddings``.
    """

    takes_task_ids = True
    """Read by ``PeftModel``'s task classes: hand ``task_ids`` on to :meth:`serve` instead of dropping them."""

    def __init__(self, record: MethodRecord, model: nn.Module) -> None:
        self.record = record
        self.base = model
        self.configs: dict[str, PromptLearningConfig] = {}
        self.active: str | None = None
        self.disabled = False
        self._grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.encoders = nn.ModuleDict()
        self.tokens: dict[str, torch.Tensor] = {}
        self.word_embeddings = word_embeddings_of(model)

    @property
    def injection(self) -> str:
        return self.record.config_class.prompt_injection

    # ---- the adapter-host protocol (peft_kernel.host.AdapterHost) -----------------------------
    def attach(self, peft_model: nn.Module) -> None:
        peft_model.base_model = self.base  # as in HF PEFT: the transformers model itself
        peft_model.prompt_encoder = self.encoders
        object.__setattr__(peft_model, "prompt_tokens", self.tokens)
        object.__setattr__(peft_model, "word_embeddings", self.word_embeddings)

    @property
    def plain_model(self) -> nn.Module:
        return self.base

    @property
    def peft_config(self) -> dict[str, PromptLearningConfig]:
        return self.configs

    @property
    def active_adapter(self) -> str | None:
        return self.active

    @property
    def active_adapters(self) -> list[str]:
        return [self.active] if self.active is not None else []

    def _cannot_fold(self, operation: str) -> NotImplementedError:
        return NotImplementedError(
            f"{operation}() needs adapters inside layers; {self.record.peft_type} adds virtual tokens instead, "
            "which cannot be merged into the base weights. Use get_base_model() for the plain model."
        )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise self._cannot_fold("merge_adapter")

    def unmerge_adapter(self) -> None:
        raise self._cannot_fold("unmerge_adapter")

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        raise self._cannot_fold("merge_and_unload")

    def unload(self) -> nn.Module:
        raise self._cannot_fold("unload")

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        peft_type = self.configs[self.active].peft_type if self.active in self.configs else self.record.peft_type
        raise TypeError(
            "Setting `requires_grad` is not supported for prompt learning methods like "
            f"{getattr(peft_type, 'value', peft_type)}."
        )

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def settle_loaded(self, adapter_name: str) -> None:
        """Nothing to re-apply: virtual-token adapters are frozen when loaded for inference."""

    # ---- HF PEFT's prompt-learning API (PeftModel delegates) -----------------------------------
    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None, max_cache_len: int | None = None) -> Any:
        prompts, config = self.prompts(batch_size, task_ids=task_ids)
        if self.injection != "past_key_values":
            return prompts
        return prefix_to_cache(prompts.to(_float_dtype(self.base)), config, getattr(self.base, "config", None))

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        return self.encoders[adapter_name].saved_prompt().detach().cpu()

    # ---- lifecycle --------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        registry = get_registry()
        check_adapter_name(adapter_name, self.configs, registry)
        record = registry.method_for_config(config)
        if record.peft_type != self.record.peft_type:
            raise AdapterNameError(
                f"this model holds {self.record.peft_type} adapters; a {record.peft_type} adapter cannot join "
                "them in one model."
            )
        if not isinstance(config, PromptLearningConfig):
            raise ConfigError(f"{type(config).__name__} must subclass peft_kernel_prompt_learning.PromptLearningConfig.")
        fill_config(config, self.base)
        config.check_ready()
        check_fits_model(config, self.base, self.injection, self.word_embeddings)
        encoder = registry.call_hook("peft_kernel_create_prompt_encoder", {
            "config": config, "adapter_name": adapter_name, "model": self.base, "word_embeddings": self.word_embeddings,
        })
        if encoder is None:
            raise NotImplementedError(f"no installed plugin builds a prompt encoder for {type(config).__name__}.")
        if not isinstance(encoder, PromptEncoder):
            raise TypeError(f"peft_kernel_create_prompt_encoder returned {type(encoder).__name__}, expected a PromptEncoder.")
        device = self.word_embeddings.weight.device
        self.encoders[adapter_name] = encoder.to(device).train(self.encoders.training)
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.tokens[adapter_name] = torch.arange(total).long()
        wrap_modules_to_save(self.base, config.modules_to_save, adapter_name)
        self.configs[adapter_name] = config
        if self.active is None:
            self.active = adapter_name
        self._sync_heads()

    def _heads(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        """The ``modules_to_save`` copies (task heads such as SEQ_CLS's classifier) in the base model."""
        for path, module in self.base.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield path, module

    def _sync_heads(self) -> None:
        for _, head in self._heads():
            if self.active is not None:
                head.set_adapter(self.active)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Switch the active adapter (``inference_mode`` changes nothing: as in HF PEFT, prompt
        learning only switches which adapter serves)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise AdapterNameError(f"unknown adapter(s) {unknown}; this model has {sorted(self.configs)}.")
        if len(names) != 1:
            raise AdapterNameError(
                f"{self.record.peft_type} activates one adapter at a time (got {names}); to serve several in one "
                "batch pass adapter_names=[...] (one name per row) to forward/generate."
            )
        self.active = names[0]
        self._sync_heads()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.configs:
            raise AdapterNameError(f"unknown adapter {adapter_name!r}; this model has {sorted(self.configs)}.")
        del self.encoders[adapter_name]
        del self.tokens[adapter_name]
        del self.configs[adapter_name]
        for _, head in self._heads():
            head.delete_adapter(adapter_name)
        if self.active == adapter_name:
            self.active = next(iter(self.configs), None)
        self._sync_heads()

    def release(self) -> None:
        """Give the base model back as it came (used when loading fails)."""
        replace_with_base(self.base, keep_trained_copies=False)
        for name, p in self.base.named_parameters():
            p.requires_grad_(self._grad_flags.get(name, p.requires_grad))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        old, self.disabled = self.disabled, True
        for _, head in self._heads():
            head.enable_adapters(False)
        try:
            yield
        finally:
            self.disabled = old
            for _, head in self._heads():
                head.enable_adapters(not old)

    # ---- save / load ------------------------------------------------------------------------
    def _head_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """``{on-disk key: live tensor}`` of the adapter's head copies (``base_model.<module>.<param>``)."""
        out = {}
        for path, head in self._heads():
            if adapter_name in head.modules_to_save:
                for name, tensor in head.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                    out[f"base_model.{path}.{name}"] = tensor
        return out

    def saved_tensors(self, adapter_name: str, state_dict: dict[str, torch.Tensor] | None = None,
                      save_embedding_layers: str | bool = "auto") -> dict[str, torch.Tensor]:
        """``prompt_embeddings`` and the adapter's head copies (``state_dict`` and
        ``save_embedding_layers`` do not apply: there are no adapter layers)."""
        tensors = {k: v.detach().cpu() for k, v in self._head_tensors(adapter_name).items()}
        encoder = self.encoders[adapter_name]
        tensors[SAVED_KEY] = encoder.saved_prompt().detach().cpu()
        tensors.update({k: v.detach().cpu() for k, v in encoder.top_level_tensors().items()})
        tensors.update({EXTRA_PREFIX + k: v.detach().cpu() for k, v in encoder.saved_extras().items()})
        return tensors

    def load_tensors(self, tensors: dict[str, torch.Tensor], adapter_name: str,
                     ignore_mismatched_sizes: bool = False) -> LoadResult:
        heads = self._head_tensors(adapter_name)
        own = self.encoders[adapter_name].top_level_tensors()
        required = [SAVED_KEY, *own]
        unexpected = sorted(k for k in tensors if k not in required and k not in heads and not k.startswith(EXTRA_PREFIX))
        missing = [k for k in required if k not in tensors]
        if unexpected or missing:
            raise CheckpointError(
                f"a {self.record.peft_type} checkpoint holds {required} (and the adapter's modules_to_save "
                f"{sorted(heads) or 'none'}); got unexpected keys {unexpected[:8]}"
                f"{f' and none of {missing}' if missing else ''}."
            )
        live = {**heads, **own}
        for key, value in tensors.items():
            if key in live and tuple(value.shape) != tuple(live[key].shape):
                raise CheckpointError(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(live[key].shape)}.")
        extras = {k.removeprefix(EXTRA_PREFIX): v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
        self.encoders[adapter_name].load_checkpoint(tensors[SAVED_KEY], extras)
        with torch.no_grad():
            for key, value in tensors.items():
                if key in live:
                    live[key].copy_(value.to(device=live[key].device, dtype=live[key].dtype))
        return LoadResult(sorted(k for k in heads if k not in tensors), [])

    # ---- virtual tokens ---------------------------------------------------------------------
    def _row_adapters(self, batch: int, adapter_names: Sequence[str] | None) -> list[str]:
        if adapter_names is None:
            if self.active is None:
                raise AdapterNameError("this model has no adapter left; add one first.")
            return [self.active] * batch
        if batch % len(adapter_names):
            raise MixedBatchError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows; pass one name per row."
            )
        repeat = batch // len(adapter_names)
        rows = [name for name in adapter_names for _ in range(repeat)]
        if BASE_ADAPTER in rows:
            raise MixedBatchError(
                f"{self.record.peft_type} cannot mix {BASE_ADAPTER!r} rows with adapter rows: a row without virtual "
                "tokens has another sequence length. Run base rows in a separate call (or inside disable_adapter())."
            )
        counts = {n: self.configs[n].num_virtual_tokens for n in dict.fromkeys(rows)}
        totals = {n: len(self.tokens[n]) for n in counts}
        if len(set(counts.values())) > 1 or len(set(totals.values())) > 1:
            raise MixedBatchError(
                f"adapters in one mixed batch must have the same num_virtual_tokens and num_transformer_submodules; "
                f"got num_virtual_tokens {counts}, virtual tokens in all {totals}. "
                "Group rows by adapter length and run one call per group."
            )
        return rows

    def prompts(self, batch: int, adapter_names: Sequence[str] | None = None,
                task_ids: Any = None) -> tuple[torch.Tensor, PromptLearningConfig]:
        """``[batch, n, width]`` virtual tokens (each row from its adapter, and from its task for
        encoders that take ``task_ids``) and the config of row 0."""
        rows = self._row_adapters(batch, adapter_names)
        unique = list(dict.fromkeys(rows))
        device = self.word_embeddings.weight.device
        tasks = _row_task_ids(task_ids, batch, device)
        if len(unique) == 1:
            return self._virtual_tokens(unique[0], batch, tasks), self.configs[unique[0]]
        index = torch.tensor([unique.index(n) for n in rows], device=device)
        members = [torch.nonzero(index == i).squeeze(1) for i in range(len(unique))]
        parts = [self._virtual_tokens(name, len(m), None if tasks is None else tasks.index_select(0, m))
                 for name, m in zip(unique, members)]
        # rows were grouped by adapter: put them back in batch order
        order = torch.argsort(torch.cat(members))
        return torch.cat(parts).index_select(0, order), self.configs[unique[0]]

    def _virtual_tokens(self, adapter_name: str, rows: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        """``[rows, n, width]``: one adapter's virtual tokens for ``rows`` rows."""
        encoder = self.encoders[adapter_name]
        if encoder.takes_task_ids:
            return encoder(task_ids)
        prompt = encoder()
        return prompt.unsqueeze(0).expand(rows, *prompt.shape)

    # ---- forward ----------------------------------------------------------------------------
    def _task(self) -> Any:
        return self.configs[self.active].task_type if self.active in self.configs else None

    def serve(self, args: tuple, kwargs: dict, adapter_names: Sequence[str] | None) -> Any:
        if self.disabled:
            return self.base(*args, **kwargs)
        if len(args) > len(_ARG_NAMES):
            raise TypeError(f"pass at most {len(_ARG_NAMES)} positional arguments ({', '.join(_ARG_NAMES)}); use keywords.")
        for name, value in zip(_ARG_NAMES, args):
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            kwargs[name] = value
        input_ids = kwargs.pop("input_ids", None)
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        task_ids = kwargs.pop("task_ids", None)
        source = input_ids if input_ids is not None else inputs_embeds
        if source is None:
            raise ValueError("pass input_ids or inputs_embeds.")
        batch = source.shape[0]
        prompts, config = self.prompts(batch, adapter_names, task_ids)
        loss_owner, loss_inputs = self._loss_owner(batch, adapter_names, kwargs)
        own_labels = kwargs.pop("labels", None) if loss_owner is not None else None
        n = config.num_virtual_tokens
        self._drop_unsupported(kwargs, n, batch, source.device)
        mask = kwargs.get(self._mask_key)
        if mask is not None:
            kwargs[self._mask_key] = _prepend(mask, n, 1)
        if self.injection == "past_key_values":
            dtype = _float_dtype(self.base)
            for name in CACHE_KWARGS:
                kwargs.pop(name, None)
            cache = prefix_to_cache(prompts.to(dtype), config, getattr(self.base, "config", None))
            entry, key = _cache_entry(self.base)
            if entry is self.base:
                return self.base(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs, **{key: cache})
            with _cache_into(entry, key, cache):
                return self.base(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        decoder_prompts = self._decoder_prompts(prompts, n, batch, adapter_names)
        if decoder_prompts is not None:
            self._prompt_decoder(kwargs, decoder_prompts)
        labels = kwargs.get("labels")
        if labels is not None and self._task() in (None, TaskType.CAUSAL_LM) and not is_encoder_decoder(self.base):
            kwargs["labels"] = _prepend(labels, n, -100)
        output = self.base(inputs_embeds=_with_prompts(prompts, n, inputs_embeds), **kwargs)
        if own_labels is None:
            return output
        logits = output[0] if isinstance(output, tuple) else output.logits
        return _with_loss(output, loss_owner.loss(logits, own_labels, **loss_inputs))

    def _decoder_prompts(self, prompts: torch.Tensor, n: int, batch: int,
                         adapter_names: Sequence[str] | None) -> torch.Tensor | None:
        """``[rows, m, token_dim]``: the virtual tokens that go in front of an encoder-decoder's
        decoder inputs (those after the encoder's ``n``, for encoders that set ``prompts_decoder``);
        None when the decoder gets none."""
        if self.injection != "inputs_embeds" or not is_encoder_decoder(self.base) or prompts.shape[1] == n:
            return None
        rows = dict.fromkeys(self._row_adapters(batch, adapter_names))
        return prompts[:, n:] if any(self.encoders[name].prompts_decoder for name in rows) else None

    def _prompt_decoder(self, kwargs: dict, prompts: torch.Tensor) -> None:
        """Put ``prompts`` in front of the decoder's input embeddings in ``kwargs`` (made from
        ``decoder_input_ids``, else from the labels shifted right, as the base model would), ones in
        front of ``decoder_attention_mask`` and ``-100`` in front of the labels."""
        count = prompts.shape[1]
        embeds = kwargs.pop("decoder_inputs_embeds", None)
        ids = kwargs.pop("decoder_input_ids", None)
        labels = kwargs.get("labels")
        if embeds is not None and ids is not None:
            raise ValueError("pass decoder_input_ids or decoder_inputs_embeds, not both.")
        if embeds is None:
            if ids is None:
                if labels is None:
                    raise ValueError("an encoder-decoder's forward needs decoder_input_ids, decoder_inputs_embeds or labels.")
                ids = self.base.prepare_decoder_input_ids_from_labels(labels=labels)
            embeds = self.word_embeddings(ids)
        kwargs["decoder_inputs_embeds"] = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)
        mask = kwargs.get("decoder_attention_mask")
        if mask is not None:
            kwargs["decoder_attention_mask"] = _prepend(mask, count, 1)
        if labels is not None:
            kwargs["labels"] = _prepend(labels, count, -100)

    def _loss_owner(self, batch: int, adapter_names: Sequence[str] | None,
                    kwargs: dict) -> tuple[PromptEncoder | None, dict[str, Any]]:
        """The encoder whose :meth:`PromptEncoder.loss` replaces the base model's (None when the base
        model's loss stands), and the ``loss_inputs`` taken out of ``kwargs`` for it."""
        encoders = [self.encoders[n] for n in dict.fromkeys(self._row_adapters(batch, adapter_names))]
        inputs = {k: kwargs.pop(k) for e in encoders for k in e.loss_inputs if k in kwargs}
        owners = [e for e in encoders if e.computes_loss]
        if not owners:
            return None, inputs
        if len(encoders) > 1 and kwargs.get("labels") is not None:
            raise MixedBatchError(f"{self.record.peft_type} computes its own loss per adapter: pass labels for one "
                                  "adapter at a time, not with a mixed batch.")
        return owners[0], inputs

    @property
    def _mask_key(self) -> str:
        """The attention mask that covers the virtual tokens: the (encoder's) ``attention_mask``, or
        on an encoder-decoder the decoder's when the prefix is a key/value cache (which HF PEFT
        gives the decoder only; see :func:`prefix_to_cache`)."""
        if self.injection == "past_key_values" and is_encoder_decoder(self.base):
            return "decoder_attention_mask"
        return "attention_mask"

    def _drop_unsupported(self, kwargs: dict, n: int, batch: int, device: torch.device) -> None:
        if kwargs.get("position_ids") is not None:
            warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.",
                          UserWarning, stacklevel=4)
            kwargs["position_ids"] = None
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            if self.injection == "inputs_embeds" and self._task() not in (None, TaskType.CAUSAL_LM):
                kwargs["token_type_ids"] = _prepend(token_types, n, 0)
            elif self.injection == "past_key_values" and self._task() not in (None, TaskType.CAUSAL_LM):
                pass  # real tokens keep their types; the prefix has none
            else:
                warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids",
                              UserWarning, stacklevel=4)
                kwargs["token_type_ids"] = None

    # ---- generate ---------------------------------------------------------------------------
    def serve_generate(self, args: tuple, kwargs: dict, adapter_names: Sequence[str] | None) -> Any:
        base = self.base
        task_ids = kwargs.pop("task_ids", None)
        if self.disabled:
            return base.generate(*args, **kwargs)
        if kwargs.get("position_ids") is not None:
            warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.",
                          UserWarning, stacklevel=3)
            kwargs.pop("position_ids")
        if self.injection == "inputs_embeds" and is_encoder_decoder(base):
            return self._generate_encoder_prompted(args, kwargs, adapter_names, task_ids)
        original = base.prepare_inputs_for_generation
        learner = self

        @functools.wraps(original)  # generate() validates kwargs against this signature
        def prepare(input_ids: Any, *p_args: Any, **p_kwargs: Any) -> dict:
            # transformers >= 5.24 hands the cache over as `cache`, older releases as `past_key_values`
            cache = next((p_kwargs[k] for k in CACHE_KWARGS if p_kwargs.get(k) is not None), None)
            if p_kwargs.get("use_cache") is False:
                cache = None  # every step runs the whole sequence; a cache some models hand back anyway is stale
            fresh = cache is None or not cache.get_seq_length()
            inputs = original(input_ids, *p_args, **p_kwargs)
            ids = inputs.get("input_ids")
            embeds = inputs.get("inputs_embeds")
            batch = next(t for t in (ids, embeds, input_ids) if t is not None).shape[0]  # the decoder's on seq2seq
            prompts, config = learner.prompts(batch, adapter_names, task_ids)
            n = config.num_virtual_tokens
            mask = inputs.get(learner._mask_key)
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                inputs[learner._mask_key] = _prepend(mask, n, 1)
            elif mask is not None:
                raise NotImplementedError("prompt learning in generate() needs a 2D attention mask (no static cache).")
            inputs.pop("position_ids", None)
            _shift_positions(inputs, n, fresh and learner.injection == "inputs_embeds")
            if fresh and learner.injection == "past_key_values":
                # the prefix goes in under the keyword the model reads (the one prepare used, else the
                # forward's): under a deprecated name it is dropped in favour of `cache` and the
                # prefill step would run the plain base model
                key = next((k for k in CACHE_KWARGS if k in inputs), None) or cache_kwarg(base)
                for name in CACHE_KWARGS:
                    inputs.pop(name, None)
                inputs[key] = prefix_to_cache(
                    prompts.to(_float_dtype(base)), config, getattr(base, "config", None), cache=cache
                )
            elif fresh:
                if embeds is None:
                    embeds = learner.word_embeddings(ids)
                inputs["inputs_embeds"] = _with_prompts(prompts, n, embeds)
                inputs["input_ids"] = None
            return inputs

        with _preparing(base, prepare):
            return base.generate(*args, **kwargs)

    def _generate_encoder_prompted(self, args: tuple, kwargs: dict, adapter_names: Sequence[str] | None,
                                   task_ids: Any = None) -> Any:
        """``generate`` of an encoder-decoder whose virtual tokens are embeddings: as HF PEFT, the
        encoder's inputs get them (and its mask ones) once, and the base model decodes as usual."""
        if len(args) > 1 or (args and "input_ids" in kwargs):
            raise TypeError("generate() takes the input ids as its only positional argument; pass the rest by keyword.")
        input_ids = args[0] if args else kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds to generate().")
            embeds = self.word_embeddings(input_ids)
        prompts, config = self.prompts(embeds.shape[0], adapter_names, task_ids)
        n = config.num_virtual_tokens
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = _prepend(mask, n, 1)
        decoder_prompts = self._decoder_prompts(prompts, n, embeds.shape[0], adapter_names)
        preparing = contextlib.nullcontext() if decoder_prompts is None else _preparing(
            self.base, self._decoder_prompting_prepare(n, decoder_prompts.shape[1], adapter_names, task_ids))
        with preparing:
            return self.base.generate(inputs_embeds=_with_prompts(prompts, n, embeds), **kwargs)

    def _decoder_prompting_prepare(self, n: int, count: int, adapter_names: Sequence[str] | None,
                                   task_ids: Any) -> Any:
        """The base model's ``prepare_inputs_for_generation`` with the decoder's ``count`` virtual
        tokens (see :meth:`_decoder_prompts`) in front of its input embeddings whenever the decoder
        starts from scratch (the first step, every step without a cache), and ones in front of
        ``decoder_attention_mask`` at every step (the cache holds the virtual tokens)."""
        original = self.base.prepare_inputs_for_generation
        learner = self

        @functools.wraps(original)  # generate() validates kwargs against this signature
        def prepare(input_ids: Any, *p_args: Any, **p_kwargs: Any) -> dict:
            cache = next((p_kwargs[k] for k in CACHE_KWARGS if p_kwargs.get(k) is not None), None)
            fresh = p_kwargs.get("use_cache") is False or cache is None or not cache.get_seq_length()
            inputs = original(input_ids, *p_args, **p_kwargs)
            mask = inputs.get("decoder_attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                inputs["decoder_attention_mask"] = _prepend(mask, count, 1)
            elif mask is not None:
                raise NotImplementedError("prompt learning in generate() needs a 2D decoder attention mask.")
            ids = inputs.get("decoder_input_ids")
            if fresh and ids is not None:
                prompts, _ = learner.prompts(ids.shape[0], adapter_names, task_ids)
                embeds = learner.word_embeddings(ids)
                inputs["decoder_inputs_embeds"] = torch.cat([prompts[:, n:].to(embeds.dtype), embeds], dim=1)
                inputs["decoder_input_ids"] = None
            _shift_positions(inputs, count, fresh)
            return inputs

        return prepare


@contextlib.contextmanager
def _preparing(model: nn.Module, prepare: Any) -> Iterator[None]:
    """Have ``model.generate`` prepare its inputs with ``prepare`` for the duration of the block."""
    shadowed = model.__dict__.get("prepare_inputs_for_generation")
    model.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        if shadowed is None:
            del model.prepare_inputs_for_generation
        else:
            model.prepare_inputs_for_generation = shadowed


def _shift_positions(inputs: dict, count: int, prefill: bool) -> None:
    """transformers < 5.x hands ``cache_position`` to the forward, counted without the ``count``
    virtual tokens: shift them past the virtual tokens, and on a step whose embeddings get the virtual
    tokens in front (``prefill``) cover those too. Nothing to do where no positions are handed over."""
    positions = inputs.get("cache_position")
    if isinstance(positions, torch.Tensor):
        positions = positions + count
        if prefill:
            positions = torch.cat([torch.arange(count, dtype=positions.dtype, device=positions.device), positions])
        inputs["cache_position"] = positions


def _with_prompts(prompts: torch.Tensor, n: int, embeds: torch.Tensor) -> torch.Tensor:
    """``embeds`` with the first ``n`` virtual tokens of each row in front: all of them on a
    decoder-only model; on an encoder-decoder (``num_transformer_submodules=2``, twice as many
    tokens) the encoder's half, the only one HF PEFT uses."""
    return torch.cat([prompts[:, :n].to(embeds.dtype), embeds], dim=1)


def _row_task_ids(task_ids: Any, batch: int, device: torch.device) -> torch.Tensor | None:
    """``task_ids`` (a sequence or tensor of ints, one per row) as a long tensor of ``batch`` rows;
    ids given for ``batch / k`` rows are repeated ``k`` times each (generate's beams and returned
    sequences), as adapter names are."""
    if task_ids is None:
        return None
    ids = torch.as_tensor(task_ids, device=device).reshape(-1)
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.numel() == 0 or batch % ids.numel():
        raise MixedBatchError(f"task_ids must hold one integer task id per batch row ({batch} rows); got "
                         f"{ids.numel()} of dtype {ids.dtype}.")
    return ids.long().repeat_interleave(batch // ids.numel())


def _with_loss(output: Any, loss: torch.Tensor) -> Any:
    """``output`` with ``loss`` as its loss (first in a tuple, as transformers returns it)."""
    if isinstance(output, tuple):
        return (loss, *output)
    output["loss"] = loss
    output.move_to_end("loss", last=False)
    return output


def _prepend(tensor: torch.Tensor, n: int, value: int) -> torch.Tensor:
    pad = torch.full((tensor.shape[0], n), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


def _float_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
