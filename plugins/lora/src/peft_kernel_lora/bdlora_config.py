"""``BdLoraConfig`` (HF PEFT's name, fields and defaults) and the ``LoraConfig`` rules around it. Cheap to import."""

from __future__ import annotations

from typing import Any, Optional

import attrs

from peft_kernel.plugin_api import ConfigError
from peft_kernel_lora.sub_config import sub_config


@attrs.define(kw_only=True)
class BdLoraConfig:
    """BD-LoRA (block-diagonal LoRA, for multi-LoRA serving on sharded models): targeted modules whose
    name contains a pattern of ``target_modules_bd_a`` get a block-diagonal ``lora_A``, of
    ``target_modules_bd_b`` a block-diagonal ``lora_B``, each of ``nblocks`` blocks. With
    ``match_strict`` every targeted module must match one of the two lists."""

    target_modules_bd_a: Optional[list[str]] = None
    target_modules_bd_b: Optional[list[str]] = None
    nblocks: int = 1
    match_strict: bool = True

    def __attrs_post_init__(self) -> None:
        for name in ("target_modules_bd_a", "target_modules_bd_b"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple))
                                      or not all(isinstance(p, str) for p in value)):
                raise ConfigError(f"BdLoraConfig.{name} must be a list of module-name patterns or None, got {value!r}")
        if isinstance(self.nblocks, bool) or not isinstance(self.nblocks, int) or self.nblocks < 1:
            raise ConfigError(f"BdLoraConfig.nblocks must be a positive integer, got {self.nblocks!r}")
        if not isinstance(self.match_strict, bool):
            raise ConfigError(f"BdLoraConfig.match_strict must be a bool, got {self.match_strict!r}")
        a, b = self.target_modules_bd_a or [], self.target_modules_bd_b or []
        if set(a) & set(b):
            raise ConfigError(f"Found overlapping modules in target_modules_bd lists: {list(a)} (A) and {list(b)} (B).")


def bdlora_settings(value: Any) -> BdLoraConfig:
    """``LoraConfig.use_bdlora`` (a dict, as saved, or a :class:`BdLoraConfig`) checked."""
    return sub_config(value, BdLoraConfig, "use_bdlora")


def check_lora_bdlora(config: Any) -> dict | None:
    """``use_bdlora`` as a dict (the saved form), refused with DoRA, KaSA and aLoRA (HF refuses these
    when the adapter is injected), ``fan_in_fan_out`` (HF fails on Conv1D), and string initialisations
    other than ``"gaussian"``: they set ``A``/``B`` from the base weight or data as dense matrices,
    which a block-diagonal factor cannot hold."""
    if config.use_bdlora is None:
        return None
    settings = attrs.asdict(bdlora_settings(config.use_bdlora))
    for field, value, why in (
        ("use_dora", config.use_dora, "DoRA"),
        ("kasa_config", config.kasa_config, "KaSA"),
        ("alora_invocation_tokens", config.alora_invocation_tokens, "aLoRA"),
        ("fan_in_fan_out", config.fan_in_fan_out, "fan_in_fan_out layers (e.g. Conv1D); target nn.Linear layers"),
    ):
        if value:
            raise ConfigError(f"LoraConfig.use_bdlora cannot be combined with {field}={value!r} ({why}).")
    init = config.init_lora_weights
    if isinstance(init, str) and init != "gaussian":
        raise ConfigError(f"LoraConfig.use_bdlora cannot be combined with init_lora_weights={init!r}: that "
                          "initialisation sets dense A/B factors, which block-diagonal ones cannot hold.")
    return settings
