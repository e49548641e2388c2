"""The CPU default: a 0.9M-parameter byte-level model on the embedded corpus (minutes, 2 cores)."""

from jaxllm.config import tiny


def get_config(arg=None):
    return tiny()
