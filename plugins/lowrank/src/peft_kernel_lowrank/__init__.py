"""Shared pieces of the low-rank family plugins (LoRA now; AdaLoRA, VeRA, DeLoRA, RandLora next).

This is a plain library: it registers no entry point and no method. Method plugins depend on it,
so none of them imports another. :mod:`peft_kernel_lowrank.mixed` holds the fast single-adapter
forward and the stacked mixed-batch kernels, for any layer implementing the core's
``LowRankLayer`` protocol (``low_rank_factors``).
"""
