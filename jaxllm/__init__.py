"""jaxllm: a JAX/Flax NNX pre-training stack for decoder-only language models."""

__version__ = "0.1.0"
