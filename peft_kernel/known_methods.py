"""Where to get a method that is not installed: ``peft_type`` -> distribution to ``pip install``.

Data only: it words the error for an unknown ``peft_type``, and settles collisions (when two plugins
claim a method's names, its provider listed here keeps them). The core has no other behaviour keyed
on these names.
"""

PROVIDERS: dict[str, str] = {
    "LORA": "peft-kernel-lora",
    "IA3": "peft-kernel-ia3",
    "LOHA": "peft-kernel-loha",
    "LOKR": "peft-kernel-lokr",
    "OFT": "peft-kernel-oft",
    "PROMPT_TUNING": "peft-kernel-prompt-tuning",
    "PREFIX_TUNING": "peft-kernel-prefix-tuning",
}
