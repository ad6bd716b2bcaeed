"""Shared code of the sparse-coefficient methods (FourierFT, WaveFT): each learns ``n`` coefficients
of a transform of ``delta W`` at positions drawn from a seed, rebuilds those positions (never
saved) from the seed on load, and applies ``delta W`` dense to ``nn.Linear`` / ``Conv1D`` layers.
A family library: it registers no method. It imports torch: import it from layer modules only."""

from peft_kernel_spectral.layer import SpectralLayer
from peft_kernel_spectral.positions import seeded_positions

__all__ = ["SpectralLayer", "seeded_positions"]
