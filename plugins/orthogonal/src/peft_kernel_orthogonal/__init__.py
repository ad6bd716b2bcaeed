"""Shared pieces of the orthogonal-family plugins (OFT, BOFT, HRA).

This is a plain library: it registers no entry point and no method. Method plugins depend on it,
so none of them imports another. :mod:`peft_kernel_orthogonal.rotation` holds the block-diagonal
rotations (skew-symmetric parameters, Cayley transform, block application);
:mod:`peft_kernel_orthogonal.layer` the layer base with rotated forwards, mixed batches and the
multiplicative merge with its exact inverse; :mod:`peft_kernel_orthogonal.butterfly` BOFT's
butterfly factorisation (permutation indices, products of permuted block-diagonal rotations, never
a dense ``d x d`` matrix); :mod:`peft_kernel_orthogonal.householder` HRA's products of Householder
reflections in compact WY form (``I - Y T Yᵀ``), Gram-Schmidt, and their per-row application.
"""
