"""Shared pieces of the low-rank family plugins (LoRA, AdaLoRA, DeLoRA, VeRA, RandLora, VB-LoRA, OSF).

This is a plain library: it registers no entry point and no method. Method plugins depend on it,
so none of them imports another. :mod:`peft_kernel_lowrank.mixed` holds the fast single-adapter
forward and the stacked mixed-batch kernels, for any layer implementing the core's
``LowRankLayer`` protocol (``low_rank_factors``); :mod:`peft_kernel_lowrank.derived` caches factors a
layer computes from its tensors (VB-LoRA's bank mixtures, DeLoRA's normalised factors, OSF's
folded SVD parts) so the stacks stay fresh; :mod:`peft_kernel_lowrank.forwards` is a mixin with the
single-adapter and mixed-batch forwards of such layers; :mod:`peft_kernel_lowrank.projections` the
frozen random projections VeRA and RandLora share across layers (HF's seeded generation, slicing).
"""
