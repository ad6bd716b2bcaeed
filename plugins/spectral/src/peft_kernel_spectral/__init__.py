"""Shared code of the sparse-coefficient methods (FourierFT, WaveFT): each learns ``n`` coefficients
of a transform of ``delta W`` at positions drawn from a seed, and rebuilds those positions (never
saved) from the seed on load. A family library: it registers no method."""

from peft_kernel_spectral.positions import seeded_positions

__all__ = ["seeded_positions"]
