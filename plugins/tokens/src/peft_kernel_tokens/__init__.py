"""Trainable token rows, shared by the Trainable Tokens method and LoRA's ``trainable_token_indices``.

A plain library: it registers no entry point and no method. :mod:`peft_kernel_tokens.layers` holds
:class:`~peft_kernel_tokens.layers.TrainableTokensLayer` (selected rows of an embedding or output
embedding replaced by an adapter's trained rows, HF PEFT's ``trainable_tokens_delta``) and the
shared-tensor keys under which a method hands a layer its rows.
"""
