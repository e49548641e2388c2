"""Defaults for every key (the schema lives in jaxllm/config.py)."""

from jaxllm.config import defaults


def get_config(arg=None):
    return defaults()
