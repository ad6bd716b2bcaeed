"""Entry module of peft-kernel-trainable-tokens: the record and three hooks (default target, tied
embeddings matched too, one shared row tensor for tied layers). Keep it cheap (no torch)."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import MethodRecord, base_of, hookimpl, standard_match
from peft_kernel_trainable_tokens.config import TrainableTokensConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="TRAINABLE_TOKENS",
            config_class=TrainableTokensConfig,
            prefix="trainable_tokens_",
            capabilities={"mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="TrainableTokensModel",
            layer_factory="peft_kernel_trainable_tokens.layers:make_layer",
        )
    )


def _input_embedding_path(model: Any) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return next((name for name, module in model.named_modules() if module is embedding), None) if embedding is not None else None


@hookimpl
def peft_kernel_prepare_config(config: Any, model: Any) -> None:
    """No ``target_modules``: the model's input embedding, by its path (what HF PEFT saves)."""
    if isinstance(config, TrainableTokensConfig) and config.target_modules is None:
        config.target_modules = _input_embedding_path(model)


@hookimpl
def peft_kernel_match_target(config: Any, module_name: str, module: Any, model: Any) -> bool | None:
    """The configured targets, plus every module tied to a targeted input embedding (same weight:
    a tied ``lm_head``, T5's ``encoder.embed_tokens`` / ``decoder.embed_tokens``), as HF PEFT does:
    they must all see the same trained rows."""
    if not isinstance(config, TrainableTokensConfig):
        return None
    if standard_match(config, module_name):
        return True
    get_input = getattr(model, "get_input_embeddings", None)
    weight = getattr(base_of(module), "weight", None)
    if not callable(get_input) or weight is None or weight is not getattr(base_of(get_input()), "weight", None):
        return False
    source = _input_embedding_path(model)
    return bool(source and standard_match(config, source))


@hookimpl
def peft_kernel_create_shared_tensors(config: Any, adapter_name: str, targets: list[tuple[str, Any]]) -> Any:
    """One row tensor per embedding weight that several targets share (tied input / output
    embeddings), keyed by the weight; each layer keeps it in its own ``trainable_tokens_delta``."""
    if not isinstance(config, TrainableTokensConfig):
        return None
    from peft_kernel_trainable_tokens.layers import tied_rows

    return tied_rows(config, [base_of(module) for _, module in targets])
