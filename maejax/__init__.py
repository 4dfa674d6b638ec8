"""maejax: masked autoencoders, masked-feature distillation and occlusion-robust AU detection in JAX."""

__version__ = "0.1.0"
