"""LoRA for ``nn.LSTM`` as an add-on to peft-kernel-lora. Entry module: :mod:`peft_kernel_lora_lstm.plugin`."""
